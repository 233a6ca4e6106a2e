//! The librdkafka side of the Kafka source: discovers every partition of the topics, assigns
//! each at its start or resume offset (manual assignment: no consumer group, no commits) and
//! streams records and status as [`wire`](super::wire) events.
//!
//! It normally runs in a child process (`ws-shard kafka-consumer`), so that a crash inside
//! librdkafka — 2.12 segfaults in its metadata cache when a topic is recreated under it —
//! costs a consumer restart, not every client connection of the shard. It stops when its
//! input (stdin) closes, i.e. when the shard process is gone.
//!
//! Latency settings are deliberate: `fetch.wait.max.ms` (default 10 ms instead of
//! librdkafka's 500) bounds how long the broker holds a fetch waiting for data,
//! `fetch.min.bytes=1` answers as soon as one record exists, and Nagle is off.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use shard_core::source::SourceError;

use crate::wire::{self, Assigned, Event, Status};
use crate::StartPosition;

/// What the consumer needs; sent as one JSON line to the child process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsumerConfig {
    pub brokers: String,
    pub topics: Vec<String>,
    /// For partitions not in `resume`.
    pub start: StartPosition,
    /// Where a previous consumer was, per partition.
    pub resume: Vec<Resume>,
    pub fetch_wait_max_ms: u64,
    pub properties: Vec<(String, String)>,
}

/// A partition a previous consumer read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resume {
    pub topic: String,
    pub partition: i32,
    /// Next offset to read.
    pub next: i64,
    /// Timestamp of the first record of the log it read, if known.
    pub first_record_ms: Option<i64>,
}

/// Why a consumer run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumerEnd {
    /// Asked to stop.
    Shutdown,
    /// A partition's log is shorter than our position: start over with a fresh client.
    Recreated,
    /// A topic has partitions we do not read (partitions were added to it): start over, so
    /// that the new consumer assigns them too.
    Repartitioned,
    /// Nobody reads the events any more.
    OutputClosed,
}

/// How often the status (lag from high-water marks, broker reachability) is sent and
/// partitions are checked for recreation.
const TICK: Duration = Duration::from_secs(1);

/// Remembers an "all brokers down" error until the next status tick.
struct Ctx {
    latest: Mutex<Option<Status>>,
    /// Which of the two clients, in its log lines: `fetch` or `probe`.
    client: &'static str,
    /// Error log lines held back, per error kind.
    quiet: Mutex<Quiet>,
}

/// At most one log line per error kind and `QUIET_FOR`, with the count of those held back:
/// librdkafka reports "all brokers down" about once a second per client while a broker is
/// unreachable, which made ~2 warnings a second for the whole outage.
#[derive(Default)]
struct Quiet {
    kinds: HashMap<String, (std::time::Instant, u64)>,
}

const QUIET_FOR: Duration = Duration::from_secs(10);

/// The kind `Quiet` holds an error back by: its librdkafka code, else its text (the code
/// enum has no `Hash`).
fn error_kind(e: &KafkaError) -> String {
    e.rdkafka_error_code()
        .map_or_else(|| e.to_string(), |c| format!("{c:?}"))
}

impl Quiet {
    /// Whether an error of `kind` at `now` is logged, and how many of its kind were held
    /// back since the last one logged.
    fn admit(&mut self, kind: &str, now: std::time::Instant) -> Option<u64> {
        match self.kinds.get_mut(kind) {
            Some((last, held)) if now.duration_since(*last) < QUIET_FOR => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                // Kinds are error codes, a few dozen at most; bound it anyway.
                if self.kinds.len() >= 64 {
                    self.kinds.clear();
                }
                self.kinds.insert(kind.to_owned(), (now, 0));
                Some(0)
            }
        }
    }
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(held_back) = self
            .quiet
            .lock()
            .admit(&error_kind(&error), std::time::Instant::now())
        {
            tracing::warn!(%error, reason, client = self.client, held_back, "kafka client error (one line per kind and 10 s; held_back: of this kind since the last)");
        }
        if matches!(
            error.rdkafka_error_code(),
            Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown)
        ) {
            *self.latest.lock() = Some(Status {
                connected: false,
                lag: Vec::new(),
            });
        }
    }
}

impl ConsumerContext for Ctx {}

