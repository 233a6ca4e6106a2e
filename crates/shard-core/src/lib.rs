//! The inside of a shard: everything between an accepted WebSocket and a message source.
//!
//! - [`slots`]: connection slots owned by guards, so every exit path releases them.
//! - [`hub`]: the channel registry — subscribers, per-channel history, and fan-out of
//!   frames encoded once and shared by every subscriber; history within a byte budget,
//!   idle channels evicted, recovery answers kept honest after eviction.
//! - [`queue`]: each connection's bounded outbound queue; overflowing it marks a slow
//!   consumer instead of slowing the publisher.
//! - [`source`]: message sources behind one trait (the embedded bus, a demo feed; Kafka is
//!   the `kafka-source` crate, so librdkafka stays out of this one).
//! - [`session`]: a connection's lifecycle as a state machine — framing, the JSON protocol,
//!   keepalive, rate limits, slow-consumer and drain closes — and its driver over a raw
//!   `TcpStream`.
//!
//! Nothing here binds a listener or parses HTTP; ws-shard does that and hands over the
//! upgraded socket.

pub mod config;
pub mod hub;
pub mod metrics;
pub mod queue;
pub mod session;
pub mod slots;
pub mod source;

pub use config::{ConfigError, HubConfig, SessionConfig};
pub use hub::{Hub, Publication, SubscribeError};
pub use slots::{SlotGuard, Slots};
