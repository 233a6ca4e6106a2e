//! The Kafka source against librdkafka's in-process mock cluster (the real Kafka protocol
//! over TCP): mapping, positions, invalid records, broker loss, agreement between processes.

use std::collections::HashMap;
use std::time::Duration;

use kafka_source::{KafkaConfig, StartPosition};
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use test_support::http::{get, metric, wait_until};
use test_support::start_shards;
use test_support::ws::{connect, next_event, next_msg, send, subscribe, Client, Event};
use ws_protocol::ServerMessage;

fn kafka(brokers: &str, start: StartPosition) -> ws_shard::SourceConfig {
    ws_shard::SourceConfig::Kafka(KafkaConfig {
        brokers: brokers.to_owned(),
        topics: vec!["trades".into()],
        start,
        channel_template: "{topic}.{key}".into(),
        fetch_wait_max: Duration::from_millis(10),
        warmup_timeout: Duration::from_secs(30),
        overrides: vec![],
        isolation: kafka_source::Isolation::InProcess,
    })
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "0")
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap()
}

/// Produces and returns (partition, offset).
async fn produce(p: &FutureProducer, key: &str, value: &str) -> (i32, i64) {
    let d = p
        .send(
            FutureRecord::to("trades").key(key).payload(value),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    (d.partition, d.offset)
}

async fn wait_source_connected(srv: &test_support::TestShards) {
    assert!(
        wait_until(Duration::from_secs(20), || async {
            let h = get(srv.shards[0], "/health").await.unwrap().body;
            h.contains("\"connected\":true")
        })
        .await
    );
}

async fn messages(ws: &mut Client, n: usize) -> Vec<(String, u64, serde_json::Value)> {
    let mut out = Vec::new();
    while out.len() < n {
        if let ServerMessage::Message {
            epoch, seq, data, ..
        } = next_msg(ws).await.unwrap()
        {
            out.push((epoch, seq, data));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_fan_out_with_their_offset_as_seq() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("trades", 3, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let srv = start_shards(1, |c| c.source = kafka(&brokers, StartPosition::Latest)).await;
    wait_source_connected(&srv).await;
    let keys: Vec<String> = (0..10).map(|i| format!("SYM{i}")).collect();
    let mut clients = Vec::new();
    for k in &keys[..3] {
        let mut ws = connect(&srv.ws_url(0)).await.unwrap();
        subscribe(&mut ws, &[&format!("trades.{k}")]).await.unwrap();
        clients.push(ws);
    }
    let p = producer(&brokers);
    let mut sent: HashMap<String, Vec<(i32, i64, u64)>> = HashMap::new();
    for n in 0..300u64 {
        let key = &keys[(n % 10) as usize];
        let (part, off) = produce(&p, key, &format!(r#"{{"n":{n}}}"#)).await;
        sent.entry(key.clone()).or_default().push((part, off, n));
    }
    for (ws, key) in clients.iter_mut().zip(&keys) {
        let expected = &sent[key];
        let got = messages(ws, expected.len()).await;
        for ((epoch, seq, data), (part, off, n)) in got.iter().zip(expected) {
            assert_eq!(*seq, *off as u64, "seq is the offset");
            assert!(epoch.starts_with(&format!("trades-{part}-")), "{epoch}");
            assert_eq!(data["n"], *n);
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), next_msg(ws))
                .await
                .is_err(),
            "nothing extra"
        );
    }
    srv.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_are_counted_and_skipped() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("trades", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let srv = start_shards(1, |c| c.source = kafka(&brokers, StartPosition::Latest)).await;
    wait_source_connected(&srv).await;
    let mut ws = connect(&srv.ws_url(0)).await.unwrap();
    subscribe(&mut ws, &["trades.A"]).await.unwrap();
    let p = producer(&brokers);
    produce(&p, "A", "{not json").await;
    produce(&p, "bad key!", "{}").await;
    p.send(
        FutureRecord::<(), _>::to("trades").payload("{}"),
        Duration::from_secs(5),
    )
    .await
    .map_err(|(e, _)| e)
    .unwrap();
    let (_, off) = produce(&p, "A", r#"{"ok":true}"#).await;
    let got = messages(&mut ws, 1).await;
    assert_eq!(got[0].1, off as u64);
    assert_eq!(got[0].2, serde_json::json!({"ok": true}));
    let page = srv.metrics().await;
    assert_eq!(
        metric(
            &page,
            "ws_kafka_invalid_records_total",
            &["reason=\"invalid_json\""]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &page,
            "ws_kafka_invalid_records_total",
            &["reason=\"bad_channel\""]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &page,
            "ws_kafka_invalid_records_total",
            &["reason=\"no_key\""]
        ),
        1.0
    );
    assert_eq!(metric(&page, "ws_kafka_records_total", &[]), 4.0);
    srv.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_loss_keeps_clients_and_resumes_without_gap_or_duplicate() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("trades", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let srv = start_shards(1, |c| c.source = kafka(&brokers, StartPosition::Latest)).await;
    wait_source_connected(&srv).await;
    let mut ws = connect(&srv.ws_url(0)).await.unwrap();
    subscribe(&mut ws, &["trades.A"]).await.unwrap();
    let p = producer(&brokers);
    let mut offsets = Vec::new();
    for n in 0..20 {
        offsets.push(produce(&p, "A", &n.to_string()).await.1);
    }
    let before = messages(&mut ws, 20).await;
    cluster.broker_down(1).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            get(srv.shards[0], "/health")
                .await
                .unwrap()
                .body
                .contains("\"connected\":false")
        })
        .await,
        "health shows the consumer disconnected"
    );
    // Produced during the outage: queued by the producer, written when the broker is back.
    let payloads: Vec<String> = (20..40).map(|n: i32| n.to_string()).collect();
    let pending: Vec<_> = payloads
        .iter()
        .map(|v| {
            p.send_result(FutureRecord::to("trades").key("A").payload(v))
                .map_err(|(e, _)| e)
                .unwrap()
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.broker_up(1).unwrap();
    for f in pending {
        offsets.push(f.await.unwrap().map_err(|(e, _)| e).unwrap().offset);
    }
    let after = messages(&mut ws, 20).await;
    let seqs: Vec<u64> = before.iter().chain(&after).map(|m| m.1).collect();
    assert_eq!(
        seqs,
        offsets.iter().map(|o| *o as u64).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    send(&mut ws, r#"{"type":"ping","id":1}"#).await.unwrap();
    assert_eq!(
        next_msg(&mut ws).await.unwrap(),
        ServerMessage::Pong { id: Some(1) },
        "the client stayed connected"
    );
    p.flush(Duration::from_secs(5)).unwrap();
    srv.kill();
}

/// A broker slow to answer fetches must still deliver, and the shard must still see how far
/// behind it is. The status tick asks for high-water marks every second with an 800 ms
/// timeout; asked on the fetching client, that request queued on the fetching connection
/// behind a slow fetch (a broker answers a connection's requests in order), timed out, and
/// librdkafka drops a connection on a timed-out request (`socket.max.fails=1`), the fetch's
/// answer with it: once fetches took longer than the tick's timeout, no fetch ever
/// completed. Found in CI's `kafka-restart` cluster scenario (one shard got no record for
/// two minutes after tansu's restart; librdkafka: "Timed out ListOffsetsRequest in flight
/// ... possibly held back by preceeding FetchRequest"). Here the mock broker answers every
/// fetch 6 s late; the lag must show the records produced meanwhile, and they must arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_slow_to_answer_fetches_still_delivers() {
    use rdkafka::types::RDKafkaApiKey::Fetch;
    let mock = test_support::kafka::MockKafka::new(1);
    mock.cluster().create_topic("trades", 1, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let srv = start_shards(1, |c| c.source = kafka(&brokers, StartPosition::Latest)).await;
    wait_source_connected(&srv).await;
    let mut ws = connect(&srv.ws_url(0)).await.unwrap();
    subscribe(&mut ws, &["trades.A"]).await.unwrap();
    let p = producer(&brokers);
    let first = produce(&p, "A", "0").await.1;
    assert_eq!(messages(&mut ws, 1).await[0].1, first as u64);

    // From here on every fetch is answered 6 s late (no error, just late).
    const LATE: usize = 1000;
    mock.answer_late(1, Fetch, LATE, Duration::from_secs(6));
    assert!(
        wait_until(Duration::from_secs(20), || async {
            mock.late_answers_left(1, Fetch) < LATE
        })
        .await,
        "the consumer fetches"
    );
    // One batch (the mock answers a fetch with one batch), so that one late fetch brings all.
    let batching: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "100")
        .create()
        .unwrap();
    let payloads: Vec<String> = (1..=5).map(|n: i32| n.to_string()).collect();
    let pending: Vec<_> = payloads
        .iter()
        .map(|v| {
            batching
                .send_result(FutureRecord::to("trades").key("A").payload(v))
                .map_err(|(e, _)| e)
                .unwrap()
        })
        .collect();
    let mut offsets = Vec::new();
    for f in pending {
        offsets.push(f.await.unwrap().map_err(|(e, _)| e).unwrap().offset as u64);
    }
    // Until the late fetch brings them (at least 6 s), the tick reports them as lag.
    let lag = || async {
        metric(
            &srv.metrics().await,
            kafka_source::LAG,
            &["topic=\"trades\"", "partition=\"0\""],
        )
    };
    assert!(
        wait_until(Duration::from_secs(20), || async { lag().await == 5.0 }).await,
        "the lag shows the 5 records a late fetch holds (last seen {})",
        lag().await
    );
    let mut seqs = Vec::new();
    while seqs.len() < offsets.len() {
        match next_event(&mut ws, Duration::from_secs(30)).await {
            Ok(Event::Msg(ServerMessage::Message { seq, .. })) => seqs.push(seq),
            Ok(Event::Msg(_)) => {}
            other => panic!(
                "records produced while fetches are answered 6 s late did not arrive in 30 s \
                 (got {seqs:?} of {offsets:?}; {other:?}): is a status request on the \
                 fetching connection timing out and taking the fetch down with it?"
            ),
        }
    }
    assert_eq!(seqs, offsets, "no gap, no duplicate");
    assert!(
        wait_until(Duration::from_secs(20), || async { lag().await == 0.0 }).await,
        "the lag is back to 0 once they are read"
    );
    p.flush(Duration::from_secs(5)).unwrap();
    srv.kill();
}

/// A start asks for every partition's watermarks at once: one ListOffsets request per kind
/// (earliest, latest) and broker. It asked two per partition, one after the other
/// (`fetch_watermarks`), so a 64-partition topic cost 128 round trips to the broker before
/// the first fetch (computed: over half a second of `starting` per shard start with the
/// broker 5 ms away). Counted on the mock broker's request log, up to the consumer's first
/// fetch (the status tick adds one ListOffsets per second after that, so the bound leaves
/// room for a few ticks on a slow machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_asks_every_partitions_watermarks_at_once() {
    use rdkafka::types::RDKafkaApiKey::{Fetch, ListOffsets};
    let mock = test_support::kafka::MockKafka::new(1);
    mock.cluster().create_topic("trades", 64, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    mock.track_requests();
    let srv = start_shards(1, |c| c.source = kafka(&brokers, StartPosition::Latest)).await;
    wait_source_connected(&srv).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            mock.requests().contains(&i16::from(Fetch))
        })
        .await,
        "the consumer fetches"
    );
    let asked = mock
        .requests()
        .into_iter()
        .take_while(|&k| k != i16::from(Fetch))
        .filter(|&k| k == i16::from(ListOffsets))
        .count();
    eprintln!("ListOffsets requests before the first fetch: {asked}");
    assert!(
        (2..=8).contains(&asked),
        "ListOffsets requests before the first fetch: {asked} (two per partition would be 128)"
    );
    srv.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_agree_and_history_warms_from_kafka() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("trades", 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let p = producer(&brokers);
    let mut sent = Vec::new();
    for n in 0..40 {
        sent.push(produce(&p, "X", &n.to_string()).await);
    }
    // Two independent "processes", both warming their history from Kafka.
    let a = start_shards(1, |c| c.source = kafka(&brokers, StartPosition::Back(1000))).await;
    let b = start_shards(1, |c| c.source = kafka(&brokers, StartPosition::Back(1000))).await;
    wait_source_connected(&a).await;
    wait_source_connected(&b).await;
    let mut positions = Vec::new();
    for srv in [&a, &b] {
        let mut ws = connect(&srv.ws_url(0)).await.unwrap();
        let since = sent[9].1;
        // Wait until the warm-up reached the last record, then recover from the 10th.
        assert!(
            wait_until(Duration::from_secs(10), || async {
                let mut probe = connect(&srv.ws_url(0)).await.unwrap();
                matches!(subscribe(&mut probe, &["trades.X"]).await.unwrap()[0], ServerMessage::Subscribed { seq, .. } if seq == sent[39].1 as u64)
            })
            .await
        );
        let mut probe = connect(&srv.ws_url(0)).await.unwrap();
        let ServerMessage::Subscribed { epoch, .. } = subscribe(&mut probe, &["trades.X"])
            .await
            .unwrap()
            .remove(0)
        else {
            panic!()
        };
        send(&mut ws, &format!(r#"{{"type":"subscribe","channels":["trades.X"],"since":{{"trades.X":{{"epoch":"{epoch}","seq":{since}}}}}}}"#)).await.unwrap();
        match next_msg(&mut ws).await.unwrap() {
            ServerMessage::Subscribed {
                recovered: true, ..
            } => {}
            other => panic!("{other:?}"),
        }
        let got = messages(&mut ws, 30).await;
        assert_eq!(
            got.iter().map(|m| m.1).collect::<Vec<_>>(),
            sent[10..].iter().map(|s| s.1 as u64).collect::<Vec<_>>()
        );
        positions.push(got.into_iter().map(|(e, s, _)| (e, s)).collect::<Vec<_>>());
    }
    assert_eq!(
        positions[0], positions[1],
        "same (epoch, seq) for the same record in both processes"
    );
    a.kill();
    b.kill();
}

/// What `/health` says about shard 0: (HTTP status, `status` field).
async fn shard_status(srv: &test_support::TestShards) -> (u16, String) {
    let r = get(srv.shards[0], "/health").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    (
        r.status,
        v["status"].as_str().unwrap_or_default().to_owned(),
    )
}

/// A shard that warms its history from Kafka reports `starting` (503) until the warm-up has
/// read up to where the partitions ended at start, so a load balancer places nobody on it
/// before a client resuming with `since` can recover: the first `ok` already recovers
/// everything. (Before, `/health` said `ok` at once and such a client got
/// `recovered: false` for what was still being re-read.)
#[tokio::test]
async fn a_warming_shard_reports_starting_until_its_history_is_read() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("trades", 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let p = producer(&brokers);
    let mut sent = Vec::new();
    for n in 0..200 {
        sent.push(produce(&p, &format!("K{}", n % 20), &n.to_string()).await);
    }
    let srv = start_shards(1, |c| c.source = kafka(&brokers, StartPosition::Back(1000))).await;
    // Poll as a load balancer does; take the first `ok`.
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, status) = shard_status(&srv).await;
        assert!(status == "ok" || status == "starting", "{status}");
        assert_eq!(code, if status == "ok" { 200 } else { 503 }, "{status}");
        // Liveness stays 200 throughout: a warm-up is no reason to recreate the VM.
        assert_eq!(get(srv.shards[0], "/live").await.unwrap().status, 200);
        seen.push(status.clone());
        if status == "ok" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ok: {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every channel's history is complete: a resume from before its first record recovers.
    let mut ws = connect(&srv.ws_url(0)).await.unwrap();
    for k in 0..20 {
        let channel = format!("trades.K{k}");
        let mine: Vec<_> = sent
            .iter()
            .enumerate()
            .filter(|(n, _)| n % 20 == k)
            .map(|(_, s)| *s)
            .collect();
        let ServerMessage::Subscribed { epoch, .. } =
            subscribe(&mut connect(&srv.ws_url(0)).await.unwrap(), &[&channel])
                .await
                .unwrap()
                .remove(0)
        else {
            panic!()
        };
        send(&mut ws, &format!(r#"{{"type":"subscribe","channels":["{channel}"],"since":{{"{channel}":{{"epoch":"{epoch}","seq":{}}}}}}}"#, mine[0].1)).await.unwrap();
        match next_msg(&mut ws).await.unwrap() {
            ServerMessage::Subscribed {
                recovered: true,
                seq,
                ..
            } => assert_eq!(
                seq,
                mine.last().unwrap().1 as u64,
                "{channel}: seen {seen:?}"
            ),
            other => panic!("{channel}: {other:?} (health polls saw {seen:?})"),
        }
        let got = messages(&mut ws, mine.len() - 1).await;
        assert_eq!(
            got.iter().map(|m| m.1).collect::<Vec<_>>(),
            mine[1..].iter().map(|s| s.1 as u64).collect::<Vec<_>>(),
            "{channel}"
        );
    }
    srv.kill();
}

/// One shard warming its history from a broker that is not there, for at most
/// `warmup_timeout`.
async fn without_broker(warmup_timeout: Duration) -> test_support::TestShards {
    test_support::start_warming_shard_at(([127, 0, 0, 1], 0).into(), warmup_timeout).await
}

/// While it is `starting` a shard refuses upgrades (503 "shard starting", counted) instead
/// of taking a client it could only tell `recovered: false`: its `/health` keeps ws-lb away,
/// but a breaker's trial or a direct client can dial before anyone has polled it. (Before,
/// the upgrade succeeded: six clients of a whole-tier restart through ws-lb got
/// `recovered: false`, `cluster-shard-outage-20261130T050326.json`.)
#[tokio::test]
async fn a_starting_shard_refuses_upgrades() {
    // The warm-up cannot finish, and lasts past this test.
    let srv = without_broker(Duration::from_secs(600)).await;
    assert_eq!(shard_status(&srv).await, (503, "starting".to_owned()));
    let mut stream = test_support::ws::refused_as_not_ready(srv.shards[0], "starting").await;
    // The reason is the body; read until it has arrived (or the shard closed, or 10 s).
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&body).contains("shard starting") {
            match tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => body.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("shard starting"), "{body:?}");
    let page = srv.metrics().await;
    assert_eq!(
        metric(
            &page,
            "ws_shard_connections_rejected_total",
            &["reason=\"starting\""]
        ),
        1.0
    );
    assert_eq!(
        metric(&page, "ws_shard_connections_accepted_total", &[]),
        0.0
    );
    srv.kill();
}

/// A warm-up that cannot finish (no broker) holds the shard in `starting` only for
/// `kafka_warmup_timeout`; then it takes clients.
#[tokio::test]
async fn a_warmup_that_cannot_finish_ends_at_its_timeout() {
    let started = std::time::Instant::now();
    let srv = without_broker(Duration::from_millis(1500)).await;
    let (code, status) = shard_status(&srv).await;
    // Polled at once: well inside the timeout unless this machine stalled for a second.
    if started.elapsed() < Duration::from_millis(1000) {
        assert_eq!((code, status.as_str()), (503, "starting"));
    }
    assert!(
        wait_until(Duration::from_secs(20), || async {
            shard_status(&srv).await == (200, "ok".to_owned())
        })
        .await
    );
    // The timer starts after `started`: the first `ok` cannot come sooner.
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // ... and the upgrades it refused while starting now succeed.
    connect(&srv.ws_url(0)).await.unwrap();
    srv.kill();
}
