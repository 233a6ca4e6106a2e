//! `ws-shard`: parse settings, set up telemetry, bind listeners, run the server.

mod config;

use std::net::SocketAddr;

use anyhow::Context;
use clap::CommandFactory;
use net_core::{ListenOptions, Shutdown};
use ws_shard::Listeners;

fn main() -> anyhow::Result<()> {
    // `ws-shard kafka-consumer` is the Kafka consumer child process the server starts for
    // itself (see kafka_source): not a user-facing command.
    if std::env::args().nth(1).as_deref() == Some("kafka-consumer") {
        net_core::telemetry::init_tracing(
            false,
            &std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let runtime = net_core::limits::server_runtime(0).context("starting the runtime")?;
        std::process::exit(runtime.block_on(kafka_source::consumer::child_main()));
    }
    let loaded = config::load(&config::Cli::command().get_matches(), config::ENV_PREFIX)?;
    let settings = loaded.settings.clone();
    net_core::telemetry::init_tracing(settings.log_json, &settings.log_level);
    loaded.warn_ignored();
    let cfg = settings.server_config()?;
    // One descriptor per slot, plus listeners, the Kafka child's pipe and logs.
    let descriptors = (settings.shards as u64)
        .saturating_mul(settings.max_connections as u64)
        .saturating_add(64);
    if let Some(limit) = net_core::limits::open_files_limit() {
        if descriptors > limit {
            // Not fatal: the accept loop answers 503 from a reserve descriptor when they run
            // out, but the shards will never fill their slots.
            tracing::warn!(slots = descriptors - 64, open_files_limit = limit, "shards x max_connections exceeds the open-files limit (ulimit -n); raise it or lower max_connections");
        }
    }
    net_core::limits::server_runtime(descriptors)
        .context("starting the runtime")?
        .block_on(serve(settings, cfg))
}

async fn serve(settings: config::Settings, cfg: ws_shard::ServerConfig) -> anyhow::Result<()> {
    tracing::info!(
        history_budget = cfg.hub.history_budget,
        "history budget (bytes) of this process"
    );
    let prometheus = net_core::telemetry::prometheus();

    let opts = settings.listen_options();
    let mut shards = Vec::new();
    for i in 0..settings.shards {
        let port = u16::try_from(u32::from(settings.base_port) + i).context("port out of range")?;
        let addr = SocketAddr::new(settings.bind, port);
        shards.push(
            net_core::bind(addr, opts).with_context(|| format!("binding shard {i} on {addr}"))?,
        );
    }
    let admin = net_core::bind(settings.admin_addr, ListenOptions::default())
        .with_context(|| format!("binding admin listener on {}", settings.admin_addr))?;

    let shutdown = Shutdown::new();
    shutdown.install_signal_handlers(cfg.grace)?;
    tracing::info!(shards = settings.shards, base_port = settings.base_port, admin = %settings.admin_addr, "ws-shard starting");
    let left = ws_shard::run(Listeners { shards, admin }, cfg, prometheus, shutdown).await?;
    if left > 0 {
        tracing::warn!(sessions = left, "exiting with sessions still open");
    }
    Ok(())
}
