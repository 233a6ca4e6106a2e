//! The Kafka source: every partition of the configured topics, consumed once per shard
//! process (fan-out, not work-sharing), published into the hub.
//!
//! Two halves talk over a byte pipe ([`wire`]): the [`consumer`] (librdkafka) and this
//! crate's root, which turns records into positioned publications for the shard-core hub. The consumer normally runs as a
//! child process so a librdkafka crash never takes the shard's clients down; this side
//! restarts it with the exact next offset of every partition, so a restart loses and repeats
//! nothing.
//!
//! Positions: `seq` is the record's offset; `epoch` is `<topic>-<partition>-<generation>`,
//! the generation being the timestamp of the first record of the partition's log. Every
//! shard process reading the same partition computes the same epoch without talking to the
//! others, and a recreated partition (shorter log, offsets from 0 again) gets a new one, so a
//! position from the old partition is never trusted.

pub mod consumer;
pub mod wire;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Histogram};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use ws_protocol::ChannelName;

use self::consumer::ConsumerConfig;
use self::wire::{Assigned, Event, Record};
use config_core::ConfigError;
use shard_core::hub::{Hub, Publication};
use shard_core::source::{MessageSource, SourceError, SourceStatus};

/// Counter: records consumed, label `topic`.
pub const RECORDS: &str = "ws_kafka_records_total";
/// Counter: records skipped, labels `topic`, `reason` (invalid_json, no_key, bad_channel).
pub const INVALID: &str = "ws_kafka_invalid_records_total";
/// Gauge: records behind the high-water mark, labels `topic`, `partition`.
pub const LAG: &str = "ws_kafka_consumer_lag";
/// Histogram: seconds from the record's timestamp to the end of its fan-out.
pub const RECORD_TO_FANOUT: &str = "ws_kafka_record_to_fanout_seconds";
/// Gauge: 1 while at least one broker connection is up.
pub const CONNECTED: &str = "ws_kafka_connected";
/// Counter: consumer restarts, label `reason` (recreated, exited, crashed).
pub const RESTARTS: &str = "ws_kafka_consumer_restarts_total";
/// Every Kafka metric name.
pub const ALL: &[&str] = &[RECORDS, INVALID, LAG, RECORD_TO_FANOUT, CONNECTED, RESTARTS];

/// Where consumption starts in a partition seen for the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StartPosition {
    /// At the high-water mark: only new records.
    Latest,
    /// `n` records before the high-water mark (bounded by the log start), to warm the
    /// history rings so clients reconnecting right after a restart can recover.
    Back(u64),
}

impl std::str::FromStr for StartPosition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "latest" {
            return Ok(Self::Latest);
        }
        s.strip_prefix("back:")
            .and_then(|n| n.parse().ok())
            .map(Self::Back)
            .ok_or_else(|| format!("expected `latest` or `back:<records>`, got {s:?}"))
    }
}

impl TryFrom<String> for StartPosition {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<StartPosition> for String {
    fn from(p: StartPosition) -> Self {
        p.to_string()
    }
}

impl std::fmt::Display for StartPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartPosition::Latest => f.write_str("latest"),
            StartPosition::Back(n) => write!(f, "back:{n}"),
        }
    }
}

/// Where the librdkafka consumer runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// A child process: `<exe> kafka-consumer` (the ws-shard binary itself).
    Process { exe: PathBuf },
    /// A task of this process (tests; nothing protects the process from librdkafka).
    InProcess,
}

/// Kafka source settings.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port]`.
    pub brokers: String,
    pub topics: Vec<String>,
    pub start: StartPosition,
    /// Channel of a record; `{topic}` and `{key}` are replaced.
    pub channel_template: String,
    /// librdkafka `fetch.wait.max.ms`.
    pub fetch_wait_max: Duration,
    /// Longest the shard reports `starting` while the `back:<n>` warm-up re-reads history;
    /// after it, the shard takes clients even if the warm-up is not over (logged).
    pub warmup_timeout: Duration,
    /// Extra librdkafka properties, applied last.
    pub overrides: Vec<(String, String)>,
    pub isolation: Isolation,
}

