//! The Kafka source: every partition of the configured topics, consumed by one consumer per
//! process with manual assignment (fan-out, not work-sharing: no consumer group decides
//! which shard gets what, and no offsets are committed).
//!
//! Positions: `seq` is the record's offset; `epoch` is `<topic>-<partition>-<generation>`,
//! where the generation is the timestamp of the first record of the partition's log. Every
//! shard process reading the same partition computes the same epoch without talking to the
//! others, and a partition that is deleted and recreated (offsets start again at 0) gets a
//! new one, so a position from the old partition is never trusted.
//!
//! Latency settings are deliberate: `fetch.wait.max.ms` (default 10 ms instead of
//! librdkafka's 500) bounds how long the broker holds a fetch waiting for data,
//! `fetch.min.bytes=1` answers as soon as one record exists, and Nagle is off.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Histogram};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use ws_protocol::ChannelName;

use super::{MessageSource, SourceError, SourceStatus};
use crate::hub::{Hub, Publication};

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
/// Every Kafka metric name.
pub const ALL: &[&str] = &[RECORDS, INVALID, LAG, RECORD_TO_FANOUT, CONNECTED];

/// Where consumption starts in each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// Extra librdkafka properties, applied last.
    pub overrides: Vec<(String, String)>,
}

impl KafkaConfig {
    /// Checks the settings.
    pub fn validate(self) -> Result<Self, SourceError> {
        if self.brokers.trim().is_empty() {
            return Err(SourceError::Config("kafka_brokers is empty".into()));
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(SourceError::Config("kafka_topics must name at least one topic".into()));
        }
        if !self.channel_template.contains("{key}") && !self.channel_template.contains("{topic}") {
            return Err(SourceError::Config("kafka_channel_template must use {topic} or {key}".into()));
        }
        Ok(self)
    }
}

/// Maps a record to its channel name.
pub fn channel_for(template: &str, topic: &str, key: &str) -> Result<ChannelName, ws_protocol::InvalidChannel> {
    ChannelName::new(&template.replace("{topic}", topic).replace("{key}", key))
}

/// The epoch of a partition generation.
pub fn epoch_for(topic: &str, partition: i32, first_record_ms: i64) -> String {
    format!("{topic}-{partition}-{first_record_ms:x}")
}

struct Ctx {
    status: Arc<SourceStatus>,
}

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        let up = stats.brokers.values().any(|b| b.state == "UP");
        self.status.set_connected(up);
        metrics::gauge!(CONNECTED).set(if up { 1.0 } else { 0.0 });
        let mut total = 0u64;
        for (topic, t) in &stats.topics {
            for (id, p) in &t.partitions {
                if *id < 0 || p.consumer_lag < 0 {
                    continue;
                }
                total += p.consumer_lag as u64;
                metrics::gauge!(LAG, "topic" => topic.clone(), "partition" => id.to_string()).set(p.consumer_lag as f64);
            }
        }
        self.status.set_lag(total);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
        if matches!(error.rdkafka_error_code(), Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)) {
            self.status.set_connected(false);
            metrics::gauge!(CONNECTED).set(0.0);
        }
    }
}

impl ConsumerContext for Ctx {}

#[derive(Debug)]
struct Partition {
    epoch: Arc<str>,
    /// Known once the first record of the log has been seen (probe or consumption).
    generation_known: bool,
    covers_from: u64,
    last: Option<i64>,
    /// Records below this offset were already in the log at start (history warm-up); their
    /// age is not fan-out latency and is not recorded as such.
    live_from: i64,
}

/// The Kafka source.
#[derive(Debug)]
pub struct KafkaSource {
    cfg: KafkaConfig,
    status: Arc<SourceStatus>,
}

