//! Helpers for the integration tests of ws-shard and ws-lb: start real servers in-process on
//! `127.0.0.1:0`, wait for readiness through their health endpoints, talk HTTP and
//! WebSocket to them with clients that are not our server code (tokio-tungstenite, raw TCP).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod http;
pub mod kafka;
pub mod servers;
pub mod ws;

pub use servers::{
    free_port, spawn_binary, start_lb, start_shards, start_shards_at, start_warming_shard_at,
    BlackHole, IsolatedShards, TestLb, TestShards,
};

/// CPU seconds (user + system) process `pid` has used so far, from `/proc/<pid>/stat`
/// (clock ticks of 1/100 s).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rfind(')')
        .and_then(|i| stat.get(i + 2..))
        .unwrap_or("");
    let ticks: f64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}