fn client<C: FromClientConfigAndContext<Ctx>>(
    cfg: &ConsumerConfig,
    ctx: Ctx,
) -> Result<C, SourceError> {
    let mut c = ClientConfig::new();
    // The client id lets broker-side tooling (and our fault-injection proxy) tell shard
    // consumers apart from producers. Manual assignment: the group id is only a label.
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "odin-ws-shard")
        .set(
            "group.id",
            format!("odin-ws-shard-{:08x}", rand::random::<u32>()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", cfg.fetch_wait_max_ms.to_string())
        .set("fetch.min.bytes", "1")
        .set("socket.nagle.disable", "true")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "10000");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c.create_with_context(ctx)
        .map_err(|e| SourceError::Config(format!("kafka client: {e}")))
}

fn new_ctx(client: &'static str) -> Ctx {
    Ctx {
        latest: Mutex::new(None),
        client,
        quiet: Mutex::new(Quiet::default()),
    }
}

/// Blocking: serves what librdkafka queued for the probe since the last call, its log lines
/// and errors. rust-rdkafka routes both through the client's queue (`log.queue`), which
/// only a poll serves, and the probe is polled nowhere else but while it reads first
/// records: unserved, they piled up for as long as the broker was unreachable (a
/// ws-shard's consumer process grew by 0.45-2.4 KiB/s during a broker outage; `make
/// faults` scenario `broker-outage`).
fn serve_events(probe: &BaseConsumer<Ctx>) {
    // The probe is assigned nothing here, so a poll returns no record: `Some` is an error
    // event (already handed to `Ctx::error`), `None` means nothing came within 1 ms.
    for _ in 0..1000 {
        if probe.poll(Duration::from_millis(1)).is_none() {
            break;
        }
    }
}

