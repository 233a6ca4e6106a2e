//! ws-shard settings. Each is defined once, as a field of [`Settings`]: its flag
//! (`--key-with-dashes`), help text, TOML key, environment variable (`WS_<KEY>`) and type
//! come from the field, and its default from the library config that uses it
//! (`ServerConfig::default()` and its parts), which `--help` shows. Precedence: defaults <
//! TOML file (`--config`) < environment < flags. Every key is documented in
//! `docs/runbook.md` with its default (a test below checks both).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgMatches, FromArgMatches, Parser};
use kafka_source::{Isolation, KafkaConfig, StartPosition};
use net_core::cli::{human, CommandLine};
use net_core::config::{EnvSources, Loaded};
use net_core::{HttpLimits, ListenOptions, SocketOptions};
use serde::{Deserialize, Serialize};
use shard_core::{HubConfig, SessionConfig};
use ws_shard::{ServerConfig, SourceConfig};

/// The library defaults the settings' defaults are read from.
fn lib() -> ServerConfig {
    ServerConfig::default()
}

fn kafka() -> KafkaConfig {
    KafkaConfig::default()
}

/// The command line: `--config` and every setting.
#[derive(Debug, Parser)]
#[command(name = "ws-shard", version, about = "odin-ws shard server")]
pub struct Cli {
    /// TOML file with settings (keys as in docs/runbook.md).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
}

