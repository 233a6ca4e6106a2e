//! `ws-lb`: parse settings, set up telemetry, bind listeners, run the load balancer.

mod config;

use anyhow::Context;
use clap::CommandFactory;
use net_core::{ListenOptions, Shutdown};
use ws_lb::Listeners;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let loaded = config::load(&config::Cli::command().get_matches(), "LB_")?;
    let settings = loaded.settings.clone();
    net_core::telemetry::init_tracing(settings.log_json, &settings.log_level);
    loaded.warn_ignored();
    let cfg = settings.lb_config()?;
    // Each client holds two descriptors (its own and its shard's), plus listeners, health
    // checks and logs.
    let descriptors = (cfg.max_clients as u64)
        .saturating_mul(2)
        .saturating_add(64);
    net_core::limits::server_runtime(descriptors)
        .context("starting the runtime")?
        .block_on(serve(settings, cfg))
}

async fn serve(settings: config::Settings, cfg: ws_lb::LbConfig) -> anyhow::Result<()> {
    let prometheus = net_core::telemetry::prometheus();
    let client = net_core::bind(settings.listen, settings.listen_options())
        .with_context(|| format!("binding {}", settings.listen))?;
    let admin = net_core::bind(
        settings.admin_addr,
        ListenOptions {
            reuse_port: settings.reuse_port,
            ..ListenOptions::default()
        },
    )
    .with_context(|| format!("binding admin listener on {}", settings.admin_addr))?;
    let shutdown = Shutdown::new();
    shutdown.install_signal_handlers(cfg.grace)?;
    tracing::info!(listen = %settings.listen, backends = settings.backend_urls.len(), "ws-lb starting");
    let left = ws_lb::run(Listeners { client, admin }, cfg, prometheus, shutdown).await?;
    if left > 0 {
        tracing::warn!(
            connections = left,
            "exiting with client connections still open"
        );
    }
    Ok(())
}
