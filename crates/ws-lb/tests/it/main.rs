//! ws-lb integration tests: real shards and a real LB on 127.0.0.1:0, tokio-tungstenite
//! clients, and stand-ins for broken shards (closed ports, black holes, killed servers).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod admission;
mod breaker;
mod failover;
mod fd_limit;
mod front;
mod health;
mod membership;
mod relay;