/// All settings, flat so that each maps to one env var (`WS_<KEY>`) and one flag.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Number of shards in this process; shard i listens on base-port + i.
    #[arg(long, default_value_t = 3)]
    pub shards: u32,
    /// Port of shard 0.
    #[arg(long, default_value_t = 3002)]
    pub base_port: u16,
    /// Address the shard ports bind to (0.0.0.0 on a VM).
    #[arg(long, default_value_t = IpAddr::from([127, 0, 0, 1]))]
    pub bind: IpAddr,
    /// Admin listener (/metrics, /health of all shards, /publish).
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], 9102)))]
    pub admin_addr: SocketAddr,
    /// Connection slots per shard; the next upgrade gets 503.
    #[arg(long, default_value_t = lib().max_connections)]
    pub max_connections: usize,
    /// Largest client frame or message in bytes; beyond it close 1009.
    #[arg(long, default_value_t = lib().session.max_message_size)]
    pub max_message_size: usize,
    /// Frames queued for one connection before it is closed as a slow consumer (4000).
    #[arg(long, default_value_t = lib().session.outbound_queue)]
    pub outbound_queue: usize,
    /// Server ping after this long without any frame from the client.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().session.ping_interval))]
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Connection closed (1001) after this long without any frame from the client.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().session.idle_timeout))]
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Wait for the client's close frame after the server sent one.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().session.close_timeout))]
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    /// Channels per connection.
    #[arg(long, default_value_t = lib().session.max_subscriptions)]
    pub max_subscriptions: usize,
    /// Client frames per second per connection (0 = unlimited); beyond it close 1008.
    #[arg(long, default_value_t = lib().session.rate_per_sec)]
    pub client_rate: u32,
    /// Frames allowed in a burst before client-rate applies.
    #[arg(long, default_value_t = lib().session.rate_burst)]
    pub client_rate_burst: u32,
    /// On drain, 1012 closes are spread over this window.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().session.drain_window))]
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    /// Deliveries for an idle connection wait this long for more to share their write
    /// (0s = written at once; at most 1s). Trades latency for fewer, larger writes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().session.write_delay))]
    #[serde(with = "humantime_serde")]
    pub write_delay: Duration,
    /// Longest a drain may take before the process stops anyway.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().grace))]
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Messages kept per channel for `since` recovery, as long as history-budget allows.
    #[arg(long, default_value_t = lib().hub.history_len)]
    pub history_len: usize,
    /// Bytes of history and channel bookkeeping per process; beyond it the least recently
    /// used history is evicted (0 = a quarter of the memory the process may use).
    #[arg(long, default_value_t = 0)]
    pub history_budget: usize,
    /// A channel without subscribers leaves the registry after this long without a message.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().hub.channel_idle_timeout))]
    #[serde(with = "humantime_serde")]
    pub channel_idle_timeout: Duration,
    /// Most channels created by subscriptions that carry no message yet, per process
    /// (too_many_channels beyond).
    #[arg(long, default_value_t = lib().hub.max_empty_channels)]
    pub max_empty_channels: usize,
    /// The HTTP request head must arrive within this time (slowloris).
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().http.header_read_timeout))]
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Most header fields in the upgrade request (431 beyond).
    #[arg(long, default_value_t = lib().http.max_headers)]
    pub max_headers: usize,
    /// Most bytes of request head (431 beyond; at least 8192).
    #[arg(long, default_value_t = lib().http.max_header_bytes)]
    pub max_header_bytes: usize,
    /// Listen backlog (the kernel caps it at net.core.somaxconn).
    #[arg(long, default_value_t = ListenOptions::default().backlog)]
    pub backlog: u32,
    /// Set SO_REUSEPORT on shard ports.
    #[arg(long, default_value_t = ListenOptions::default().reuse_port, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub reuse_port: bool,
    /// TCP keep-alive idle time on client sockets (0s = off).
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(lib().socket.keepalive.unwrap_or_default()))]
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// SO_SNDBUF for client sockets in bytes (0 = kernel default).
    #[arg(long, default_value_t = lib().socket.send_buffer.unwrap_or(0))]
    pub socket_send_buffer: usize,
    /// Serve GET /echo on every shard port (conformance testing).
    #[arg(long, default_value_t = lib().echo.is_some(), num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub echo: bool,
    /// Message limit on /echo.
    #[arg(long, default_value_t = SessionConfig::ECHO_MAX_MESSAGE_SIZE)]
    pub echo_max_message_size: usize,
    /// Publish synthetic market ticks on the embedded bus.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub demo_feed: bool,
    /// Demo ticks per second per channel.
    #[arg(long, default_value_t = shard_core::source::demo::DEFAULT_RATE)]
    pub demo_rate: u32,
    /// Kafka brokers host:port,... (none given: the embedded bus).
    #[arg(long, value_delimiter = ',')]
    #[serde(deserialize_with = "net_core::config::list")]
    pub kafka_brokers: Vec<String>,
    /// Kafka topics to fan out, comma-separated.
    #[arg(long, value_delimiter = ',')]
    #[serde(deserialize_with = "net_core::config::list")]
    pub kafka_topics: Vec<String>,
    /// Where consumption starts per partition: `latest` or `back:<records>`.
    #[arg(long, default_value_t = kafka().start)]
    pub kafka_start: StartPosition,
    /// Channel of a record: {topic} and {key} are replaced.
    #[arg(long, default_value_t = kafka().channel_template)]
    pub kafka_channel_template: String,
    /// librdkafka fetch.wait.max.ms: longest the broker holds a fetch waiting for data.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(kafka().fetch_wait_max))]
    #[serde(with = "humantime_serde")]
    pub kafka_fetch_wait_max: Duration,
    /// Longest the shard reports `starting` (no new clients from ws-lb) while the
    /// `back:<n>` warm-up re-reads history.
    #[arg(long, value_parser = humantime::parse_duration, default_value = human(kafka().warmup_timeout))]
    #[serde(with = "humantime_serde")]
    pub kafka_warmup_timeout: Duration,
    /// Extra librdkafka properties, comma-separated key=value (applied last).
    #[arg(long, value_delimiter = ',')]
    #[serde(deserialize_with = "net_core::config::list")]
    pub kafka_properties: Vec<String>,
    /// HS256 secrets file, one secret (>= 32 bytes) per line; empty = none. With this or
    /// auth_jwks_file set, authentication is on. Use the same files as ws-lb.
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
    /// Log JSON lines instead of text.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub log_json: bool,
    /// Log filter (RUST_LOG syntax).
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
    pub fn server_config(&self) -> anyhow::Result<ServerConfig> {
        let session = SessionConfig {
            max_message_size: self.max_message_size,
            outbound_queue: self.outbound_queue,
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            close_timeout: self.close_timeout,
            max_subscriptions: self.max_subscriptions,
            rate_per_sec: self.client_rate,
            rate_burst: self.client_rate_burst,
            drain_window: self.drain_window,
            write_delay: self.write_delay,
        }
        .validate()?;
        let echo = self
            .echo
            .then(|| session.echo(self.echo_max_message_size).validate())
            .transpose()?;
        Ok(ServerConfig {
            max_connections: self.max_connections,
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
            session,
            echo,
            hub: HubConfig {
                history_len: self.history_len,
                history_budget: match self.history_budget {
                    0 => auto_history_budget(),
                    n => n,
                },
                channel_idle_timeout: self.channel_idle_timeout,
                max_empty_channels: self.max_empty_channels,
            }
            .validate()?,
            http: HttpLimits {
                header_read_timeout: self.header_timeout,
                max_headers: self.max_headers,
                max_header_bytes: self.max_header_bytes,
            },
            socket: SocketOptions {
                keepalive: (!self.tcp_keepalive.is_zero()).then_some(self.tcp_keepalive),
                send_buffer: (self.socket_send_buffer > 0).then_some(self.socket_send_buffer),
            },
            source: if self.kafka_brokers.is_empty() {
                SourceConfig::Embedded {
                    demo_rate: self.demo_feed.then_some(self.demo_rate),
                }
            } else {
                SourceConfig::Kafka(self.kafka_config()?)
            },
            grace: self.grace,
        })
    }

    fn kafka_config(&self) -> anyhow::Result<KafkaConfig> {
        Ok(KafkaConfig {
            brokers: self.kafka_brokers.join(","),
            topics: self.kafka_topics.clone(),
            start: self.kafka_start,
            channel_template: self.kafka_channel_template.clone(),
            fetch_wait_max: self.kafka_fetch_wait_max,
            warmup_timeout: self.kafka_warmup_timeout,
            isolation: Isolation::Process {
                exe: std::env::current_exe().context("locating the ws-shard binary")?,
            },
            overrides: self
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
        }
        .validate()?)
    }

    /// How the shard listeners are bound.
    pub fn listen_options(&self) -> ListenOptions {
        ListenOptions {
            backlog: self.backlog,
            reuse_port: self.reuse_port,
        }
    }
}