/// Blocking: partitions and watermarks of every topic.
///
/// The marks of all partitions come in two ListOffsets requests per broker (earliest:
/// timestamp -2, latest: -1), not two requests per partition one after the other
/// (`fetch_watermarks`): with 64 partitions a start took 128 round trips to the broker
/// before the first fetch.
fn discover(
    consumer: &BaseConsumer<Ctx>,
    topics: &[String],
) -> Result<Vec<(String, i32, i64, i64)>, KafkaError> {
    let (mut earliest, mut latest) = (TopicPartitionList::new(), TopicPartitionList::new());
    let mut order = Vec::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
        for t in md.topics() {
            if let Some(e) = t.error() {
                return Err(KafkaError::MetadataFetch(e.into()));
            }
            for p in t.partitions() {
                // For ListOffsets the "offset" is the timestamp asked for.
                earliest.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                latest.add_partition_offset(topic, p.id(), Offset::End)?;
                order.push((topic.clone(), p.id()));
            }
        }
    }
    if order.is_empty() {
        return Err(KafkaError::MetadataFetch(
            rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
    }
    let mut low = offsets(&consumer.offsets_for_times(earliest, Duration::from_secs(5))?);
    let mut high = offsets(&consumer.offsets_for_times(latest, Duration::from_secs(5))?);
    // Every partition asked is in an answer; one missing is the broker's fault.
    let missing = || {
        Err(KafkaError::MetadataFetch(
            rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
        ))
    };
    order
        .into_iter()
        .map(|key| {
            let l = low.remove(&key).unwrap_or_else(missing)?;
            let h = high.remove(&key).unwrap_or_else(missing)?;
            Ok((key.0, key.1, l, h))
        })
        .collect()
}

/// Each partition's answer in a ListOffsets response: its offset, or why it has none.
fn offsets(got: &TopicPartitionList) -> HashMap<(String, i32), Result<i64, KafkaError>> {
    got.elements()
        .iter()
        .map(|e| {
            let offset = e.error().and_then(|()| match e.offset() {
                Offset::Offset(o) => Ok(o),
                _ => Err(KafkaError::OffsetFetch(
                    rdkafka::types::RDKafkaErrorCode::OffsetNotAvailable,
                )),
            });
            ((e.topic().to_owned(), e.partition()), offset)
        })
        .collect()
}

/// Blocking: the timestamp of the record at `low` in each non-empty partition.
fn probe_first_records(
    consumer: &BaseConsumer<Ctx>,
    parts: &[(String, i32, i64, i64)],
) -> HashMap<(String, i32), i64> {
    let mut tpl = TopicPartitionList::new();
    let mut wanted = 0;
    for (t, p, low, high) in parts {
        if high > low
            && tpl
                .add_partition_offset(t, *p, Offset::Offset(*low))
                .is_ok()
        {
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
            found
                .entry((m.topic().to_owned(), m.partition()))
                .or_insert(ts);
        }
    }
    // The probe stays alive for later checks: no prefetching into a queue nobody reads.
    let _ = consumer.unassign();
    found
}

/// Where a partition (log from `low` to `high`, first record `first_record_ms`) is read from,
/// and whether its log is not the one `resume` was read from (recreated).
fn start_of(
    cfg: &ConsumerConfig,
    resume: Option<&Resume>,
    topic: &str,
    (low, high): (i64, i64),
    first_record_ms: Option<i64>,
) -> (i64, bool) {
    match resume {
        // A high-water mark below our position can be stale (see `replaced_logs`): the
        // log is replaced only if its first record is not the one we knew.
        Some(r)
            if high < r.next
                && (r.first_record_ms.is_none() || first_record_ms != r.first_record_ms) =>
        {
            (low, true)
        }
        Some(r) => (r.next, false),
        // A partition of a topic an earlier consumer of this shard read, which that
        // consumer did not have: added to the topic since. Everything in it was written
        // after that consumer started, so all of it is new to our clients: from its start.
        None if cfg.resume.iter().any(|r| r.topic == topic) => (low, false),
        None => match cfg.start {
            StartPosition::Latest => (high, false),
            StartPosition::Back(n) => (
                (high - i64::try_from(n).unwrap_or(i64::MAX)).max(low),
                false,
            ),
        },
    }
}

/// Blocking: the partitions of `topics` we do not read (`read`): partitions added to a
/// topic since we assigned them. Manual assignment (no consumer group) means librdkafka
/// never picks them up by itself, and a producer's partitioner sends some keys there.
/// A topic whose metadata does not come back in time decides nothing.
fn added_partitions(
    probe: &BaseConsumer<Ctx>,
    topics: &[String],
    read: &[(String, i32, i64)],
) -> Vec<(String, i32)> {
    let mut added = Vec::new();
    for topic in topics {
        let Ok(md) = probe.fetch_metadata(Some(topic), Duration::from_millis(800)) else {
            continue;
        };
        for t in md.topics().iter().filter(|t| t.error().is_none()) {
            added.extend(unread(
                t.name(),
                t.partitions().iter().map(|p| p.id()),
                read,
            ));
        }
    }
    added
}

/// Of `partitions` of `topic`, those not in `read`.
fn unread(
    topic: &str,
    partitions: impl Iterator<Item = i32>,
    read: &[(String, i32, i64)],
) -> Vec<(String, i32)> {
    partitions
        .filter(|p| !read.iter().any(|(t, rp, _)| t == topic && rp == p))
        .map(|p| (topic.to_owned(), p))
        .collect()
}

/// What the consumer tracks of one partition it reads.
struct Reading {
    /// Next offset to read.
    next: i64,
    /// The log start offset when assigned.
    low: i64,
    /// What identifies the partition's log: the timestamp of its first record (the record
    /// at `low`), from the probe at start or, for a log that was empty then, from consuming
    /// that record.
    first_ms: Option<i64>,
}

impl Reading {
    fn saw<M: Message>(&mut self, m: &M) {
        if self.first_ms.is_none() && m.offset() == self.low {
            self.first_ms = Some(m.timestamp().to_millis().unwrap_or(0));
        }
        self.next = m.offset() + 1;
    }
}

/// Every partition read: by topic, then partition, so that a record's entry is found from its
/// borrowed topic name without allocating (as the crate root's `Partitions` does).
type Partitions = HashMap<String, HashMap<i32, Reading>>;

/// Blocking: of `suspects` (each with the first-record timestamp we know), the partitions
/// whose log is no longer the one we read: its first record differs from the one we knew,
/// or it is gone. A high-water mark below our position
/// alone does not show that: brokers answer ListOffsets from a stale view while records are
/// appended, and tansu answers with the base offset of the last record batch plus one, so
/// after a batch of several records its mark stays below what we have read until something
/// more is appended (on a quiet topic, indefinitely).
fn replaced_logs(
    consumer: &BaseConsumer<Ctx>,
    topics: &[String],
    suspects: &[((String, i32), i64)],
) -> Vec<(String, i32)> {
    let Ok(parts) = discover(consumer, topics) else {
        return Vec::new(); // no answer: nothing is decided on this tick
    };
    let asked: Vec<_> = parts
        .into_iter()
        .filter(|(t, p, _, _)| suspects.iter().any(|((st, sp), _)| st == t && sp == p))
        .collect();
    let now = probe_first_records(consumer, &asked);
    suspects
        .iter()
        .filter(|(k, ts)| match now.get(k) {
            Some(first) => first != ts,
            // No first record: an empty log or a partition gone is not the log we read; a
            // non-empty log the probe got no record from in time decides nothing.
            None => !asked
                .iter()
                .any(|(t, p, low, high)| *t == k.0 && *p == k.1 && high > low),
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// Blocking: the high-water mark of every partition we read, `None` where the broker did not
/// answer in time.
///
/// Asked on the probe, never on the fetching client: a broker answers one connection's
/// requests in order, so on the fetching connection this request waited behind a slow fetch
/// (tansu reading its storage after a restart), timed out after 800 ms, and librdkafka
/// drops a connection on a timed-out request (`socket.max.fails=1`), the fetch's answer with
/// it: once fetches took longer than that, none completed and a shard received no record
/// for two minutes (librdkafka: "Timed out ListOffsetsRequest in flight ... possibly held
/// back by preceeding FetchRequest"; CI's `kafka-restart` cluster scenario; test
/// `a_broker_slow_to_answer_fetches_still_delivers`). One ListOffsets per broker for every
/// partition (latest offset: timestamp -1), not two per partition in sequence.
fn survey(
    probe: &BaseConsumer<Ctx>,
    next: &[(String, i32, i64)],
) -> Vec<((String, i32), i64, Option<i64>)> {
    let mut ask = TopicPartitionList::new();
    for (topic, partition, _) in next {
        // For ListOffsets the "offset" is the timestamp asked for; -1 (END) is the latest.
        let _ = ask.add_partition_offset(topic, *partition, Offset::End);
    }
    let marks = if next.is_empty() {
        HashMap::new()
    } else {
        probe
            .offsets_for_times(ask, Duration::from_millis(800))
            .map(|got| offsets(&got))
            .unwrap_or_default()
    };
    next.iter()
        .map(|(topic, partition, next)| {
            let key = (topic.clone(), *partition);
            let high = marks.get(&key).and_then(|h| h.as_ref().ok()).copied();
            (key, *next, high)
        })
        .collect()
}

/// Whether a tick found the brokers reachable: any partition's high-water mark came back
/// within its timeout, or records arrived since the last tick (or nothing is assigned). A
/// slow broker that misses the timeout for some partitions is up, not down: requiring
/// every mark made `ws_kafka_connected` flap to 0 while records flowed (found on a loaded
/// machine with tansu on S3 storage: the cluster's `kafka-restart` scenario).
fn answered(marks: &[((String, i32), i64, Option<i64>)], received: bool) -> bool {
    received || marks.is_empty() || marks.iter().any(|(_, _, h)| h.is_some())
}

/// What one tick found.
struct TickReport {
    /// Per partition read: our next offset and its high-water mark, if the broker answered.
    marks: Vec<((String, i32), i64, Option<i64>)>,
    /// Partitions whose mark is below our position.
    now: Vec<(String, i32)>,
    /// Of those, the ones that were below at the previous tick too.
    twice: Vec<(String, i32)>,
    /// Of those, the ones whose log is not the one we read.
    replaced: Vec<(String, i32)>,
    /// Partitions of our topics we do not read (checked every `PARTITION_CHECK` ticks).
    added: Vec<(String, i32)>,
}

/// Every how many ticks the topics' partition lists are checked for added partitions.
const PARTITION_CHECK: u32 = 10;

/// Blocking: one tick's round trips. High-water marks give the lag and tell whether the
/// brokers answer; not every broker answers a fetch beyond the end of a recreated partition
/// with OFFSET_OUT_OF_RANGE, so they also reveal recreation, which a partition below our
/// position twice in a row is then checked for (only where we know the log's first record:
/// `known`; the others are kept).
fn tick_check(
    probe: &BaseConsumer<Ctx>,
    topics: &[String],
    positions: &[(String, i32, i64)],
    suspects: &[(String, i32)],
    known: &HashMap<(String, i32), i64>,
    check_partitions: bool,
) -> TickReport {
    serve_events(probe);
    let marks = survey(probe, positions);
    let now: Vec<(String, i32)> = marks
        .iter()
        .filter(|(_, next, h)| h.is_some_and(|h| h >= 0 && h < *next))
        .map(|(k, _, _)| k.clone())
        .collect();
    let twice: Vec<(String, i32)> = now
        .iter()
        .filter(|p| suspects.contains(p))
        .cloned()
        .collect();
    let ask: Vec<((String, i32), i64)> = twice
        .iter()
        .filter_map(|k| Some((k.clone(), *known.get(k)?)))
        .collect();
    let replaced = if ask.is_empty() {
        Vec::new()
    } else {
        replaced_logs(probe, topics, &ask)
    };
    let added = if check_partitions {
        added_partitions(probe, topics, positions)
    } else {
        Vec::new()
    };
    TickReport {
        marks,
        now,
        twice,
        replaced,
        added,
    }
}

/// Runs one consumer until it is stopped, its output closes, or a partition turns out to be
/// recreated (the caller then starts a fresh one with the resume positions it tracked).
pub async fn run<W: AsyncWrite + Unpin>(
    cfg: ConsumerConfig,
    out: W,
    stop: CancellationToken,
) -> Result<ConsumerEnd, SourceError> {
    // Events are written through a buffer and flushed at the end of every batch: whatever
    // has been read from librdkafka is on its way to the shard before we wait for more. A
    // writer that holds bytes back until some later event (std's line-buffered stdout did,
    // until a newline byte happened to pass) delays the last record before a lull forever.
    let mut out = Events::new(out);
    let probe: Arc<BaseConsumer<Ctx>> = Arc::new(client(&cfg, new_ctx("probe"))?);
    let parts = loop {
        let (p, topics) = (probe.clone(), cfg.topics.clone());
        match tokio::task::spawn_blocking(move || {
            serve_events(&p);
            discover(&p, &topics)
        })
        .await
        {
            Ok(Ok(parts)) => break parts,
            Ok(Err(e)) => tracing::warn!(error = %e, "kafka metadata not available yet; retrying"),
            Err(e) => return Err(SourceError::Fatal(e.to_string())),
        }
        if out
            .send(&wire::encode(&Event::Status(Status {
                connected: false,
                lag: Vec::new(),
            })))
            .await
            .is_err()
        {
            return Ok(ConsumerEnd::OutputClosed);
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(ConsumerEnd::Shutdown),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    let firsts = {
        let (p, parts) = (probe.clone(), parts.clone());
        tokio::task::spawn_blocking(move || probe_first_records(&p, &parts))
            .await
            .map_err(|e| SourceError::Fatal(e.to_string()))?
    };

    let resume: HashMap<(&str, i32), &Resume> = cfg
        .resume
        .iter()
        .map(|r| ((r.topic.as_str(), r.partition), r))
        .collect();
    let mut assigned = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, low, high) in &parts {
        let first_record_ms = firsts.get(&(topic.clone(), *partition)).copied();
        let (start, recreated) = start_of(
            &cfg,
            resume.get(&(topic.as_str(), *partition)).copied(),
            topic,
            (*low, *high),
            first_record_ms,
        );
        tracing::info!(
            topic,
            partition,
            low,
            high,
            start,
            recreated,
            "kafka partition assigned"
        );
        tpl.add_partition_offset(topic, *partition, Offset::Offset(start))
            .map_err(|e| SourceError::Fatal(e.to_string()))?;
        assigned.push(Assigned {
            topic: topic.clone(),
            partition: *partition,
            low: *low,
            high: *high,
            start,
            first_record_ms,
            recreated,
        });
    }
    let mut read = Partitions::new();
    for a in &assigned {
        read.entry(a.topic.clone()).or_default().insert(
            a.partition,
            Reading {
                next: a.start,
                low: a.low,
                first_ms: a.first_record_ms,
            },
        );
    }
    if out
        .send(&wire::encode(&Event::Partitions(assigned)))
        .await
        .is_err()
    {
        return Ok(ConsumerEnd::OutputClosed);
    }
    // Metadata and watermarks just came back: the brokers are reachable. The status tick
    // (high-water marks and client errors) keeps the state current from here on.
    let up = Event::Status(Status {
        connected: true,
        lag: Vec::new(),
    });
    if out.send(&wire::encode(&up)).await.is_err() {
        return Ok(ConsumerEnd::OutputClosed);
    }

    let consumer: Arc<StreamConsumer<Ctx>> = Arc::new(client(&cfg, new_ctx("fetch"))?);
    consumer
        .assign(&tpl)
        .map_err(|e| SourceError::Fatal(format!("assign: {e}")))?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A partition counts as recreated only when two checks in a row find its high-water mark
    // below our position and its first record is then not the one we knew (`replaced_logs`).
    let mut suspects: Vec<(String, i32)> = Vec::new();
    // A tick's broker round trips run on the blocking pool while records keep flowing: this
    // loop only starts them and takes their report.
    let mut checking: Option<tokio::task::JoinHandle<TickReport>> = None;
    // Records came in since the last report: the brokers answer, however slowly the
    // watermark requests of a tick come back.
    let mut received = false;
    let mut ticks: u32 = 0;
    let mut consume_errors = Quiet::default();
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => return Ok(ConsumerEnd::Shutdown),
            _ = tick.tick(), if checking.is_none() => {
                let positions: Vec<_> = read
                    .iter()
                    .flat_map(|(t, ps)| ps.iter().map(|(p, r)| (t.clone(), *p, r.next)))
                    .collect();
                let known: HashMap<(String, i32), i64> = read
                    .iter()
                    .flat_map(|(t, ps)| ps.iter().filter_map(|(p, r)| Some(((t.clone(), *p), r.first_ms?))))
                    .collect();
                ticks += 1;
                let check_partitions = ticks % PARTITION_CHECK == 0;
                let (p, topics, was) = (probe.clone(), cfg.topics.clone(), suspects.clone());
                checking = Some(tokio::task::spawn_blocking(move || {
                    tick_check(&p, &topics, &positions, &was, &known, check_partitions)
                }));
                continue;
            }
            report = async { checking.as_mut()?.await.ok() }, if checking.is_some() => {
                checking = None;
                let Some(TickReport { marks, now, twice, replaced, added }) = report else { continue };
                let broker_down = consumer.context().latest.lock().take().is_some_and(|s| !s.connected);
                let connected = !broker_down && answered(&marks, received);
                received = false;
                let lag = marks.iter().filter_map(|((t, p), next, h)| Some((t.clone(), *p, (h.as_ref()? - next).max(0)))).collect();
                if out.send(&wire::encode(&Event::Status(Status { connected, lag }))).await.is_err() {
                    return Ok(ConsumerEnd::OutputClosed);
                }
                if !replaced.is_empty() {
                    tracing::warn!(partitions = ?replaced, "kafka partition log shorter than our position twice in a row and its first record changed: recreated");
                    return Ok(ConsumerEnd::Recreated);
                }
                if !added.is_empty() {
                    tracing::warn!(partitions = ?added, "kafka topic has partitions we do not read (added since we assigned ours): restarting the consumer to read them from their start");
                    return Ok(ConsumerEnd::Repartitioned);
                }
                if !twice.is_empty() {
                    tracing::debug!(partitions = ?twice, "kafka high-water mark below our position, same log: not recreated");
                }
                suspects = now.into_iter().filter(|p| !twice.contains(p)).collect();
                continue;
            }
            m = consumer.recv() => match m {
                Ok(m) => {
                    received = true;
                    record_frame(&m, &mut read)
                }
                Err(e) => {
                    if let Some(held_back) = consume_errors.admit(&error_kind(&e), std::time::Instant::now()) {
                        tracing::warn!(error = %e, held_back, "kafka consume error (one line per kind and 10 s; held_back: of this kind since the last)");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(ConsumerEnd::Shutdown),
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                    continue;
                }
            },
        };
        if out.buffer(&frame).await.is_err() {
            return Ok(ConsumerEnd::OutputClosed);
        }
        // Take what librdkafka already holds without waiting, then flush once: one write
        // for a burst, and no record waits for a later one.
        for _ in 1..MAX_BATCH {
            let ready = tokio::select! {
                biased;
                m = consumer.recv() => m.ok().map(|m| record_frame(&m, &mut read)),
                _ = std::future::ready(()) => None,
            };
            let Some(frame) = ready else { break };
            if out.buffer(&frame).await.is_err() {
                return Ok(ConsumerEnd::OutputClosed);
            }
        }
        if out.flush().await.is_err() {
            return Ok(ConsumerEnd::OutputClosed);
        }
    }
}

/// Most records taken from librdkafka's queue before the buffered events are flushed.
const MAX_BATCH: usize = 256;

/// The event for a record, noting the partition's next offset (and its first record).
fn record_frame<M: Message>(m: &M, read: &mut Partitions) -> Vec<u8> {
    if let Some(r) = read
        .get_mut(m.topic())
        .and_then(|ps| ps.get_mut(&m.partition()))
    {
        r.saw(m);
    }
    wire::encode_record(
        m.topic(),
        m.partition(),
        m.offset(),
        m.timestamp().to_millis(),
        m.key(),
        m.payload(),
    )
}

/// The event stream to the shard: buffered, flushed explicitly.
struct Events<W: AsyncWrite + Unpin> {
    out: tokio::io::BufWriter<W>,
}

impl<W: AsyncWrite + Unpin> Events<W> {
    fn new(out: W) -> Self {
        Self {
            out: tokio::io::BufWriter::with_capacity(64 * 1024, out),
        }
    }

    /// Adds an event to the buffer (writing out what is there when it is full).
    async fn buffer(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.out.write_all(frame).await
    }

    /// Pushes every buffered byte to the reader.
    async fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush().await
    }

    /// One event, flushed.
    async fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.buffer(frame).await?;
        self.flush().await
    }
}

/// Our stdout as a non-blocking pipe writer on the reactor, when it is a pipe (as the shard
/// starts us). std's `Stdout`, which `tokio::io::stdout()` wraps, is line-buffered: a binary
/// event sat in it until a newline byte happened to pass.
fn stdout_pipe() -> Option<tokio::net::unix::pipe::Sender> {
    use std::os::fd::AsFd;
    let fd = std::io::stdout().as_fd().try_clone_to_owned().ok()?;
    tokio::net::unix::pipe::Sender::from_owned_fd(fd).ok()
}

/// Exit code of a consumer process that found a recreated partition.
pub const EXIT_RECREATED: i32 = 3;
/// Exit code of a consumer process that found partitions added to a topic.
pub const EXIT_REPARTITIONED: i32 = 4;

/// Entry point of the `ws-shard kafka-consumer` child process: reads its configuration as
/// one JSON line on stdin, writes events to stdout, stops when stdin closes. Returns the
/// process exit code.
pub async fn child_main() -> i32 {
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    if stdin.read_line(&mut line).await.is_err() {
        return 1;
    }
    let cfg: ConsumerConfig = match serde_json::from_str(&line) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "kafka consumer: bad configuration on stdin");
            return 1;
        }
    };
    let stop = CancellationToken::new();
    let watch = stop.clone();
    tokio::spawn(async move {
        // The parent keeps stdin open for as long as it wants us; EOF means it is gone.
        let mut rest = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stdin, &mut rest).await;
        watch.cancel();
    });
    let result = match stdout_pipe() {
        Some(pipe) => run(cfg, pipe, stop).await,
        // Not a pipe (started by hand): tokio's stdout works too, since every batch is
        // flushed, at the cost of a blocking-pool hop per write.
        None => run(cfg, tokio::io::stdout(), stop).await,
    };
    match result {
        Ok(ConsumerEnd::Recreated) => EXIT_RECREATED,
        Ok(ConsumerEnd::Repartitioned) => EXIT_REPARTITIONED,
        Ok(_) => 0,
        Err(e) => {
            tracing::error!(error = %e, "kafka consumer failed");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{answered, start_of, unread, ConsumerConfig, Quiet, Resume};
    use crate::StartPosition;
    use std::time::Duration;

    fn cfg(start: StartPosition, resume: Vec<Resume>) -> ConsumerConfig {
        ConsumerConfig {
            brokers: String::new(),
            topics: vec!["t".into(), "u".into()],
            start,
            resume,
            fetch_wait_max_ms: 10,
            properties: vec![],
        }
    }

    fn resume(topic: &str, partition: i32, next: i64, first: Option<i64>) -> Resume {
        Resume {
            topic: topic.into(),
            partition,
            next,
            first_record_ms: first,
        }
    }

    #[test]
    fn where_each_partition_is_read_from() {
        // First start: the configured start position.
        let first = cfg(StartPosition::Latest, vec![]);
        assert_eq!(start_of(&first, None, "t", (5, 50), Some(1)), (50, false));
        let back = cfg(StartPosition::Back(10), vec![]);
        assert_eq!(start_of(&back, None, "t", (5, 50), Some(1)), (40, false));
        assert_eq!(start_of(&back, None, "t", (45, 50), Some(1)), (45, false));

        // A restart: known partitions resume where the last consumer was...
        let known = resume("t", 0, 30, Some(1));
        let again = cfg(StartPosition::Latest, vec![known.clone()]);
        assert_eq!(
            start_of(&again, Some(&known), "t", (5, 50), Some(1)),
            (30, false)
        );
        // ...also under a stale (short) high-water mark of the same log...
        assert_eq!(
            start_of(&again, Some(&known), "t", (5, 20), Some(1)),
            (30, false)
        );
        // ...but a shorter log with another first record is a new one: from its start.
        assert_eq!(
            start_of(&again, Some(&known), "t", (0, 20), Some(2)),
            (0, true)
        );

        // A partition of a known topic that the last consumer did not have was added to the
        // topic since: all of it is new, from its start (not `latest`: that would skip what
        // was written to it before we noticed it).
        assert_eq!(start_of(&again, None, "t", (0, 7), Some(3)), (0, false));
        // A topic the last consumer had no partition of: the configured start.
        assert_eq!(start_of(&again, None, "u", (0, 7), Some(3)), (7, false));
    }

    #[test]
    fn a_repeated_client_error_is_logged_once_per_kind_and_interval() {
        let mut q = Quiet::default();
        let t0 = std::time::Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(q.admit("AllBrokersDown", at(0)), Some(0));
        assert_eq!(q.admit("AllBrokersDown", at(1_000)), None);
        assert_eq!(q.admit("AllBrokersDown", at(2_000)), None);
        // Another kind is not held back by the first.
        assert_eq!(q.admit("BrokerTransportFailure", at(2_500)), Some(0));
        // After the interval: logged, with the count held back meanwhile.
        assert_eq!(q.admit("AllBrokersDown", at(10_000)), Some(2));
        assert_eq!(q.admit("AllBrokersDown", at(10_500)), None);
        assert_eq!(q.admit("AllBrokersDown", at(20_000)), Some(1));
    }

    #[test]
    fn partitions_not_read_are_found_per_topic() {
        let read = vec![
            ("t".to_owned(), 0, 5),
            ("t".to_owned(), 1, 5),
            ("u".to_owned(), 0, 1),
        ];
        assert!(unread("t", [0, 1].into_iter(), &read).is_empty());
        assert_eq!(
            unread("t", [0, 1, 2, 3].into_iter(), &read),
            vec![("t".to_owned(), 2), ("t".to_owned(), 3)]
        );
        assert_eq!(
            unread("u", [0, 1].into_iter(), &read),
            vec![("u".to_owned(), 1)]
        );
        assert_eq!(
            unread("v", [0].into_iter(), &read),
            vec![("v".to_owned(), 0)]
        );
    }

    fn mark(h: Option<i64>) -> ((String, i32), i64, Option<i64>) {
        (("t".to_owned(), 0), 5, h)
    }

    #[test]
    fn a_tick_counts_the_brokers_reachable_when_anything_answered() {
        // Every mark missed its timeout and nothing arrived: down.
        assert!(!answered(&[mark(None), mark(None)], false));
        // One slow partition among answered ones: up (this used to say down).
        assert!(answered(&[mark(Some(7)), mark(None)], false));
        // No mark in time, but records flowed since the last tick: up.
        assert!(answered(&[mark(None)], true));
        assert!(answered(&[mark(Some(7))], false));
        // Nothing assigned: nothing to ask, not a broker failure.
        assert!(answered(&[], false));
    }
}
