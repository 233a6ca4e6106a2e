//! Helpers for the integration tests of ws-shard and ws-lb: start real servers in-process on
//! `127.0.0.1:0`, wait for readiness through their health endpoints, talk HTTP and
//! WebSocket to them with clients that are not our server code (tokio-tungstenite, raw TCP).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod http;
pub mod servers;
pub mod ws;

pub use servers::{
    free_port, start_lb, start_shards, start_shards_at, BlackHole, IsolatedShards, TestLb,
    TestShards,
};
