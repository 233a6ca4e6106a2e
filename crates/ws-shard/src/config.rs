//! ws-shard configuration: defaults < TOML file (`--config`) < environment (`WS_` prefix) <
//! command-line flags. Every key is documented in `docs/runbook.md` with its default.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use figment::providers::Env;
use serde::{Deserialize, Serialize};

/// All settings, flat so that each maps to one env var (`WS_<KEY>`) and one flag.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub shards: u32,
    pub base_port: u16,
    pub bind: IpAddr,
    pub admin_addr: SocketAddr,
    pub max_connections: usize,
    pub max_message_size: usize,
    pub outbound_queue: usize,
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    pub max_subscriptions: usize,
    pub client_rate: u32,
    pub client_rate_burst: u32,
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    pub history_len: usize,
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub backlog: u32,
    pub reuse_port: bool,
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    pub socket_send_buffer: usize,
    pub echo: bool,
    pub echo_max_message_size: usize,
    pub demo_feed: bool,
    pub demo_rate: u32,
    #[serde(deserialize_with = "net_core::config::list")]
    pub kafka_brokers: Vec<String>,
    #[serde(deserialize_with = "net_core::config::list")]
    pub kafka_topics: Vec<String>,
    pub kafka_start: String,
    pub kafka_channel_template: String,
    #[serde(with = "humantime_serde")]
    pub kafka_fetch_wait_max: Duration,
    #[serde(deserialize_with = "net_core::config::list")]
    pub kafka_properties: Vec<String>,
    pub log_json: bool,
    pub log_level: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            shards: 3,
            base_port: 3002,
            bind: IpAddr::from([127, 0, 0, 1]),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 9102)),
            max_connections: 6000,
            max_message_size: 64 * 1024,
            outbound_queue: 1024,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            close_timeout: Duration::from_secs(5),
            max_subscriptions: 256,
            client_rate: 100,
            client_rate_burst: 200,
            drain_window: Duration::from_secs(10),
            grace: Duration::from_secs(30),
            history_len: 1000,
            header_timeout: Duration::from_secs(5),
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            backlog: 65535,
            reuse_port: false,
            tcp_keepalive: Duration::ZERO,
            socket_send_buffer: 0,
            echo: false,
            echo_max_message_size: 16 * 1024 * 1024,
            demo_feed: false,
            demo_rate: 5,
            kafka_brokers: Vec::new(),
            kafka_topics: Vec::new(),
            kafka_start: "latest".into(),
            kafka_channel_template: "{topic}.{key}".into(),
            kafka_fetch_wait_max: Duration::from_millis(10),
            kafka_properties: Vec::new(),
            log_json: false,
            log_level: "info".into(),
        }
    }
}