impl Default for KafkaConfig {
    /// No brokers and no topics (they have no sensible default and `validate` requires
    /// them); the consumer runs in this process, as in tests: the ws-shard binary sets
    /// [`Isolation::Process`].
    fn default() -> Self {
        Self {
            brokers: String::new(),
            topics: Vec::new(),
            start: StartPosition::Latest,
            channel_template: "{topic}.{key}".into(),
            fetch_wait_max: Duration::from_millis(10),
            warmup_timeout: Duration::from_secs(30),
            overrides: Vec::new(),
            isolation: Isolation::InProcess,
        }
    }
}

impl KafkaConfig {
    /// Checks the settings.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(ConfigError::new("kafka_brokers", "must not be empty"));
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(ConfigError::new(
                "kafka_topics",
                "must name at least one topic",
            ));
        }
        if !self.channel_template.contains("{key}") && !self.channel_template.contains("{topic}") {
            return Err(ConfigError::new(
                "kafka_channel_template",
                "must use {topic} or {key}",
            ));
        }
        Ok(self)
    }
}

/// Maps a record to its channel name.
pub fn channel_for(
    template: &str,
    topic: &str,
    key: &str,
) -> Result<ChannelName, ws_protocol::InvalidChannel> {
    ChannelName::new(&template.replace("{topic}", topic).replace("{key}", key))
}

/// The epoch of a partition generation.
pub fn epoch_for(topic: &str, partition: i32, first_record_ms: i64) -> String {
    format!("{topic}-{partition}-{first_record_ms:x}")
}

/// What this side knows about one partition.
#[derive(Debug)]
struct Partition {
    epoch: Arc<str>,
    /// Timestamp of the first record of the log (the generation in `epoch`), once seen
    /// (probe or consumption).
    first_record_ms: Option<i64>,
    covers_from: u64,
    /// Next offset to read (resume position for a restarted consumer).
    next: i64,
    last: Option<i64>,
    /// The newest record timestamp handled in this generation: a record at or below `last`
    /// that is not newer is one we already handled, sent again (see [`arrival`]).
    newest_ms: Option<i64>,
    /// Records below this offset were already in the log at start (history warm-up); their
    /// age is not fan-out latency and is not recorded as such.
    live_from: i64,
}

/// What this side knows about every partition: by topic, then partition (so that a record's
/// partition is found from its borrowed topic name, without allocating).
type Partitions = HashMap<String, HashMap<i32, Partition>>;

/// The Kafka source.
#[derive(Debug)]
pub struct KafkaSource {
    cfg: KafkaConfig,
    status: Arc<SourceStatus>,
    /// `ws_kafka_records_total` by topic, registered once.
    records: HashMap<String, Counter>,
}

impl KafkaSource {
    /// A source with `cfg` (validated).
    pub fn new(cfg: KafkaConfig) -> Result<Self, SourceError> {
        let cfg = cfg.validate()?;
        let records = cfg
            .topics
            .iter()
            .map(|t| (t.clone(), metrics::counter!(RECORDS, "topic" => t.clone())))
            .collect();
        let status = SourceStatus::new("kafka", true);
        // Not ready until the warm-up has read what it re-reads (set before any `/health`).
        status.set_ready(!matches!(cfg.start, StartPosition::Back(n) if n > 0));
        Ok(Self {
            cfg,
            status,
            records,
        })
    }

    fn consumer_config(&self, state: &Partitions) -> ConsumerConfig {
        ConsumerConfig {
            brokers: self.cfg.brokers.clone(),
            topics: self.cfg.topics.clone(),
            start: self.cfg.start,
            resume: state
                .iter()
                .flat_map(|(t, ps)| {
                    ps.iter().map(|(p, s)| consumer::Resume {
                        topic: t.clone(),
                        partition: *p,
                        next: s.next,
                        first_record_ms: s.first_record_ms,
                    })
                })
                .collect(),
            fetch_wait_max_ms: self.cfg.fetch_wait_max.as_millis() as u64,
            properties: self.cfg.overrides.clone(),
        }
    }

