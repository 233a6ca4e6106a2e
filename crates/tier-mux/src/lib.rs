//! The tier link between ws-lb and a shard: many client connections over one TCP connection.
//!
//! Without it every client is a TCP connection from the LB to its shard, and every delivery
//! costs the shard one `write` and the LB one `read`, each a loopback or network segment. A
//! link carries every client of one LB on one shard: the shard queues each client's frames
//! into the link's buffer and writes the buffer once per wake-up, the LB reads it in large
//! chunks and writes each client's share to the client. See [`frame`] for the wire format and
//! [`link`] for flow control.

pub mod frame;
pub mod link;
pub mod upgrade;

pub use frame::{Open, Refusal, Reply, WINDOW};
pub use link::{Link, LinkError, MuxStream, OnOpen, OUT_LIMIT};