impl KafkaSource {
    /// A source with `cfg` (validated).
    pub fn new(cfg: KafkaConfig) -> Result<Self, SourceError> {
        Ok(Self { cfg: cfg.validate()?, status: SourceStatus::new("kafka", true) })
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        // The client id lets broker-side tooling (and our fault-injection proxy) tell
        // shard consumers apart from producers.
        c.set("bootstrap.servers", &self.cfg.brokers)
            .set("client.id", "odin-ws-shard")
            // Manual assignment: the group id is only a label; nothing is committed.
            .set("group.id", format!("odin-ws-shard-{:08x}", rand::random::<u32>()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", self.cfg.fetch_wait_max.as_millis().to_string())
            .set("fetch.min.bytes", "1")
            .set("socket.nagle.disable", "true")
            .set("statistics.interval.ms", "1000")
            .set("reconnect.backoff.ms", "100")
            .set("reconnect.backoff.max.ms", "1000")
            .set("topic.metadata.refresh.interval.ms", "10000");
        for (k, v) in &self.cfg.overrides {
            c.set(k, v);
        }
        c
    }
}

/// Blocking: partitions and watermarks of every topic, retried until the brokers answer.
fn discover(consumer: &BaseConsumer<Ctx>, topics: &[String]) -> Result<Vec<(String, i32, i64, i64)>, KafkaError> {
    let mut out = Vec::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        for t in md.topics() {
            if let Some(e) = t.error() {
                return Err(KafkaError::MetadataFetch(e.into()));
            }
            for p in t.partitions() {
                let (low, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5))?;
                out.push((topic.clone(), p.id(), low, high));
            }
        }
    }
    if out.is_empty() {
        return Err(KafkaError::MetadataFetch(rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition));
    }
    Ok(out)
}

/// Blocking: the timestamp of the record at `low` in each non-empty partition.
fn probe_first_records(consumer: &BaseConsumer<Ctx>, parts: &[(String, i32, i64, i64)]) -> HashMap<(String, i32), i64> {
    let mut tpl = TopicPartitionList::new();
    let mut wanted = 0;
    for (t, p, low, high) in parts {
        if high > low {
            let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*low));
            wanted += 1;
        }
    }
    let mut found = HashMap::new();
    if wanted == 0 || consumer.assign(&tpl).is_err() {
        return found;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while found.len() < wanted && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let ts = m.timestamp().to_millis().unwrap_or(0);
            found.entry((m.topic().to_owned(), m.partition())).or_insert(ts);
        }
    }
    found
}

impl MessageSource for KafkaSource {
    fn status(&self) -> Arc<SourceStatus> {
        self.status.clone()
    }