    /// Ends the start-up warm-up once every assigned partition has been read up to the
    /// high-water mark it had at start.
    fn check_warmup(&self, state: &Partitions) {
        let mut parts = state.values().flat_map(|ps| ps.values()).peekable();
        if parts.peek().is_some() && parts.all(|p| p.next >= p.live_from) {
            self.status.set_ready(true);
            tracing::info!("kafka history warm-up complete: taking clients");
        }
    }

    fn set_connected(&self, up: bool) {
        self.status.set_connected(up);
        metrics::gauge!(CONNECTED).set(if up { 1.0 } else { 0.0 });
    }

    /// Applies events until the stream ends or `stop` fires. Returns whether it was stopped.
    async fn consume<R: AsyncRead + Unpin>(
        &self,
        mut events: R,
        hub: &Hub,
        state: &mut Partitions,
        fanout: &Histogram,
        stop: &CancellationToken,
    ) -> bool {
        loop {
            let e = tokio::select! {
                _ = stop.cancelled() => return true,
                e = wire::read_event(&mut events) => e,
            };
            match e {
                Ok(Some(Event::Record(r))) => {
                    self.set_connected(true);
                    match self.records.get(r.topic.as_str()) {
                        Some(c) => c.increment(1),
                        None => metrics::counter!(RECORDS, "topic" => r.topic.clone()).increment(1),
                    }
                    let p = state
                        .get_mut(r.topic.as_str())
                        .and_then(|ps| ps.get_mut(&r.partition));
                    // During the warm-up, every partition is checked only when this record
                    // completes its own partition's re-read: not per record.
                    let completed = p.is_some_and(|p| {
                        let before = p.next;
                        handle(&self.cfg, hub, p, &r, fanout);
                        before < p.live_from && p.next >= p.live_from
                    });
                    if completed && !self.status.ready() {
                        self.check_warmup(state);
                    }
                }
                Ok(Some(Event::Partitions(list))) => {
                    apply_assignment(state, &list);
                    if !self.status.ready() {
                        self.check_warmup(state);
                    }
                }
                Ok(Some(Event::Status(s))) => {
                    self.set_connected(s.connected);
                    let mut total = 0u64;
                    for (topic, partition, lag) in s.lag {
                        total += lag.max(0) as u64;
                        metrics::gauge!(LAG, "topic" => topic, "partition" => partition.to_string()).set(lag as f64);
                    }
                    self.status.set_lag(total);
                }
                Ok(None) => return false,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer stream broken");
                    return false;
                }
            }
        }
    }
}

fn apply_assignment(state: &mut Partitions, list: &[Assigned]) {
    for a in list {
        let epoch = || {
            Arc::from(epoch_for(
                &a.topic,
                a.partition,
                a.first_record_ms.unwrap_or(0),
            ))
        };
        let partitions = state.entry(a.topic.clone()).or_default();
        match partitions.get_mut(&a.partition) {
            Some(p) if !a.recreated => p.next = a.start,
            Some(p) => {
                *p = Partition {
                    epoch: epoch(),
                    first_record_ms: a.first_record_ms,
                    covers_from: a.start.max(0) as u64,
                    next: a.start,
                    last: None,
                    newest_ms: None,
                    live_from: a.start,
                };
                tracing::warn!(
                    topic = a.topic,
                    partition = a.partition,
                    epoch = &*p.epoch,
                    "kafka partition recreated: new epoch"
                );
            }
            None => {
                partitions.insert(
                    a.partition,
                    Partition {
                        epoch: epoch(),
                        first_record_ms: a.first_record_ms,
                        covers_from: a.start.max(0) as u64,
                        next: a.start,
                        last: None,
                        newest_ms: None,
                        live_from: a.high,
                    },
                );
            }
        }
    }
}

fn skip(topic: &str, reason: &'static str, offset: i64) {
    metrics::counter!(INVALID, "topic" => topic.to_owned(), "reason" => reason).increment(1);
    tracing::warn!(topic, offset, reason, "kafka record skipped");
}

