//! ws-lb settings. Each is defined once, as a field of [`Settings`]: its flag
//! (`--key-with-dashes`), help text, TOML key, environment variable (`LB_<KEY>`) and type
//! come from the field, and its default from the library config that uses it
//! (`LbConfig::default()`), which `--help` shows. Precedence: defaults < TOML file
//! (`--config`) < environment < flags. Every key is documented in `docs/runbook.md` with its
//! default (a test below checks both).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{ArgMatches, FromArgMatches, Parser};
use lb_core::ConfigError;
use net_core::cli::{human, CommandLine};
use net_core::config::{EnvSources, Loaded};
use net_core::{HttpLimits, ListenOptions, SocketOptions};
use serde::{Deserialize, Serialize};
use ws_lb::{LbConfig, PerIpLimit};

/// The library defaults the settings' defaults are read from.
fn lib() -> LbConfig {
    LbConfig::default()
}

/// The command line: `--config` and every setting.
#[derive(Debug, Parser)]
#[command(name = "ws-lb", version, about = "odin-ws load balancer")]
pub struct Cli {
    /// TOML file with settings (keys as in docs/runbook.md).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
}

/// All settings, flat: each key maps to `LB_<KEY>` and to `--<key-with-dashes>`.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Client listener (GET /ws, GET /health).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], 3001)))]
    pub listen: SocketAddr,
    /// Admin listener (GET /metrics); 0.0.0.0:9101 where Prometheus scrapes.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], 9101)))]
    pub admin_addr: SocketAddr,
    /// Shard URLs, comma-separated: ws://host:port/ws,... (a fixed set, resolved once at
    /// start). Exactly one of backend_urls, backend_file and backend_dns is required.
    #[arg(long, value_delimiter = ',')]
    #[serde(deserialize_with = "net_core::config::list")]
    pub backend_urls: Vec<String>,
    /// File with one shard URL per line (# comments); re-read when it changes and on
    /// SIGHUP; empty = not used.
    #[arg(long, default_value = "")]
    pub backend_file: String,
    /// ws://name:port/path whose name resolves to one address per shard, re-resolved every
    /// membership_interval; empty = not used.
    #[arg(long, default_value = "")]
    pub backend_dns: String,
    /// How often backend_file is checked for changes or backend_dns resolved (also the DNS
    /// lookup's time limit).
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().membership_interval))]
    #[serde(with = "humantime_serde")]
    pub membership_interval: Duration,
    /// A shard that joins takes this long to reach its full share of new connections
    /// (weight ramps from 10 %); 0s = at once.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().slow_start))]
    #[serde(with = "humantime_serde")]
    pub slow_start: Duration,
    /// Consecutive failed handshakes that open a shard's breaker (also env
    /// CIRCUIT_BREAKER_FAILURE_THRESHOLD).
    #[arg(long, default_value_t = lib().breaker.failure_threshold)]
    pub circuit_breaker_failure_threshold: u32,
    /// How long an open breaker refuses before trial handshakes (also env
    /// CIRCUIT_BREAKER_TIMEOUT).
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().breaker.open_timeout))]
    #[serde(with = "humantime_serde")]
    pub circuit_breaker_timeout: Duration,
    /// Trial handshakes at once while half-open (also env
    /// CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS).
    #[arg(long, default_value_t = lib().breaker.half_open_max_calls)]
    pub circuit_breaker_half_open_max_calls: u32,
    /// Successful trials that close a half-open breaker (also env
    /// CIRCUIT_BREAKER_SUCCESS_THRESHOLD).
    #[arg(long, default_value_t = lib().breaker.success_threshold)]
    pub circuit_breaker_success_threshold: u32,
    /// Handshake outcomes older than this leave a shard's failure rate.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().score.window))]
    #[serde(with = "humantime_serde")]
    pub score_window: Duration,
    /// Most handshake outcomes remembered per shard.
    #[arg(long, default_value_t = lib().score.window_len)]
    pub score_window_len: usize,
    /// Pause before trying the next shard.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().retry.delay))]
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
    /// Budget for all attempts of one client.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().retry.deadline))]
    #[serde(with = "humantime_serde")]
    pub handshake_deadline: Duration,
    /// Budget for one shard (TCP connect + WebSocket handshake).
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().retry.attempt_timeout))]
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// New connections admitted per second (0 = no pacing).
    #[arg(long, default_value_t = lib().pacing.rate)]
    pub admission_rate: u32,
    /// Admissions allowed back to back before pacing applies.
    #[arg(long, default_value_t = lib().pacing.burst)]
    pub admission_burst: u32,
    /// Longest wait in the admission queue; beyond it the client gets 1013.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().pacing.max_wait))]
    #[serde(with = "humantime_serde")]
    pub admission_max_wait: Duration,
    /// Most clients waiting for admission at once; beyond it the client gets 1013.
    #[arg(long, default_value_t = lib().pacing.max_queue)]
    pub admission_max_queue: usize,
    /// New connections per second per client IP (0 = no limit); beyond it HTTP 429.
    #[arg(long, default_value_t = lib().per_ip.map_or(0, |l| l.per_second))]
    pub per_ip_rate: u32,
    /// Per-IP burst allowance.
    #[arg(long, default_value_t = lib().per_ip.map_or(0, |l| l.burst))]
    pub per_ip_burst: u32,
    /// Clients relayed or being connected at once; beyond it new ones get 503 before
    /// upgrading (0 = derived from the open-files limit: (limit - 64) / 2).
    #[arg(long, default_value_t = 0)]
    pub max_clients: usize,
    /// Take the client IP from X-Forwarded-For as set by the GCP load balancer.
    #[arg(long, default_value_t = lib().trust_forwarded_for, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub trust_forwarded_for: bool,
    /// Allowed Origin values, comma-separated (none given = any Origin; for local runs only).
    #[arg(long, value_delimiter = ',')]
    #[serde(deserialize_with = "net_core::config::list")]
    pub allowed_origins: Vec<String>,
    /// How often each shard's /health is polled.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().health_interval))]
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// Timeout of one /health poll.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().health_timeout))]
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
    /// The HTTP request head must arrive within this time (slowloris).
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().http.header_read_timeout))]
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Most header fields in a request (431 beyond).
    #[arg(long, default_value_t = lib().http.max_headers)]
    pub max_headers: usize,
    /// Most bytes of request head (431 beyond; at least 8192).
    #[arg(long, default_value_t = lib().http.max_header_bytes)]
    pub max_header_bytes: usize,
    /// Listen backlog (the kernel caps it at net.core.somaxconn).
    #[arg(long, default_value_t = ListenOptions::default().backlog)]
    pub backlog: u32,
    /// Set SO_REUSEPORT so several ws-lb processes share the listen port.
    #[arg(long, default_value_t = ListenOptions::default().reuse_port, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub reuse_port: bool,
    /// TCP keep-alive idle time on client sockets (0s = off).
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().socket.keepalive.unwrap_or_default()))]
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// SO_SNDBUF for client sockets in bytes (0 = kernel default).
    #[arg(long, default_value_t = lib().socket.send_buffer.unwrap_or(0))]
    pub socket_send_buffer: usize,
    /// Wait for a client's close frame after the LB sent one.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().close_timeout))]
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    /// Drop a relayed connection whose client (or shard) takes no byte of what waits for it
    /// for this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().stall_timeout))]
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// On drain, 1012 closes are spread over this window.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().drain_window))]
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    /// Longest a drain may take before the process stops anyway.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().grace))]
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// HS256 secrets file, one secret (>= 32 bytes) per line; empty = none. With this or
    /// auth_jwks_file set, authentication is on.
    #[arg(long, default_value = "")]
    pub auth_hs256_secret_file: String,
    /// JWKS file with RS256 / ES256 public keys; empty = none. Re-read when it changes.
    #[arg(long, default_value = "")]
    pub auth_jwks_file: String,
    /// Required token audience (aud); empty = tokens must carry no aud.
    #[arg(long, default_value = "")]
    pub auth_audience: String,
    /// Required token issuer (iss); empty = not checked.
    #[arg(long, default_value = "")]
    pub auth_issuer: String,
    /// Clock skew tolerated on exp and nbf.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().auth.leeway))]
    #[serde(with = "humantime_serde")]
    pub auth_leeway: Duration,
    /// Longest token accepted in bytes (longer: 4001 without parsing).
    #[arg(long, default_value_t = lib().auth.max_token_len)]
    pub auth_max_token_len: usize,
    /// How often the key files are checked for changes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().auth.reload_interval))]
    #[serde(with = "humantime_serde")]
    pub auth_reload_interval: Duration,
    /// Tokens kept in the verified-token cache (a token seen again skips its signature
    /// check; emptied when the keys change); 0 = no cache.
    #[arg(long, default_value_t = lib().auth.cache_entries)]
    pub auth_cache_entries: usize,
    /// Bytes the verified-token cache may hold; 0 = no cache.
    #[arg(long, default_value_t = lib().auth.cache_bytes)]
    pub auth_cache_bytes: usize,
    /// Channel patterns anyone may subscribe to without a token, comma-separated
    /// (e.g. trades.*,book.*); auto = every channel when auth is off, none when on.
    #[arg(long, default_value = "auto")]
    pub public_channels: String,
    /// With auth on and no ?token=, the first message must arrive within this time.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().auth_timeout))]
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// Connections per token subject (sub) in this process; beyond it close 4003 (0 = no limit).
    #[arg(long, default_value_t = lib().max_connections_per_sub)]
    pub max_connections_per_sub: usize,
    /// Experimental: carry clients to each shard as streams of one TCP connection per shard
    /// (the tier link, GET /mux on the shard's port) instead of one connection per client.
    #[arg(long, default_value_t = lib().tier_mux, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub tier_mux: bool,
    /// Log JSON lines instead of text.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub log_json: bool,
    /// Log filter (RUST_LOG syntax, e.g. info,ws_lb=debug).
    #[arg(long, default_value = "info")]
    pub log_level: String,
}