/// Command-line flags; each overrides the key of the same name.
#[derive(Debug, Parser, Serialize)]
#[command(name = "ws-shard", version, about = "odin-ws shard server")]
pub struct Cli {
    /// TOML file with settings (keys as in docs/runbook.md).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Number of shards in this process; shard i listens on base-port + i.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_port: Option<u16>,
    /// Address the shard ports bind to.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<IpAddr>,
    /// Address of the admin listener (/metrics, /publish).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_addr: Option<SocketAddr>,
    /// Connection slots per shard.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_size: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound_queue: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ping_interval: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_timeout: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_subscriptions: Option<usize>,
    /// Client frames per second per connection (0 = unlimited).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_rate: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_rate_burst: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_window: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_len: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header_timeout: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_headers: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_header_bytes: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog: Option<u32>,
    /// Set SO_REUSEPORT on shard ports.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reuse_port: Option<bool>,
    /// TCP keep-alive idle time on client sockets (0s = off).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<String>,
    /// SO_SNDBUF for client sockets in bytes (0 = kernel default).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_send_buffer: Option<usize>,
    /// Serve GET /echo on every shard port (conformance testing).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo_max_message_size: Option<usize>,
    /// Publish synthetic market ticks on the embedded bus.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demo_feed: Option<bool>,
    /// Demo ticks per second per channel.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub demo_rate: Option<u32>,
    /// Kafka brokers host:port,... (empty: embedded bus).
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_brokers: Option<Vec<String>>,
    /// Kafka topics to fan out, comma-separated.
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_topics: Option<Vec<String>>,
    /// `latest` or `back:<records>` per partition.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_start: Option<String>,
    /// Channel of a record: {topic} and {key} are replaced.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_channel_template: Option<String>,
    /// librdkafka fetch.wait.max.ms.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_fetch_wait_max: Option<String>,
    /// Extra librdkafka properties, comma-separated key=value (applied last).
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka_properties: Option<Vec<String>>,
    /// Log JSON lines instead of text.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_json: Option<bool>,
    /// Log filter (RUST_LOG syntax).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

/// Merges defaults, file, environment and flags.
pub fn load(cli: &Cli, env: Env) -> anyhow::Result<Settings> {
    let settings =
        net_core::config::load(Settings::default(), cli.config.as_deref(), vec![env], cli)?;
    if settings.shards == 0 {
        bail!("shards must be at least 1");
    }
    if u32::from(settings.base_port) + settings.shards > 65_536 {
        bail!("base_port + shards exceeds the port range");
    }
    if settings.kafka_brokers.is_empty() != settings.kafka_topics.is_empty() {
        bail!("set both kafka_brokers and kafka_topics (or neither, for the embedded bus)");
    }
    if !settings.kafka_brokers.is_empty() && settings.demo_feed {
        bail!("demo_feed needs the embedded bus; it cannot be combined with kafka_brokers");
    }
    Ok(settings)
}

/// The environment provider used by the binary.
pub fn env() -> Env {
    Env::prefixed("WS_")
}

#[cfg(test)]
// figment::Jail's closures return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("ws-shard").chain(args.iter().copied()))
    }

    #[test]
    fn precedence_is_defaults_file_env_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "s.toml",
                "max_connections = 10\nshards = 2\nping_interval = \"7s\"\nhistory_len = 5",
            )?;
            jail.set_env("WS_MAX_CONNECTIONS", "20");
            jail.set_env("WS_SHARDS", "4");
            let c = cli(&[
                "--config",
                "s.toml",
                "--shards",
                "5",
                "--drain-window",
                "250ms",
            ]);
            let s = load(&c, env()).map_err(|e| e.to_string())?;
            assert_eq!(s.max_connections, 20, "env beats file");
            assert_eq!(s.shards, 5, "flag beats env");
            assert_eq!(
                s.ping_interval,
                Duration::from_secs(7),
                "file beats default"
            );
            assert_eq!(s.history_len, 5);
            assert_eq!(s.drain_window, Duration::from_millis(250));
            assert_eq!(s.base_port, 3002, "default");
            Ok(())
        });
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "max_conections = 10")?;
            let err = load(&cli(&["--config", "bad.toml"]), env()).unwrap_err();
            assert!(format!("{err:#}").contains("max_conections"), "{err:#}");
            jail.set_env("WS_PING_INTERVAL", "soon");
            let err = load(&cli(&[]), env()).unwrap_err();
            assert!(
                format!("{err:#}").to_lowercase().contains("ping_interval"),
                "{err:#}"
            );
            Ok(())
        });
        let err = load(&cli(&["--config", "/nonexistent.toml"]), env()).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
        assert!(load(&cli(&["--shards", "0"]), Env::prefixed("WS_TEST_NONE_")).is_err());
    }

    #[test]
    fn runbook_documents_every_key_metric_and_close_code() {
        let runbook = include_str!("../../../docs/runbook.md");
        let keys = serde_json::to_value(Settings::default()).unwrap();
        for key in keys.as_object().unwrap().keys() {
            assert!(
                runbook.contains(&format!("| `{key}` |")),
                "config key {key} missing from docs/runbook.md"
            );
        }
        for name in shard_core::metrics::ALL
            .iter()
            .chain(shard_core::source::kafka::ALL)
        {
            assert!(
                runbook.contains(&format!("| `{name}` |")),
                "metric {name} missing from docs/runbook.md"
            );
        }
        for (code, _) in ws_protocol::close::SENT_CODES {
            assert!(
                runbook.contains(&format!("| {code} |")),
                "close code {code} missing from docs/runbook.md"
            );
        }
    }
}