/// What a record means for the partition it belongs to.
#[derive(Debug, PartialEq, Eq)]
enum Arrival {
    /// After everything handled so far (the usual case).
    Next,
    /// At or below the last offset handled and not newer than any record handled: a record we
    /// already published, fetched again. A broker that comes back after a restart can answer
    /// a fetch from an earlier position than ours (tansu did, after a produce cut short by
    /// the restart left a hole in the log); publishing it again would be a duplicate, and
    /// calling it a new generation would cost every subscriber of the channel its position.
    Redelivered,
    /// Offsets went backwards with a record newer than any handled: the partition was
    /// recreated, a new generation starts.
    NewGeneration,
}

fn arrival(p: &Partition, offset: i64, timestamp_ms: Option<i64>) -> Arrival {
    match p.last {
        Some(last) if offset <= last => match (timestamp_ms, p.newest_ms) {
            (Some(ts), Some(newest)) if ts <= newest => Arrival::Redelivered,
            _ => Arrival::NewGeneration,
        },
        _ => Arrival::Next,
    }
}

fn handle(cfg: &KafkaConfig, hub: &Hub, p: &mut Partition, r: &Record, fanout: &Histogram) {
    let (topic, offset) = (r.topic.as_str(), r.offset);
    let regressed = match arrival(p, offset, r.timestamp_ms) {
        Arrival::Next => false,
        Arrival::NewGeneration => true,
        Arrival::Redelivered => {
            tracing::debug!(
                topic,
                partition = r.partition,
                offset,
                last = p.last,
                "kafka record delivered again: already published, skipped"
            );
            return;
        }
    };
    // Offsets going backwards with a newer record means the partition was recreated: a new
    // generation.
    if regressed || p.first_record_ms.is_none() {
        let first_ms = r.timestamp_ms.unwrap_or(0);
        let epoch = epoch_for(topic, r.partition, first_ms);
        if regressed {
            tracing::warn!(
                topic,
                partition = r.partition,
                offset,
                epoch,
                "kafka offsets went backwards: new epoch"
            );
            p.covers_from = offset.max(0) as u64;
            p.live_from = offset;
            p.newest_ms = None;
        }
        p.epoch = Arc::from(epoch);
        p.first_record_ms = Some(first_ms);
    }
    if let Some(ts) = r.timestamp_ms {
        p.newest_ms = Some(p.newest_ms.map_or(ts, |n| n.max(ts)));
    }
    p.last = Some(offset);
    p.next = offset + 1;
    let Some(key) = r.key.as_deref() else {
        return skip(topic, "no_key", offset);
    };
    let Ok(key) = std::str::from_utf8(key) else {
        return skip(topic, "bad_channel", offset);
    };
    let Ok(channel) = channel_for(&cfg.channel_template, topic, key) else {
        return skip(topic, "bad_channel", offset);
    };
    let Some(value) = r.value.as_deref() else {
        return skip(topic, "invalid_json", offset);
    };
    let Ok(raw) = serde_json::from_slice::<&RawValue>(value) else {
        return skip(topic, "invalid_json", offset);
    };
    let origin = r
        .timestamp_ms
        .filter(|_| offset >= p.live_from)
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
    let publication = Publication::encode(
        channel,
        p.epoch.clone(),
        offset.max(0) as u64,
        p.covers_from,
        raw.get(),
        origin,
    );
    hub.publish(&publication);
    if let Some(Ok(elapsed)) = origin.map(|o| SystemTime::now().duration_since(o)) {
        fanout.record(elapsed.as_secs_f64());
    }
}

impl MessageSource for KafkaSource {
    fn status(&self) -> Arc<SourceStatus> {
        self.status.clone()
    }