    async fn run(self, hub: Arc<Hub>, shutdown: CancellationToken) -> Result<(), SourceError> {
        metrics::gauge!(CONNECTED).set(0.0);
        let ctx = || Ctx { status: self.status.clone() };
        let consumer: StreamConsumer<Ctx> = self
            .client_config()
            .create_with_context(ctx())
            .map_err(|e| SourceError::Config(format!("kafka consumer: {e}")))?;
        let probe: Arc<BaseConsumer<Ctx>> = Arc::new(
            self.client_config()
                .create_with_context(ctx())
                .map_err(|e| SourceError::Config(format!("kafka probe consumer: {e}")))?,
        );

        // Discover partitions; the brokers may not be up yet.
        let parts = loop {
            let (p, topics) = (probe.clone(), self.cfg.topics.clone());
            let found = tokio::task::spawn_blocking(move || discover(&p, &topics)).await;
            match found {
                Ok(Ok(parts)) => break parts,
                Ok(Err(e)) => tracing::warn!(error = %e, "kafka metadata not available yet; retrying"),
                Err(e) => return Err(SourceError::Fatal(e.to_string())),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        };
        let firsts = {
            let (p, parts) = (probe.clone(), parts.clone());
            tokio::task::spawn_blocking(move || probe_first_records(&p, &parts))
                .await
                .map_err(|e| SourceError::Fatal(e.to_string()))?
        };
        drop(probe);

        let mut state: HashMap<(String, i32), Partition> = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for (topic, id, low, high) in &parts {
            let start = match self.cfg.start {
                StartPosition::Latest => *high,
                StartPosition::Back(n) => (*high - i64::try_from(n).unwrap_or(i64::MAX)).max(*low),
            };
            let first = firsts.get(&(topic.clone(), *id)).copied();
            let epoch = epoch_for(topic, *id, first.unwrap_or(0));
            tracing::info!(topic, partition = id, low, high, start, epoch, "kafka partition assigned");
            state.insert(
                (topic.clone(), *id),
                Partition {
                    epoch: Arc::from(epoch),
                    generation_known: first.is_some(),
                    covers_from: start.max(0) as u64,
                    last: None,
                    live_from: *high,
                },
            );
            tpl.add_partition_offset(topic, *id, Offset::Offset(start))
                .map_err(|e| SourceError::Fatal(e.to_string()))?;
        }
        consumer.assign(&tpl).map_err(|e| SourceError::Fatal(format!("assign: {e}")))?;
        self.status.set_connected(true);
        metrics::gauge!(CONNECTED).set(1.0);

        let mut counters: HashMap<String, Counter> = HashMap::new();
        let fanout: Histogram = metrics::histogram!(RECORD_TO_FANOUT);
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = consumer.recv() => m,
            };
            match msg {
                Ok(m) => {
                    self.status.set_connected(true);
                    let topic = m.topic().to_owned();
                    counters.entry(topic.clone()).or_insert_with(|| metrics::counter!(RECORDS, "topic" => topic.clone())).increment(1);
                    if let Some(p) = state.get_mut(&(topic, m.partition())) {
                        handle(&self.cfg, &hub, p, &m, &fanout);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consume error");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
        }
    }
}

fn skip(topic: &str, reason: &'static str, offset: i64) {
    metrics::counter!(INVALID, "topic" => topic.to_owned(), "reason" => reason).increment(1);
    tracing::warn!(topic, offset, reason, "kafka record skipped");
}

fn handle(cfg: &KafkaConfig, hub: &Hub, p: &mut Partition, m: &BorrowedMessage<'_>, fanout: &Histogram) {
    let (topic, offset) = (m.topic(), m.offset());
    let ts = m.timestamp().to_millis();
    // Offsets going backwards means the partition was recreated: a new generation.
    let regressed = p.last.is_some_and(|last| offset <= last);
    if regressed || !p.generation_known {
        let first = ts.unwrap_or(0);
        let epoch = epoch_for(topic, m.partition(), first);
        if regressed {
            tracing::warn!(topic, partition = m.partition(), offset, epoch, "kafka offsets went backwards: partition recreated, new epoch");
            p.covers_from = offset.max(0) as u64;
            p.live_from = offset;
        }
        p.epoch = Arc::from(epoch);
        p.generation_known = true;
    }
    p.last = Some(offset);
    let Some(key) = m.key() else { return skip(topic, "no_key", offset) };
    let Ok(key) = std::str::from_utf8(key) else { return skip(topic, "bad_channel", offset) };
    let Ok(channel) = channel_for(&cfg.channel_template, topic, key) else { return skip(topic, "bad_channel", offset) };
    let Some(value) = m.payload() else { return skip(topic, "invalid_json", offset) };
    let Ok(raw) = serde_json::from_slice::<&RawValue>(value) else { return skip(topic, "invalid_json", offset) };
    let live = offset >= p.live_from;
    let origin = ts
        .filter(|_| live)
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms));
    let publication = Publication::encode(channel, p.epoch.clone(), offset.max(0) as u64, p.covers_from, raw.get(), origin);
    hub.publish(&publication);
    if let Some(Ok(elapsed)) = origin.map(|o| SystemTime::now().duration_since(o)) {
        fanout.record(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_positions_parse() {
        assert_eq!("latest".parse(), Ok(StartPosition::Latest));
        assert_eq!("back:500".parse(), Ok(StartPosition::Back(500)));
        assert!("back:".parse::<StartPosition>().is_err());
        assert!("earliest".parse::<StartPosition>().is_err());
    }

    #[test]
    fn channel_mapping() {
        assert_eq!(channel_for("{topic}.{key}", "trades", "BTC-USD").unwrap().as_str(), "trades.BTC-USD");
        assert_eq!(channel_for("md:{key}", "trades", "BTC-USD").unwrap().as_str(), "md:BTC-USD");
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
            overrides: vec![],
        };
        assert!(ok.clone().validate().is_ok());
        assert!(KafkaConfig { brokers: " ".into(), ..ok.clone() }.validate().is_err());
        assert!(KafkaConfig { topics: vec![], ..ok.clone() }.validate().is_err());
        assert!(KafkaConfig { channel_template: "fixed".into(), ..ok }.validate().is_err());
    }
}
