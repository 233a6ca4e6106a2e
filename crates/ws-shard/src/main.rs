//! `ws-shard`: parse settings, set up telemetry, bind listeners, run the server.

mod config;

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use net_core::{HttpLimits, ListenOptions, Shutdown, SocketOptions};
use shard_core::source::kafka::{Isolation, KafkaConfig, StartPosition};
use shard_core::{HubConfig, SessionConfig};
use ws_shard::{Listeners, ServerConfig, SourceConfig};

fn server_config(s: &config::Settings) -> anyhow::Result<ServerConfig> {
    let session = SessionConfig {
        max_message_size: s.max_message_size,
        outbound_queue: s.outbound_queue,
        ping_interval: s.ping_interval,
        idle_timeout: s.idle_timeout,
        close_timeout: s.close_timeout,
        max_subscriptions: s.max_subscriptions,
        rate_per_sec: s.client_rate,
        rate_burst: s.client_rate_burst,
        drain_window: s.drain_window,
    }
    .validate()?;
    let echo = s
        .echo
        .then(|| {
            SessionConfig {
                max_message_size: s.echo_max_message_size,
                rate_per_sec: 0,
                ..session
            }
            .validate()
        })
        .transpose()?;
    Ok(ServerConfig {
        max_connections: s.max_connections,
        session,
        echo,
        hub: HubConfig {
            history_len: s.history_len,
        }
        .validate()?,
        http: HttpLimits {
            header_read_timeout: s.header_timeout,
            max_headers: s.max_headers,
            max_header_bytes: s.max_header_bytes,
        },
        socket: SocketOptions {
            keepalive: (!s.tcp_keepalive.is_zero()).then_some(s.tcp_keepalive),
            send_buffer: (s.socket_send_buffer > 0).then_some(s.socket_send_buffer),
        },
        source: if s.kafka_brokers.is_empty() {
            SourceConfig::Embedded {
                demo_rate: s.demo_feed.then_some(s.demo_rate),
            }
        } else {
            SourceConfig::Kafka(KafkaConfig {
                brokers: s.kafka_brokers.join(","),
                topics: s.kafka_topics.clone(),
                start: s
                    .kafka_start
                    .parse::<StartPosition>()
                    .map_err(anyhow::Error::msg)?,
                channel_template: s.kafka_channel_template.clone(),
                fetch_wait_max: s.kafka_fetch_wait_max,
                isolation: Isolation::Process {
                    exe: std::env::current_exe().context("locating the ws-shard binary")?,
                },
                overrides: s
                    .kafka_properties
                    .iter()
                    .map(|kv| {
                        kv.split_once('=')
                            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                            .ok_or_else(|| {
                                anyhow::anyhow!("kafka_properties: expected key=value, got {kv:?}")
                            })
                    })
                    .collect::<anyhow::Result<_>>()?,
            })
        },
        grace: s.grace,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `ws-shard kafka-consumer` is the Kafka consumer child process the server starts for
    // itself (see shard_core::source::kafka): not a user-facing command.
    if std::env::args().nth(1).as_deref() == Some("kafka-consumer") {
        net_core::telemetry::init_tracing(
            false,
            &std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        std::process::exit(shard_core::source::kafka::consumer::child_main().await);
    }
    let cli = config::Cli::parse();
    let settings = config::load(&cli, config::env())?;
    net_core::telemetry::init_tracing(settings.log_json, &settings.log_level);
    let cfg = server_config(&settings)?;
    let prometheus = net_core::telemetry::prometheus();

    let opts = ListenOptions {
        backlog: settings.backlog,
        reuse_port: settings.reuse_port,
    };
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
    let slots = (settings.shards as u64).saturating_mul(settings.max_connections as u64);
    if let Some(limit) = net_core::limits::open_files_limit() {
        if slots + 64 > limit {
            // Not fatal: the accept loop answers 503 from a reserve descriptor when they run
            // out, but the shards will never fill their slots.
            tracing::warn!(slots, open_files_limit = limit, "shards x max_connections exceeds the open-files limit (ulimit -n); raise it or lower max_connections");
        }
    }
    let left = ws_shard::run(Listeners { shards, admin }, cfg, prometheus, shutdown).await?;
    if left > 0 {
        tracing::warn!(sessions = left, "exiting with sessions still open");
    }
    Ok(())
}
