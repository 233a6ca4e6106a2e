//! The odin-ws wire contract, shared by every other crate.
//!
//! Everything a client, a shard or a load balancer puts on the wire is defined here: the JSON
//! messages ([`message`]), the close codes ([`close`]), the channel-name rules ([`channel`]),
//! the machine-readable error codes ([`error`]), the shard health report ([`health`]) and the
//! RFC 6455 frame codec ([`frame`]) and the client side of the opening handshake
//! ([`handshake`]). This crate performs no I/O; it turns bytes into typed
//! values and back, and it never panics on input (see the property tests).
#![warn(clippy::indexing_slicing)]

pub mod channel;
pub mod close;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod health;
pub mod message;

pub use channel::{ChannelName, InvalidChannel, MAX_CHANNEL_LEN};
pub use error::ErrorCode;
pub use health::{ShardHealth, ShardStatus, SourceHealth};
pub use message::{ClientMessage, DecodeError, Position, ServerMessage};
