//! ws-lb configuration: defaults < TOML file (`--config`) < environment (`LB_` prefix, plus
//! the plan's `CIRCUIT_BREAKER_*` names) < command-line flags. Every key is documented in
//! `docs/runbook.md` with its default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use figment::providers::Env;
use serde::{Deserialize, Serialize};

/// All settings, flat: each key maps to `LB_<KEY>` and to `--<key-with-dashes>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_addr: SocketAddr,
    #[serde(deserialize_with = "net_core::config::list")]
    pub backend_urls: Vec<String>,
    pub circuit_breaker_failure_threshold: u32,
    #[serde(with = "humantime_serde")]
    pub circuit_breaker_timeout: Duration,
    pub circuit_breaker_half_open_max_calls: u32,
    pub circuit_breaker_success_threshold: u32,
    #[serde(with = "humantime_serde")]
    pub score_window: Duration,
    pub score_window_len: usize,
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub handshake_deadline: Duration,
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    pub admission_rate: u32,
    pub admission_burst: u32,
    #[serde(with = "humantime_serde")]
    pub admission_max_wait: Duration,
    pub admission_max_queue: usize,
    pub per_ip_rate: u32,
    pub per_ip_burst: u32,
    pub max_clients: usize,
    pub trust_forwarded_for: bool,
    #[serde(deserialize_with = "net_core::config::list")]
    pub allowed_origins: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub backlog: u32,
    pub reuse_port: bool,
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    pub socket_send_buffer: usize,
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    pub log_json: bool,
    pub log_level: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 3001)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 9101)),
            backend_urls: Vec::new(),
            circuit_breaker_failure_threshold: 10,
            circuit_breaker_timeout: Duration::from_secs(30),
            circuit_breaker_half_open_max_calls: 5,
            circuit_breaker_success_threshold: 3,
            score_window: Duration::from_secs(60),
            score_window_len: 100,
            retry_delay: Duration::from_millis(10),
            handshake_deadline: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(2),
            admission_rate: 5000,
            admission_burst: 500,
            admission_max_wait: Duration::from_secs(3),
            admission_max_queue: 20_000,
            per_ip_rate: 100,
            per_ip_burst: 200,
            max_clients: 0,
            trust_forwarded_for: false,
            allowed_origins: Vec::new(),
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_millis(500),
            header_timeout: Duration::from_secs(5),
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            backlog: 65535,
            reuse_port: false,
            tcp_keepalive: Duration::ZERO,
            socket_send_buffer: 0,
            close_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(30),
            drain_window: Duration::from_secs(10),
            grace: Duration::from_secs(30),
            log_json: false,
            log_level: "info".into(),
        }
    }
}

/// Command-line flags; each overrides the key of the same name.
#[derive(Debug, Parser, Serialize)]
#[command(name = "ws-lb", version, about = "odin-ws load balancer")]
pub struct Cli {
    /// TOML file with settings (keys as in docs/runbook.md).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Client listener (GET /ws, GET /health).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Admin listener (GET /metrics).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_addr: Option<SocketAddr>,
    /// Shard URLs, comma-separated: ws://host:port/ws,...
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_urls: Option<Vec<String>>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker_failure_threshold: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker_timeout: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker_half_open_max_calls: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breaker_success_threshold: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score_window: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score_window_len: Option<usize>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_delay: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handshake_deadline: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt_timeout: Option<String>,
    /// New connections admitted per second (0 = no pacing).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission_rate: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission_burst: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission_max_wait: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission_max_queue: Option<usize>,
    /// New connections per second per client IP (0 = no limit).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_ip_rate: Option<u32>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_ip_burst: Option<u32>,
    /// Clients relayed or being connected at once; beyond it new ones get 503 before
    /// upgrading (0 = derived from the open-files limit: (limit - 64) / 2).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_clients: Option<usize>,
    /// Take the client IP from X-Forwarded-For as set by the GCP load balancer.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_forwarded_for: Option<bool>,
    /// Allowed Origin values, comma-separated (empty = any).
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_origins: Option<Vec<String>>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_interval: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_timeout: Option<String>,
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
    /// Set SO_REUSEPORT so several ws-lb processes share the listen port.
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
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_timeout: Option<String>,
    /// Drop a relayed connection whose client (or shard) takes no byte of what waits for it
    /// for this long.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall_timeout: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_window: Option<String>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace: Option<String>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_json: Option<bool>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

/// The plan's unprefixed environment names for the breaker.
const PLAN_ENV: [&str; 4] = [
    "CIRCUIT_BREAKER_FAILURE_THRESHOLD",
    "CIRCUIT_BREAKER_TIMEOUT",
    "CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS",
    "CIRCUIT_BREAKER_SUCCESS_THRESHOLD",
];

/// Merges defaults, file, environment and flags.
pub fn load(cli: &Cli, prefix: &str) -> anyhow::Result<Settings> {
    let envs = vec![Env::raw().only(&PLAN_ENV), Env::prefixed(prefix)];
    let settings = net_core::config::load(Settings::default(), cli.config.as_deref(), envs, cli)?;
    if settings.backend_urls.is_empty() {
        bail!("no backends: set --backend-urls (or LB_BACKEND_URLS) to ws://host:port/ws,...");
    }
    Ok(settings)
}

#[cfg(test)]
// figment::Jail's closures return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::parse_from(std::iter::once("ws-lb").chain(args.iter().copied()))
    }

    #[test]
    fn plan_env_names_and_precedence() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "4");
            jail.set_env("CIRCUIT_BREAKER_TIMEOUT", "45s");
            jail.set_env("CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS", "2");
            jail.set_env(
                "LB_BACKEND_URLS",
                "ws://127.0.0.1:3002/ws, ws://127.0.0.1:3003/ws",
            );
            jail.create_file("lb.toml", "admission_rate = 7\nbackend_urls = [\"ws://a:1/ws\"]\ncircuit_breaker_failure_threshold = 9")?;
            let s = load(&cli(&["--config", "lb.toml", "--per-ip-rate", "3"]), "LB_")
                .map_err(|e| e.to_string())?;
            assert_eq!(s.circuit_breaker_failure_threshold, 4, "env beats file");
            assert_eq!(s.circuit_breaker_timeout, Duration::from_secs(45));
            assert_eq!(s.circuit_breaker_half_open_max_calls, 2);
            assert_eq!(
                s.backend_urls,
                vec!["ws://127.0.0.1:3002/ws", "ws://127.0.0.1:3003/ws"]
            );
            assert_eq!(s.admission_rate, 7);
            assert_eq!(s.per_ip_rate, 3);
            let s = load(&cli(&["--backend-urls", "ws://x:1/ws,ws://y:2/ws"]), "LB_")
                .map_err(|e| e.to_string())?;
            assert_eq!(s.backend_urls.len(), 2, "flag beats env");
            Ok(())
        });
    }

    #[test]
    fn errors_are_clear() {
        figment::Jail::expect_with(|jail| {
            let err = load(&cli(&[]), "LB_").unwrap_err();
            assert!(err.to_string().contains("no backends"));
            jail.set_env("CIRCUIT_BREAKER_TIMEOUT", "forever");
            let err = load(&cli(&["--backend-urls", "ws://x:1/ws"]), "LB_").unwrap_err();
            assert!(
                format!("{err:#}")
                    .to_lowercase()
                    .contains("circuit_breaker_timeout"),
                "{err:#}"
            );
            Ok(())
        });
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
        for name in ws_lb::metrics::ALL {
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
