//! Command-line flags and their environment variables.
//!
//! Four variables keep the names the capacity test was first specified with (`WS_URL`,
//! `TARGET_CONNECTIONS`, `RAMP_RATE`, `HOLD_SECONDS`); every other flag reads `LOADTEST_<FLAG>` so that generic variables such
//! as `QUIET` or `CHANNELS` in a CI environment never change a run by accident. Flags override
//! the environment, and a later occurrence of a flag overrides an earlier one (the worker
//! re-exec relies on that to replace `--json` and the step's `--rate`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// odin-ws load tool: scheduled connection ramps against any ws:// URL, with handshake and
/// delivery latency, schedule lag, JSON reports and SVG charts.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish timestamped messages to the embedded bus at a scheduled rate.
    Publish(PublishArgs),
    /// Produce timestamped records to Kafka at a scheduled rate.
    KafkaProduce(KafkaProduceArgs),
    /// Consume a Kafka topic from its end and measure produce-to-consumer latency.
    KafkaConsume(KafkaConsumeArgs),
    /// Run librdkafka's in-process mock Kafka cluster (a Kafka-protocol broker on loopback)
    /// until SIGTERM or SIGINT; prints `bootstrap <host:port,...>` and `ready`.
    KafkaBroker(KafkaBrokerArgs),
}