impl Default for Settings {
    fn default() -> Self {
        net_core::cli::defaults()
    }
}

impl Settings {
    /// The validated library config these settings describe.
    pub fn lb_config(&self) -> Result<LbConfig, ConfigError> {
        LbConfig {
            backends: self.backend_urls.clone(),
            membership: self.membership_source(),
            membership_interval: self.membership_interval,
            slow_start: self.slow_start,
            breaker: lb_core::BreakerConfig::try_new(
                self.circuit_breaker_failure_threshold,
                self.circuit_breaker_timeout,
                self.circuit_breaker_half_open_max_calls,
                self.circuit_breaker_success_threshold,
            )?,
            score: lb_core::ScoreConfig::try_new(self.score_window, self.score_window_len)?,
            retry: lb_core::RetryConfig::try_new(
                self.retry_delay,
                self.handshake_deadline,
                self.attempt_timeout,
            )?,
            pacing: lb_core::PacingConfig::try_new(
                self.admission_rate,
                self.admission_burst,
                self.admission_max_wait,
                self.admission_max_queue,
            )?,
            per_ip: (self.per_ip_rate > 0).then_some(PerIpLimit {
                per_second: self.per_ip_rate,
                burst: self.per_ip_burst.max(1),
            }),
            max_clients: match self.max_clients {
                // A relayed client holds its own socket, and one to its shard unless the
                // tier link carries it.
                0 => {
                    net_core::limits::clients_for_open_files(if self.tier_mux { 1 } else { 2 }, 64)
                }
                n => n,
            },
            trust_forwarded_for: self.trust_forwarded_for,
            allowed_origins: self.allowed_origins.clone(),
            health_interval: self.health_interval,
            health_timeout: self.health_timeout,
            http: HttpLimits {
                header_read_timeout: self.header_timeout,
                max_headers: self.max_headers,
                max_header_bytes: self.max_header_bytes,
            },
            socket: SocketOptions {
                keepalive: (!self.tcp_keepalive.is_zero()).then_some(self.tcp_keepalive),
                send_buffer: (self.socket_send_buffer > 0).then_some(self.socket_send_buffer),
            },
            close_timeout: self.close_timeout,
            stall_timeout: self.stall_timeout,
            drain_window: self.drain_window,
            grace: self.grace,
            auth: auth::AuthConfig::from_settings(
                &self.auth_hs256_secret_file,
                &self.auth_jwks_file,
                &self.auth_audience,
                &self.auth_issuer,
                self.auth_leeway,
                self.auth_max_token_len,
                &self.public_channels,
                self.auth_reload_interval,
            )
            .with_cache(self.auth_cache_entries, self.auth_cache_bytes),
            auth_timeout: self.auth_timeout,
            max_connections_per_sub: self.max_connections_per_sub,
            tier_mux: self.tier_mux,
        }
        .validate()
    }

