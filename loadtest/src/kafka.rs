//! `loadtest kafka-produce` and `loadtest kafka-consume`: a paced, timestamped Kafka producer
//! and a plain consumer measuring the broker's own produce-to-consumer latency, so that what
//! the gateway adds on top can be measured in the same run (`make bench-kafka`).
//!
//! Records are `{"ts_us":<unix micros when handed to the producer>,"n":<k>}` with key
//! `k<n mod keys>`, the shape the connection run's delivery latency reads (`data.ts_us`). The
//! producer keeps to an absolute schedule (record `n` is due at `t0 + n / rate`) and reports
//! how far behind it fell, like the connection ramp does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Serialize;

use crate::cli::{KafkaBrokerArgs, KafkaConsumeArgs, KafkaProduceArgs};
use crate::report::Percentiles;
use crate::spec::parse_duration;
use crate::stats::{new_histogram, unix_us, MAX_US};

/// What `kafka-produce` did.
#[derive(Debug, Serialize)]
pub struct ProduceReport {
    pub rate: f64,
    pub seconds: f64,
    pub records: u64,
    /// Records whose delivery report was an error (0 in a good run).
    pub failed: u64,
    /// Seconds the producer finished after its schedule's end (its own lag).
    pub behind_s: f64,
    /// Records per key (`k0`, `k1`, ...), for completeness checks downstream.
    pub per_key: BTreeMap<String, u64>,
}

/// Counts records the broker did not take.
#[derive(Debug, Default)]
struct Counting {
    failed: AtomicU64,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.failed.fetch_add(1, Relaxed);
        }
    }
}

/// Produces `args.rate` records/s for `args.duration`.
pub fn produce(args: &KafkaProduceArgs) -> anyhow::Result<ProduceReport> {
    if args.rate <= 0.0 || !args.rate.is_finite() {
        bail!("--rate must be positive");
    }
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    let seconds = parse_duration(&args.duration)?.as_secs_f64();
    let producer: ThreadedProducer<Counting> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("client.id", "odin-ws-loadtest-producer")
        // linger.ms: 0 sends each record at once, but then every record is its own produce
        // request (requests are pipelined, nothing batches) and a small broker saturates
        // near 1,000/s; librdkafka's default of 5 ms batches. The stamp is taken before the
        // linger, so it counts in the gateway's and the reference consumer's latency alike.
        .set("linger.ms", args.linger_ms.to_string())
        .set("acks", "1")
        .set("socket.nagle.disable", "true")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(Counting::default())
        .context("creating the Kafka producer")?;
    let total = (args.rate * seconds).round() as u64;
    let mut per_key: BTreeMap<String, u64> = BTreeMap::new();
    let t0 = Instant::now();
    let mut n = 0u64;
    while n < total {
        let due = ((t0.elapsed().as_secs_f64() * args.rate) as u64 + 1).min(total);
        while n < due {
            let key = format!("k{}", n % args.keys);
            let value = format!("{{\"ts_us\":{},\"n\":{n}}}", unix_us());
            let mut record = BaseRecord::to(&args.topic).key(&key).payload(&value);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((e, r)) => {
                        if !matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ) {
                            bail!("producing: {e}");
                        }
                        record = r;
                        producer.poll(Duration::from_millis(1));
                    }
                }
            }
            *per_key.entry(key).or_default() += 1;
            n += 1;
        }
        let next = t0 + Duration::from_secs_f64(n as f64 / args.rate);
        let now = Instant::now();
        if next > now {
            std::thread::sleep((next - now).min(Duration::from_millis(1)));
        }
    }
    producer
        .flush(Duration::from_secs(60))
        .context("flushing the producer")?;
    let behind_s = (t0.elapsed().as_secs_f64() - seconds).max(0.0);
    // Records still in flight after the flush never got a delivery report: count them too.
    let failed = producer.context().failed.load(Relaxed)
        + u64::try_from(producer.in_flight_count()).unwrap_or(0);
    Ok(ProduceReport {
        rate: args.rate,
        seconds,
        records: n,
        failed,
        behind_s,
        per_key,
    })
}

/// What `kafka-consume` saw.
#[derive(Debug, Serialize)]
pub struct ConsumeReport {
    pub records: u64,
    /// Records without a readable `ts_us`.
    pub unstamped: u64,
    /// Receive time minus `ts_us`, microseconds.
    pub latency_us: Percentiles,
}