/// Flags of a connection run (the default command).
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// WebSocket URL to connect to (ws:// or wss://); a comma list spreads the connections
    /// over several URLs round-robin (e.g. every shard of a process).
    #[arg(long, env = "WS_URL")]
    pub url: Option<String>,
    /// PEM file of the certificates trusted for wss:// (default: SSL_CERT_FILE, then
    /// /etc/ssl/certs/ca-certificates.crt). The server is verified as the URL's host.
    #[arg(long, env = "LOADTEST_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Connections to attempt in total (across all workers).
    #[arg(long, env = "TARGET_CONNECTIONS", default_value_t = 1000)]
    pub connections: u64,
    /// New connection attempts per second (across all workers).
    #[arg(long, env = "RAMP_RATE", default_value_t = 100.0)]
    pub rate: f64,
    /// How long to hold the connections after the ramp (seconds, or 500ms / 2m).
    #[arg(long, env = "HOLD_SECONDS", default_value = "10")]
    pub hold: String,
    /// Connection lifetime (churn): each connection closes itself (close 1000) this long
    /// after it was established, so a rate can be held for longer than the descriptor limit
    /// allows connections to be held (about rate × lifetime stay open). 0: until the run ends.
    #[arg(long, env = "LOADTEST_LIFETIME", default_value = "0")]
    pub lifetime: String,
    /// Channels: a comma list, each item may hold one {a..b} range (trades.S{0..99}).
    /// Empty: connect without subscribing.
    #[arg(long, env = "LOADTEST_CHANNELS", default_value = "")]
    pub channels: String,
    /// How many of the channels each connection subscribes to.
    #[arg(long, env = "LOADTEST_CHANNELS_PER_CONN", default_value_t = 1)]
    pub channels_per_conn: usize,
    /// Deadline from connect start to the 101 (and again from the 101 to `subscribed`).
    #[arg(long, env = "LOADTEST_HANDSHAKE_TIMEOUT", default_value = "5s")]
    pub handshake_timeout: String,
    /// Without channels, a connection is established when no close frame came within this
    /// window after the 101.
    #[arg(long, env = "LOADTEST_SETTLE", default_value = "100ms")]
    pub settle: String,
    /// Source addresses to bind, round-robin: a range 127.0.0.1-127.0.0.20 or a comma list.
    #[arg(long, env = "LOADTEST_SOURCE_IPS")]
    pub source_ips: Option<String>,
    /// Write the JSON report here.
    #[arg(long, env = "LOADTEST_JSON")]
    pub json: Option<PathBuf>,
    /// Write an SVG chart (active connections, attempts/s, handshake p99 over time) here.
    #[arg(long, env = "LOADTEST_CHART")]
    pub chart: Option<PathBuf>,
    /// Re-dial with backoff after a disconnect, resubscribing with `since`.
    #[arg(long, env = "LOADTEST_RECONNECT")]
    pub reconnect: bool,
    /// With --reconnect: the first re-dial's delay; it doubles per failed attempt (each
    /// jittered to 50-100 %).
    #[arg(long, env = "LOADTEST_RECONNECT_MIN_DELAY", default_value = "100ms")]
    pub reconnect_min_delay: String,
    /// With --reconnect: the largest delay between re-dials (the client libraries' `maxDelay`
    /// is 20s; this default is harsher).
    #[arg(long, env = "LOADTEST_RECONNECT_MAX_DELAY", default_value = "5s")]
    pub reconnect_max_delay: String,
    /// With --reconnect over wss://: every re-dial is a full TLS handshake (by default a
    /// client resumes its own earlier session, as a browser does; a first connection never
    /// resumes).
    #[arg(long, env = "LOADTEST_NO_TLS_RESUME")]
    pub no_tls_resume: bool,
    /// No progress line (the summary is still printed).
    #[arg(long, env = "LOADTEST_QUIET")]
    pub quiet: bool,
    /// Largest frame or message accepted from the server, in bytes.
    #[arg(long, env = "LOADTEST_MAX_MESSAGE", default_value_t = 1 << 20)]
    pub max_message: usize,
    /// Publish during the hold to this URL (the embedded bus' POST /publish).
    #[arg(long, env = "PUBLISH_URL")]
    pub publish_url: Option<String>,
    /// Messages per second to publish during the hold (round-robin over the channels).
    #[arg(long, env = "PUBLISH_RATE", default_value_t = 0.0)]
    pub publish_rate: f64,
    /// Keep-alive HTTP connections the publisher uses.
    #[arg(long, env = "PUBLISH_CONNECTIONS", default_value_t = 4)]
    pub publish_connections: usize,
    /// Pad each published message's data with this many bytes (field `pad`).
    #[arg(long, env = "PUBLISH_PAD_BYTES", default_value_t = 0)]
    pub publish_pad_bytes: usize,
    /// Split the run over this many processes (re-executions of this binary), each with its
    /// share of connections, rate and source addresses.
    #[arg(long, env = "LOADTEST_WORKERS", default_value_t = 1)]
    pub workers: u32,
    /// Run successive short ramps at increasing rates and report the highest one sustained.
    #[arg(long, env = "LOADTEST_FIND_MAX")]
    pub find_max: bool,
    /// find-max: a step fails when its handshake p99 exceeds this.
    #[arg(long, env = "LOADTEST_MAX_P99", default_value = "10ms")]
    pub max_p99: String,
    /// find-max: a step fails when fewer than this fraction of attempts are established.
    #[arg(long, env = "LOADTEST_MIN_SUCCESS", default_value_t = 0.999)]
    pub min_success: f64,
    /// find-max: the rates to try, in order (default 500,1000,2000,3000,5000,7500,10000, then
    /// doubling up to 160000).
    #[arg(long, env = "LOADTEST_FIND_MAX_RATES")]
    pub find_max_rates: Option<String>,
    /// find-max: pause between steps so the server can release the previous step's sockets.
    #[arg(long, env = "LOADTEST_STEP_PAUSE", default_value = "2s")]
    pub step_pause: String,
    /// A token for every connection (visible in `ps`; prefer --token-file). See --token-in.
    #[arg(long, env = "LOADTEST_TOKEN")]
    pub token: Option<String>,
    /// Tokens, one per line; attempt n uses line n mod lines.
    #[arg(long, env = "LOADTEST_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Mint one token per attempt (sub `loadtest-<n>`) with this key before the ramp: the
    /// HS256 secret (first line), or a PEM private key for RS256 / ES256 (PKCS#8 for ES256).
    #[arg(long, env = "LOADTEST_SIGN_KEY")]
    pub sign_key: Option<PathBuf>,
    /// Algorithm of minted tokens.
    #[arg(long, env = "LOADTEST_SIGN_ALG", value_enum, default_value = "HS256")]
    pub sign_alg: crate::token::SignAlg,
    /// `kid` header of minted tokens (selects the JWKS key on the server).
    #[arg(long, env = "LOADTEST_SIGN_KID")]
    pub sign_kid: Option<String>,
    /// `channels` claim of minted tokens: comma list of patterns (exact, `prefix.*`, `*`).
    #[arg(long, env = "LOADTEST_SIGN_CHANNELS", default_value = "*")]
    pub sign_channels: String,
    /// Lifetime of minted tokens (`exp` - `iat`).
    #[arg(long, env = "LOADTEST_SIGN_TTL", default_value = "1h")]
    pub sign_ttl: String,
    /// `aud` claim of minted tokens (none by default).
    #[arg(long, env = "LOADTEST_SIGN_AUD")]
    pub sign_aud: Option<String>,
    /// `iss` claim of minted tokens (none by default).
    #[arg(long, env = "LOADTEST_SIGN_ISS")]
    pub sign_iss: Option<String>,
    /// Where a token goes: `query` (`?token=` on the upgrade) or `message` (a first
    /// `{"type":"auth"}` message after the 101).
    #[arg(long, env = "LOADTEST_TOKEN_IN", value_enum, default_value = "query")]
    pub token_in: crate::token::TokenPlace,
    /// Set by a parent run with --workers: which share this process performs.
    #[arg(long, hide = true)]
    pub worker_index: Option<u32>,
    #[arg(long, hide = true)]
    pub worker_count: Option<u32>,
    /// Set by a parent run with --workers: the common schedule start (Unix milliseconds).
    #[arg(long, hide = true)]
    pub start_at_unix_ms: Option<u64>,
}

