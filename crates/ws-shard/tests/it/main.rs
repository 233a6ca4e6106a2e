//! ws-shard integration tests: a real server on 127.0.0.1:0, real WebSocket clients
//! (tokio-tungstenite) and raw TCP for the abusive cases.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod budget;
mod drain;
mod fd_limit;
mod hostile;
mod kafka;
mod pubsub;
mod slots;
mod slow_consumer;