    /// The membership source these settings name (static when neither a file nor a DNS
    /// name is set).
    pub fn membership_source(&self) -> ws_lb::MembershipSource {
        if !self.backend_file.is_empty() {
            ws_lb::MembershipSource::File(PathBuf::from(&self.backend_file))
        } else if !self.backend_dns.is_empty() {
            ws_lb::MembershipSource::Dns(self.backend_dns.clone())
        } else {
            ws_lb::MembershipSource::Static
        }
    }

    /// How the client listener is bound.
    pub fn listen_options(&self) -> ListenOptions {
        ListenOptions {
            backlog: self.backlog,
            reuse_port: self.reuse_port,
        }
    }
}

/// Unprefixed environment names for the breaker settings, which deployments set as they are
/// (docs/runbook.md); an `LB_` variable of the same key wins.
const UNPREFIXED_ENV: [&str; 4] = [
    "CIRCUIT_BREAKER_FAILURE_THRESHOLD",
    "CIRCUIT_BREAKER_TIMEOUT",
    "CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS",
    "CIRCUIT_BREAKER_SUCCESS_THRESHOLD",
];

/// Merges defaults, file, environment (variables with `prefix`) and the flags given in
/// `matches` (parsed with [`Cli`]). `LB_*` variables that name no setting come back in
/// `ignored_env`, not as an error: the environment is shared with other tools.
pub fn load(matches: &ArgMatches, prefix: &str) -> anyhow::Result<Loaded<Settings>> {
    let cli = Cli::from_arg_matches(matches)?;
    let flags = CommandLine::new(&cli.settings, matches)?;
    let env = EnvSources {
        prefix,
        raw: &UNPREFIXED_ENV,
    };
    let loaded = net_core::config::load(Settings::default(), cli.config.as_deref(), env, &flags)?;
    let s = &loaded.settings;
    let sources = [
        !s.backend_urls.is_empty(),
        !s.backend_file.is_empty(),
        !s.backend_dns.is_empty(),
    ];
    match sources.iter().filter(|set| **set).count() {
        0 => bail!(
            "no backends: set --backend-urls (or LB_BACKEND_URLS) to ws://host:port/ws,..., \
             --backend-file to a file of such URLs, or --backend-dns to ws://name:port/ws"
        ),
        1 => {}
        _ => bail!("backend_urls, backend_file and backend_dns are exclusive: set one"),
    }
    Ok(loaded)
}