/// Flags of `loadtest publish`.
#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// The bus endpoint.
    #[arg(
        long,
        env = "PUBLISH_URL",
        default_value = "http://127.0.0.1:9102/publish"
    )]
    pub publish_url: String,
    /// Messages per second.
    #[arg(long, env = "PUBLISH_RATE", default_value_t = 100.0)]
    pub rate: f64,
    /// Channels, as for a connection run (round-robin).
    #[arg(long, env = "LOADTEST_CHANNELS")]
    pub channels: String,
    /// How long to publish (seconds, or 500ms / 2m).
    #[arg(long, env = "PUBLISH_DURATION", default_value = "10")]
    pub duration: String,
    /// Keep-alive HTTP connections.
    #[arg(long, env = "PUBLISH_CONNECTIONS", default_value_t = 4)]
    pub connections: usize,
    /// Pad each message's data with this many bytes (field `pad`).
    #[arg(long, env = "PUBLISH_PAD_BYTES", default_value_t = 0)]
    pub pad_bytes: usize,
    /// Write the JSON report here.
    #[arg(long, env = "LOADTEST_JSON")]
    pub json: Option<PathBuf>,
    /// No progress line.
    #[arg(long, env = "LOADTEST_QUIET")]
    pub quiet: bool,
}

/// Flags of `loadtest kafka-produce`.
#[derive(Debug, Clone, Args)]
pub struct KafkaProduceArgs {
    /// Bootstrap brokers, host:port[,host:port].
    #[arg(long, env = "LOADTEST_KAFKA_BROKERS")]
    pub brokers: String,
    /// Topic to produce to.
    #[arg(long, env = "LOADTEST_KAFKA_TOPIC")]
    pub topic: String,
    /// Records per second.
    #[arg(long, env = "LOADTEST_KAFKA_RATE", default_value_t = 1000.0)]
    pub rate: f64,
    /// How long to produce (seconds, or 500ms / 2m).
    #[arg(long, env = "LOADTEST_KAFKA_DURATION", default_value = "10")]
    pub duration: String,
    /// Distinct keys (k0 .. k<keys-1>), round-robin.
    #[arg(long, env = "LOADTEST_KAFKA_KEYS", default_value_t = 1000)]
    pub keys: u64,
    /// librdkafka linger.ms: how long a record may wait to be batched (0: sent at once, one
    /// produce request per record; librdkafka's own default is 5).
    #[arg(long, env = "LOADTEST_KAFKA_LINGER_MS", default_value_t = 5)]
    pub linger_ms: u64,
    /// Write the JSON report here.
    #[arg(long, env = "LOADTEST_JSON")]
    pub json: Option<PathBuf>,
}

/// Flags of `loadtest kafka-consume`.
#[derive(Debug, Clone, Args)]
pub struct KafkaConsumeArgs {
    /// Bootstrap brokers, host:port[,host:port].
    #[arg(long, env = "LOADTEST_KAFKA_BROKERS")]
    pub brokers: String,
    /// Topic to consume (every partition, from its end).
    #[arg(long, env = "LOADTEST_KAFKA_TOPIC")]
    pub topic: String,
    /// How long to consume (seconds, or 500ms / 2m).
    #[arg(long, env = "LOADTEST_KAFKA_DURATION", default_value = "10")]
    pub duration: String,
    /// librdkafka fetch.wait.max.ms (ws-shard's kafka_fetch_wait_max default is 10ms).
    #[arg(long, env = "LOADTEST_KAFKA_FETCH_WAIT_MAX", default_value = "10ms")]
    pub fetch_wait_max: String,
    /// Write the JSON report here.
    #[arg(long, env = "LOADTEST_JSON")]
    pub json: Option<PathBuf>,
}

/// Flags of `loadtest kafka-broker`.
#[derive(Debug, Clone, Args)]
pub struct KafkaBrokerArgs {
    /// Topic to create.
    #[arg(long, env = "LOADTEST_KAFKA_TOPIC")]
    pub topic: String,
    /// Partitions of the topic.
    #[arg(long, env = "LOADTEST_KAFKA_PARTITIONS", default_value_t = 3)]
    pub partitions: i32,
    /// Brokers in the mock cluster (partition leaders are spread over them).
    #[arg(long, env = "LOADTEST_KAFKA_MOCK_BROKERS", default_value_t = 1)]
    pub mock_brokers: i32,
}
