//! `ws-lb`: parse settings, set up telemetry, bind listeners, run the load balancer.

mod config;

use anyhow::Context;
use clap::Parser;
use lb_core::{BreakerConfig, PacingConfig, RetryConfig, ScoreConfig};
use net_core::{HttpLimits, ListenOptions, Shutdown, SocketOptions};
use ws_lb::{LbConfig, Listeners, PerIpLimit};

fn lb_config(s: &config::Settings) -> anyhow::Result<LbConfig> {
    if s.stall_timeout.is_zero() {
        anyhow::bail!("stall_timeout must be positive (it bounds how long a client that stopped reading is kept)");
    }
    Ok(LbConfig {
        backends: s.backend_urls.clone(),
        breaker: BreakerConfig::try_new(
            s.circuit_breaker_failure_threshold,
            s.circuit_breaker_timeout,
            s.circuit_breaker_half_open_max_calls,
            s.circuit_breaker_success_threshold,
        )?,
        score: ScoreConfig::try_new(s.score_window, s.score_window_len)?,
        retry: RetryConfig::try_new(s.retry_delay, s.handshake_deadline, s.attempt_timeout)?,
        pacing: PacingConfig::try_new(
            s.admission_rate,
            s.admission_burst,
            s.admission_max_wait,
            s.admission_max_queue,
        )?,
        per_ip: (s.per_ip_rate > 0).then_some(PerIpLimit {
            per_second: s.per_ip_rate,
            burst: s.per_ip_burst.max(1),
        }),
        max_clients: match s.max_clients {
            0 => net_core::limits::clients_for_open_files(2, 64),
            n => n,
        },
        trust_forwarded_for: s.trust_forwarded_for,
        allowed_origins: s.allowed_origins.clone(),
        health_interval: s.health_interval,
        health_timeout: s.health_timeout,
        http: HttpLimits {
            header_read_timeout: s.header_timeout,
            max_headers: s.max_headers,
            max_header_bytes: s.max_header_bytes,
        },
        socket: SocketOptions {
            keepalive: (!s.tcp_keepalive.is_zero()).then_some(s.tcp_keepalive),
            send_buffer: (s.socket_send_buffer > 0).then_some(s.socket_send_buffer),
        },
        close_timeout: s.close_timeout,
        stall_timeout: s.stall_timeout,
        drain_window: s.drain_window,
        grace: s.grace,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = config::Cli::parse();
    let settings = config::load(&cli, "LB_")?;
    net_core::telemetry::init_tracing(settings.log_json, &settings.log_level);
    let cfg = lb_config(&settings)?;
    let prometheus = net_core::telemetry::prometheus();
    let opts = ListenOptions {
        backlog: settings.backlog,
        reuse_port: settings.reuse_port,
    };
    let client = net_core::bind(settings.listen, opts)
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
