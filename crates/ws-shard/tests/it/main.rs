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

/// The real ws-shard binary (`spawn_binary`) with one shard on a free port and `extra`,
/// under `RLIMIT_NOFILE` `open_files` when given. Returns it with its client and admin
/// addresses.
async fn spawn_shard(
    extra: &[&str],
    open_files: Option<u32>,
) -> (
    tokio::process::Child,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    let port = test_support::free_port();
    let base_port = port.port().to_string();
    let mut args = vec!["--shards", "1", "--base-port", &base_port];
    args.extend_from_slice(extra);
    let (child, admin) =
        test_support::spawn_binary(env!("CARGO_BIN_EXE_ws-shard"), &args, open_files, port).await;
    (child, port, admin)
}