/// Consumes every partition of `args.topic` from its end for `args.duration`. Prints `ready`
/// on stdout once the assignment is in place, so a caller can start producing.
pub fn consume(args: &KafkaConsumeArgs) -> anyhow::Result<ConsumeReport> {
    let wait = parse_duration(&args.fetch_wait_max)?;
    let seconds = parse_duration(&args.duration)?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("client.id", "odin-ws-loadtest-consumer")
        .set(
            "group.id",
            format!("odin-ws-loadtest-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        // As the shard's consumer: answer as soon as one record exists, wait at most this.
        .set("fetch.wait.max.ms", wait.as_millis().to_string())
        .set("fetch.min.bytes", "1")
        .set("socket.nagle.disable", "true")
        .create()
        .context("creating the Kafka consumer")?;
    let md = consumer
        .fetch_metadata(Some(&args.topic), Duration::from_secs(10))
        .context("topic metadata")?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            let (_, high) = consumer
                .fetch_watermarks(&args.topic, p.id(), Duration::from_secs(10))
                .context("watermarks")?;
            tpl.add_partition_offset(&args.topic, p.id(), Offset::Offset(high))
                .context("assignment")?;
        }
    }
    if tpl.count() == 0 {
        bail!("topic {} has no partitions", args.topic);
    }
    consumer.assign(&tpl).context("assign")?;
    println!("ready");
    let mut hist = new_histogram();
    let (mut records, mut unstamped) = (0u64, 0u64);
    let end = Instant::now() + seconds;
    while Instant::now() < end {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let Ok(m) = m else { continue };
        let now = unix_us();
        records += 1;
        match m.payload().and_then(stamp) {
            Some(ts) => {
                let _ = hist.record(now.saturating_sub(ts).clamp(1, MAX_US));
            }
            None => unstamped += 1,
        }
    }
    Ok(ConsumeReport {
        records,
        unstamped,
        latency_us: Percentiles::of(&hist),
    })
}

/// Runs librdkafka's mock cluster with `args.topic` created until SIGTERM or SIGINT.
///
/// A Kafka-protocol broker in C that keeps its log in memory and answers in microseconds,
/// where tansu (the broker the tests use) takes seconds at 1,000 records/s on this machine:
/// `make bench-kafka` needs a broker faster than the 2 ms it measures. Its one deviation
/// that matters there: a fetch that finds no data waits its full `fetch.wait.max.ms` even if
/// a record arrives meanwhile (a real broker answers at once), so on an idle topic every
/// consumer's latency gains up to that wait (10 ms for the shard and the reference alike).
pub async fn broker(args: &KafkaBrokerArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    if args.partitions < 1 || args.mock_brokers < 1 {
        bail!("--partitions and --mock-brokers must be at least 1");
    }
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let cluster = rdkafka::mocking::MockCluster::new(args.mock_brokers)
        .map_err(|e| anyhow::anyhow!("starting the mock cluster: {e}"))?;
    cluster
        .create_topic(&args.topic, args.partitions, 1)
        .map_err(|e| anyhow::anyhow!("creating topic {}: {e}", args.topic))?;
    // println! goes through a line-buffered stdout: each line is flushed at its newline.
    println!("bootstrap {}", cluster.bootstrap_servers());
    println!("ready");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    drop(cluster);
    Ok(())
}

/// The `ts_us` of a record's JSON value.
fn stamp(payload: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Stamp {
        ts_us: u64,
    }
    serde_json::from_slice::<Stamp>(payload)
        .ok()
        .map(|s| s.ts_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kafka-produce` against librdkafka's mock broker (what `loadtest kafka-broker` runs):
    /// every record acknowledged, keyed round-robin and stamped, and readable back.
    #[test]
    fn produced_records_reach_the_mock_broker_stamped() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("md", 3, 1).unwrap();
        let args = KafkaProduceArgs {
            brokers: cluster.bootstrap_servers(),
            topic: "md".into(),
            rate: 400.0,
            duration: "250ms".into(),
            keys: 7,
            linger_ms: 5,
            json: None,
        };
        let report = produce(&args).unwrap();
        assert_eq!((report.records, report.failed), (100, 0));
        assert_eq!(report.per_key.len(), 7);
        assert_eq!(report.per_key.values().sum::<u64>(), 100);

        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "produce-test")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition_offset("md", p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let (mut seen, mut stamped) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen < 100 && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                seen += 1;
                stamped += usize::from(m.payload().and_then(stamp).is_some());
            }
        }
        assert_eq!((seen, stamped), (100, 100));
    }

    #[test]
    fn stamps_are_read_from_the_record_value() {
        assert_eq!(stamp(br#"{"ts_us":17,"n":3}"#), Some(17));
        assert_eq!(stamp(br#"{"n":3}"#), None);
        assert_eq!(stamp(b"not json"), None);
    }
}