/// `history_budget = 0`: a quarter of the memory this process may use (its cgroup limit or
/// the machine's memory), at least the minimum; the library default where neither can be
/// read.
fn auto_history_budget() -> usize {
    net_core::limits::memory_limit()
        .map_or(lib().hub.history_budget, |bytes| {
            usize::try_from(bytes / 4).unwrap_or(usize::MAX)
        })
        .max(shard_core::config::MIN_HISTORY_BUDGET)
}

/// Merges defaults, file, environment (`env`) and the flags given in `matches` (parsed with
/// [`Cli`]).
pub fn load(matches: &ArgMatches, prefix: &str) -> anyhow::Result<Loaded<Settings>> {
    let cli = Cli::from_arg_matches(matches)?;
    let flags = CommandLine::new(&cli.settings, matches)?;
    let env = EnvSources { prefix, raw: &[] };
    let loaded = net_core::config::load(Settings::default(), cli.config.as_deref(), env, &flags)?;
    let settings = &loaded.settings;
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
    Ok(loaded)
}

/// The prefix of ws-shard's environment variables. Prefixed variables that name no setting
/// are ignored with a warning (`WS_URL`, for one, is the load tool's).
pub const ENV_PREFIX: &str = "WS_";

#[cfg(test)]
// figment::Jail's closures return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn cli(args: &[&str]) -> ArgMatches {
        Cli::command().get_matches_from(std::iter::once("ws-shard").chain(args.iter().copied()))
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
            let s = load(&c, ENV_PREFIX).map_err(|e| e.to_string())?.settings;
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
            // A flag given with its default value still beats the environment.
            let s = load(&cli(&["--shards", "3"]), ENV_PREFIX)
                .map_err(|e| e.to_string())?
                .settings;
            assert_eq!(s.shards, 3);
            Ok(())
        });
    }

    #[test]
    fn unknown_env_keys_are_ignored() {
        figment::Jail::expect_with(|jail| {
            // The load tool's own variable, set in the same shell.
            jail.set_env("WS_URL", "ws://x/ws");
            jail.set_env("WS_SHARDS", "2");
            let loaded = load(&cli(&[]), ENV_PREFIX).map_err(|e| e.to_string())?;
            assert_eq!(loaded.settings.shards, 2);
            assert_eq!(loaded.ignored_env, ["WS_URL"]);
            Ok(())
        });
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "max_conections = 10")?;
            let err = load(&cli(&["--config", "bad.toml"]), ENV_PREFIX).unwrap_err();
            assert!(format!("{err:#}").contains("max_conections"), "{err:#}");
            jail.set_env("WS_PING_INTERVAL", "soon");
            let err = load(&cli(&[]), ENV_PREFIX).unwrap_err();
            assert!(
                format!("{err:#}").to_lowercase().contains("ping_interval"),
                "{err:#}"
            );
            jail.set_env("WS_PING_INTERVAL", "25s");
            jail.set_env("WS_KAFKA_START", "earliest");
            let err = load(&cli(&[]), ENV_PREFIX).unwrap_err();
            assert!(format!("{err:#}").contains("back:<records>"), "{err:#}");
            Ok(())
        });
        let err = load(&cli(&["--config", "/nonexistent.toml"]), ENV_PREFIX).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
        assert!(load(&cli(&["--shards", "0"]), "WS_TEST_NONE_").is_err());
        let err = Cli::command()
            .try_get_matches_from(["ws-shard", "--kafka-start", "soon"])
            .unwrap_err();
        assert!(err.to_string().contains("--kafka-start"), "{err}");
        let s = Settings {
            ping_interval: Duration::from_secs(90),
            ..Settings::default()
        };
        assert!(s
            .server_config()
            .unwrap_err()
            .to_string()
            .contains("ping_interval"));
    }

    #[test]
    fn defaults_are_the_library_defaults() {
        let s = Settings::default();
        let mut cfg = s.server_config().unwrap();
        // The one setting whose default the binary derives from the machine (a quarter of
        // its memory) rather than taking the library's fixed one.
        assert_eq!(s.history_budget, 0);
        assert_eq!(cfg.hub.history_budget, auto_history_budget());
        assert!(cfg.hub.history_budget >= shard_core::config::MIN_HISTORY_BUDGET);
        cfg.hub.history_budget = ServerConfig::default().hub.history_budget;
        assert_eq!(format!("{cfg:?}"), format!("{:?}", ServerConfig::default()));
        let echo = Settings {
            echo: true,
            ..Settings::default()
        };
        let echo = echo.server_config().unwrap().echo.unwrap();
        assert_eq!(echo.max_message_size, SessionConfig::ECHO_MAX_MESSAGE_SIZE);
        assert_eq!(echo.rate_per_sec, 0);
        assert_eq!(s.kafka_start, KafkaConfig::default().start);
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
        let table = net_core::cli::runbook_table(runbook, "ws-shard");
        let settings = serde_json::to_value(Settings::default()).unwrap();
        let gaps = net_core::cli::runbook_gaps(table, &settings);
        assert!(gaps.is_empty(), "docs/runbook.md: {gaps:#?}");
        for name in shard_core::metrics::ALL.iter().chain(kafka_source::ALL) {
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