#[cfg(test)]
// figment::Jail's closures return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn cli(args: &[&str]) -> ArgMatches {
        Cli::command().get_matches_from(std::iter::once("ws-lb").chain(args.iter().copied()))
    }

    #[test]
    fn unprefixed_breaker_env_names_and_precedence() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CIRCUIT_BREAKER_FAILURE_THRESHOLD", "4");
            jail.set_env("CIRCUIT_BREAKER_TIMEOUT", "45s");
            jail.set_env("CIRCUIT_BREAKER_HALF_OPEN_MAX_CALLS", "2");
            jail.set_env(
                "LB_BACKEND_URLS",
                "ws://127.0.0.1:3002/ws, ws://127.0.0.1:3003/ws",
            );
            jail.create_file("lb.toml", "admission_rate = 7\nbackend_urls = [\"ws://a:1/ws\"]\ncircuit_breaker_failure_threshold = 9\nper_ip_rate = 8")?;
            let s = load(&cli(&["--config", "lb.toml", "--per-ip-rate", "3"]), "LB_")
                .map_err(|e| e.to_string())?
                .settings;
            assert_eq!(s.circuit_breaker_failure_threshold, 4, "env beats file");
            assert_eq!(s.circuit_breaker_timeout, Duration::from_secs(45));
            assert_eq!(s.circuit_breaker_half_open_max_calls, 2);
            assert_eq!(
                s.backend_urls,
                vec!["ws://127.0.0.1:3002/ws", "ws://127.0.0.1:3003/ws"]
            );
            assert_eq!(s.admission_rate, 7, "file beats default");
            assert_eq!(s.per_ip_rate, 3, "flag beats file");
            assert_eq!(s.close_timeout, Duration::from_secs(5), "default");
            let s = load(&cli(&["--backend-urls", "ws://x:1/ws,ws://y:2/ws"]), "LB_")
                .map_err(|e| e.to_string())?
                .settings;
            assert_eq!(s.backend_urls.len(), 2, "flag beats env");
            // A flag given with its default value still beats the environment.
            jail.set_env("LB_ADMISSION_RATE", "9");
            let default = lib().pacing.rate;
            let s = load(&cli(&["--admission-rate", &default.to_string()]), "LB_")
                .map_err(|e| e.to_string())?
                .settings;
            assert_eq!(s.admission_rate, default);
            Ok(())
        });
    }

    #[test]
    fn unknown_env_keys_are_ignored_but_file_keys_and_bad_values_are_errors() {
        figment::Jail::expect_with(|jail| {
            // `make run` once exported LB_PORT for its own script; it must not stop ws-lb.
            jail.set_env("LB_PORT", "3001");
            jail.set_env("LB_ADMISSION_RATE", "9");
            let loaded =
                load(&cli(&["--backend-urls", "ws://x:1/ws"]), "LB_").map_err(|e| e.to_string())?;
            assert_eq!(loaded.settings.admission_rate, 9, "known keys still apply");
            assert_eq!(loaded.ignored_env, ["LB_PORT"]);

            jail.set_env("LB_ADMISSION_RATE", "many");
            let err = load(&cli(&["--backend-urls", "ws://x:1/ws"]), "LB_").unwrap_err();
            assert!(
                format!("{err:#}").to_lowercase().contains("admission_rate"),
                "{err:#}"
            );
            jail.set_env("LB_ADMISSION_RATE", "9");

            jail.create_file("lb.toml", "port = 1")?;
            let err = load(
                &cli(&["--config", "lb.toml", "--backend-urls", "ws://x:1/ws"]),
                "LB_",
            )
            .unwrap_err();
            assert!(format!("{err:#}").contains("port"), "{err:#}");
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
        let err = Cli::command()
            .try_get_matches_from(["ws-lb", "--close-timeout", "soon"])
            .unwrap_err();
        assert!(err.to_string().contains("--close-timeout"), "{err}");
        let zero = Settings {
            stall_timeout: Duration::ZERO,
            ..Settings::default()
        };
        assert_eq!(zero.lb_config().unwrap_err().key, "stall_timeout");
    }

    #[test]
    fn exactly_one_membership_source() {
        figment::Jail::expect_with(|_| {
            let s = load(&cli(&["--backend-file", "/etc/odin/shards"]), "LB_")
                .map_err(|e| e.to_string())?
                .settings;
            assert_eq!(
                s.membership_source(),
                ws_lb::MembershipSource::File("/etc/odin/shards".into())
            );
            let s = load(
                &cli(&["--backend-dns", "ws://shards.odin.internal:3002/ws"]),
                "LB_",
            )
            .map_err(|e| e.to_string())?
            .settings;
            assert!(matches!(
                s.membership_source(),
                ws_lb::MembershipSource::Dns(_)
            ));
            let err = load(
                &cli(&["--backend-file", "f", "--backend-urls", "ws://x:1/ws"]),
                "LB_",
            )
            .unwrap_err();
            assert!(err.to_string().contains("exclusive"), "{err}");
            Ok(())
        });
        let zero = Settings {
            membership_interval: Duration::ZERO,
            ..Settings::default()
        };
        assert_eq!(zero.lb_config().unwrap_err().key, "membership_interval");
    }

    #[test]
    fn defaults_are_the_library_defaults() {
        let s = Settings::default();
        let mut cfg = s.lb_config().unwrap();
        let lib = LbConfig::default();
        // The one setting whose 0 means something else in the binary (derived from the
        // open-files limit) than in the library (no cap).
        assert_eq!(s.max_clients, 0);
        cfg.max_clients = lib.max_clients;
        assert_eq!(format!("{cfg:?}"), format!("{lib:?}"));
        assert_eq!(s.listen_options().backlog, ListenOptions::default().backlog);
        Cli::command().debug_assert();
    }

    #[test]
    fn help_shows_every_flag_with_a_description_and_its_default() {
        let help = Cli::command().render_long_help().to_string();
        let settings = serde_json::to_value(Settings::default()).unwrap();
        let gaps = net_core::cli::help_gaps(&help, &settings);
        assert!(gaps.is_empty(), "{gaps:#?}");
    }

    #[test]
    fn runbook_documents_every_key_with_its_default_every_metric_and_close_code() {
        let runbook = include_str!("../../../docs/runbook.md");
        let table = net_core::cli::runbook_table(runbook, "ws-lb");
        let settings = serde_json::to_value(Settings::default()).unwrap();
        let gaps = net_core::cli::runbook_gaps(table, &settings);
        assert!(gaps.is_empty(), "docs/runbook.md: {gaps:#?}");
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