    async fn run(self, hub: Arc<Hub>, shutdown: CancellationToken) -> Result<(), SourceError> {
        self.set_connected(false);
        if !self.status.ready() {
            let (status, limit, stop) = (
                self.status.clone(),
                self.cfg.warmup_timeout,
                shutdown.clone(),
            );
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(limit) => if !status.ready() {
                        status.set_ready(true);
                        tracing::warn!(
                            timeout = ?limit,
                            "kafka history warm-up not complete after kafka_warmup_timeout; taking clients anyway (those resuming with since may get recovered:false)"
                        );
                    },
                }
            });
        }
        for c in self.records.values() {
            c.increment(0);
        }
        for topic in &self.cfg.topics {
            for reason in ["invalid_json", "no_key", "bad_channel"] {
                metrics::counter!(INVALID, "topic" => topic.clone(), "reason" => reason)
                    .increment(0);
            }
        }
        for reason in ["recreated", "repartitioned", "exited", "crashed"] {
            metrics::counter!(RESTARTS, "reason" => reason).increment(0);
        }
        let mut state = Partitions::new();
        let fanout: Histogram = metrics::histogram!(RECORD_TO_FANOUT);
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = tokio::time::Instant::now();
            let cfg = self.consumer_config(&state);
            let reason = match &self.cfg.isolation {
                Isolation::InProcess => {
                    let (w, r) = tokio::io::duplex(1 << 20);
                    let stop = shutdown.child_token();
                    let task = tokio::spawn(consumer::run(cfg, w, stop.clone()));
                    if self.consume(r, &hub, &mut state, &fanout, &shutdown).await {
                        return Ok(());
                    }
                    stop.cancel();
                    match task.await {
                        Ok(Ok(consumer::ConsumerEnd::Recreated)) => "recreated",
                        Ok(Ok(consumer::ConsumerEnd::Repartitioned)) => "repartitioned",
                        Ok(Ok(_)) => "exited",
                        Ok(Err(e)) => return Err(e),
                        Err(_) => "crashed",
                    }
                }
                Isolation::Process { exe } => {
                    let mut child = tokio::process::Command::new(exe)
                        .arg("kafka-consumer")
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::inherit())
                        .kill_on_drop(true)
                        .spawn()
                        .map_err(|e| {
                            SourceError::Fatal(format!("starting the kafka consumer process: {e}"))
                        })?;
                    let (Some(mut stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take())
                    else {
                        return Err(SourceError::Fatal("consumer process without pipes".into()));
                    };
                    let line = serde_json::to_string(&cfg).unwrap_or_default() + "\n";
                    if let Err(e) = stdin.write_all(line.as_bytes()).await {
                        tracing::warn!(error = %e, "kafka consumer process did not take its configuration");
                    }
                    // stdin stays open: closing it is how the child learns we are gone.
                    // A read buffer only batches what the pipe already holds: it never
                    // waits for more than one read returns.
                    let events = tokio::io::BufReader::with_capacity(64 * 1024, stdout);
                    let stopped = self
                        .consume(events, &hub, &mut state, &fanout, &shutdown)
                        .await;
                    drop(stdin);
                    if stopped {
                        let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                        return Ok(());
                    }
                    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
                        Ok(Ok(s)) if s.code() == Some(consumer::EXIT_RECREATED) => "recreated",
                        Ok(Ok(s)) if s.code() == Some(consumer::EXIT_REPARTITIONED) => {
                            "repartitioned"
                        }
                        Ok(Ok(s)) if s.success() => "exited",
                        Ok(Ok(s)) => {
                            tracing::error!(status = %s, "kafka consumer process died; restarting it");
                            "crashed"
                        }
                        _ => "crashed",
                    }
                }
            };
            self.set_connected(false);
            metrics::counter!(RESTARTS, "reason" => reason).increment(1);
            tracing::warn!(
                reason,
                "kafka consumer ended; starting a new one from the next offset of every partition"
            );
            if started.elapsed() > Duration::from_secs(30)
                || reason == "recreated"
                || reason == "repartitioned"
            {
                backoff = Duration::from_millis(100);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_positions_parse_and_print() {
        assert_eq!("latest".parse(), Ok(StartPosition::Latest));
        assert_eq!("back:500".parse(), Ok(StartPosition::Back(500)));
        assert!("back:".parse::<StartPosition>().is_err());
        assert!("earliest".parse::<StartPosition>().is_err());
        assert_eq!(String::from(StartPosition::Back(7)), "back:7");
    }

    #[test]
    fn channel_mapping() {
        assert_eq!(
            channel_for("{topic}.{key}", "trades", "BTC-USD")
                .unwrap()
                .as_str(),
            "trades.BTC-USD"
        );
        assert_eq!(
            channel_for("md:{key}", "trades", "BTC-USD")
                .unwrap()
                .as_str(),
            "md:BTC-USD"
        );
        assert!(channel_for("{topic}.{key}", "trades", "BTC USD").is_err());
        assert_eq!(epoch_for("trades", 2, 0x1234), "trades-2-1234");
    }

    #[test]
    fn config_validation() {
        let ok = KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topics: vec!["trades".into()],
            start: StartPosition::Latest,
            channel_template: "{topic}.{key}".into(),
            fetch_wait_max: Duration::from_millis(10),
            warmup_timeout: Duration::from_secs(30),
            overrides: vec![],
            isolation: Isolation::InProcess,
        };
        assert!(ok.clone().validate().is_ok());
        assert!(KafkaConfig {
            brokers: " ".into(),
            ..ok.clone()
        }
        .validate()
        .is_err());
        assert!(KafkaConfig {
            topics: vec![],
            ..ok.clone()
        }
        .validate()
        .is_err());
        assert!(KafkaConfig {
            channel_template: "fixed".into(),
            ..ok
        }
        .validate()
        .is_err());
    }

    #[test]
    fn a_record_sent_again_is_not_a_new_generation() {
        let p = |last: Option<i64>, newest: Option<i64>| Partition {
            epoch: Arc::from("t-0-10"),
            first_record_ms: Some(0x10),
            covers_from: 0,
            next: last.map_or(0, |l| l + 1),
            last,
            newest_ms: newest,
            live_from: 0,
        };
        // Nothing handled yet, or past the last offset: the next record.
        assert_eq!(arrival(&p(None, None), 5, Some(1_000)), Arrival::Next);
        assert_eq!(
            arrival(&p(Some(74), Some(2_000)), 75, Some(1_500)),
            Arrival::Next
        );
        // Offset 75 again (or an earlier one), no newer than what we handled: fetched again.
        assert_eq!(
            arrival(&p(Some(106), Some(2_000)), 75, Some(1_900)),
            Arrival::Redelivered
        );
        assert_eq!(
            arrival(&p(Some(106), Some(2_000)), 106, Some(2_000)),
            Arrival::Redelivered
        );
        // Offsets back with a record newer than everything handled: the log was recreated.
        assert_eq!(
            arrival(&p(Some(106), Some(2_000)), 0, Some(2_001)),
            Arrival::NewGeneration
        );
        // Without timestamps nothing tells a re-sent record apart: a new generation, as before.
        assert_eq!(
            arrival(&p(Some(106), None), 0, Some(1)),
            Arrival::NewGeneration
        );
        assert_eq!(
            arrival(&p(Some(106), Some(2_000)), 3, None),
            Arrival::NewGeneration
        );
    }

    #[test]
    fn recreated_partitions_get_a_new_generation_known_ones_resume() {
        let mut state = HashMap::new();
        let a = |start, recreated, first| Assigned {
            topic: "t".into(),
            partition: 0,
            low: 0,
            high: 100,
            start,
            first_record_ms: first,
            recreated,
        };
        apply_assignment(&mut state, &[a(100, false, Some(0x10))]);
        let p = &state["t"][&0];
        assert_eq!((&*p.epoch, p.covers_from, p.next), ("t-0-10", 100, 100));
        apply_assignment(&mut state, &[a(150, false, Some(0x10))]);
        assert_eq!(state["t"][&0].next, 150);
        apply_assignment(&mut state, &[a(0, true, Some(0x99))]);
        let p = &state["t"][&0];
        assert_eq!((&*p.epoch, p.covers_from, p.next), ("t-0-99", 0, 0));
    }
}
