//! The `loadtest` binary: parse flags, set up logging and the runtime, call the library.

use std::process::ExitCode;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = loadtest::Cli::parse_from(&args);
    // Logs go to stderr so stdout stays the summary (or a worker's progress lines).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_env("LOADTEST_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    // The descriptor table grown first, up to the open-files limit, so that the generator's
    // own first thousands of connections do not stall on its growth
    // (net_core::limits::reserve_descriptor_table).
    let runtime = match net_core::limits::server_runtime(u64::MAX) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(loadtest::execute(cli, args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::FAILURE
        }
    }
}
