//! The loadtest integration tests: one binary, modules by topic. Every test starts the
//! servers it needs in-process on 127.0.0.1:0 and is bounded by a timeout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod failures;
mod protocol;
mod ramp;
mod servers;
mod tls;
mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser as _;
use loadtest::{Progress, Report, RunConfig};

/// Fails the test instead of hanging when `f` takes longer than `secs`.
pub async fn bounded<T>(secs: u64, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test exceeded its time bound")
}

/// `ws://addr/` plus `extra` flags, parsed as the binary would.
pub fn config(addr: SocketAddr, extra: &[&str]) -> RunConfig {
    let url = format!("ws://{addr}/");
    let mut args = vec!["loadtest", "--url", &url, "--quiet"];
    args.extend_from_slice(extra);
    let cli = loadtest::Cli::try_parse_from(args).unwrap();
    RunConfig::from_args(&cli.run).unwrap()
}

/// Runs `extra` against `addr` in-process and returns the report.
pub async fn run(addr: SocketAddr, extra: &[&str]) -> Report {
    loadtest::run(&config(addr, extra), &Progress::Quiet)
        .await
        .unwrap()
}

/// A fresh temporary directory for output files.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loadtest-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
