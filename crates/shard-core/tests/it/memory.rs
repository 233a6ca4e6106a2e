//! A million distinct keys through one hub: resident memory stays under the history budget
//! plus a stated overhead, while hot channels keep full fan-out and exact recovery, and
//! evicted keys answer `recovered:false`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shard_core::hub::{EvictionCause, Publication, Subscriber};
use shard_core::queue::ConnQueue;
use shard_core::{Hub, HubConfig};
use ws_protocol::{ChannelName, Position, ServerMessage};

const KEYS: u64 = 1_000_000;
const BUDGET: usize = 64 << 20;
/// What RSS may exceed the budget by: allocator slack and fragmentation of the freed
/// channels (glibc keeps freed chunks for reuse), hash tables sized for their peak between
/// shrinks, and the test's own buffers. Stated in docs/runbook.md ("Memory").
const OVERHEAD: usize = BUDGET / 4 + (16 << 20);
const HOT: usize = 8;
const SUBSCRIBERS_PER_HOT: usize = 3;

fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn seq_of(frame: &Bytes) -> u64 {
    let start = if frame[1] == 126 { 4 } else { 2 };
    match ServerMessage::decode(&frame[start..]).unwrap() {
        ServerMessage::Message { seq, .. } => seq,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_million_keys_stay_within_the_budget_with_hot_channels_intact() {
    let hub = Hub::new(
        HubConfig {
            history_budget: BUDGET,
            ..HubConfig::default()
        },
        1,
        "e",
    );
    let epoch: Arc<str> = Arc::from("e");
    let hot: Vec<ChannelName> = (0..HOT)
        .map(|i| ChannelName::new(&format!("trades.HOT-{i}")).unwrap())
        .collect();
    let subs: Vec<Vec<Subscriber>> = hot
        .iter()
        .map(|c| {
            (0..SUBSCRIBERS_PER_HOT)
                .map(|_| {
                    let s = Subscriber {
                        id: hub.next_subscriber_id(),
                        shard: 0,
                        queue: Arc::new(ConnQueue::new(1 << 16)),
                    };
                    hub.subscribe(c, None, s.clone()).unwrap();
                    s
                })
                .collect()
        })
        .collect();
    let mut received = vec![vec![0u64; SUBSCRIBERS_PER_HOT]; HOT];
    let mut hot_seq = 0u64;
    let mut sink = VecDeque::new();
    let start = Instant::now();
    let rss0 = rss();
    let mut peak = rss0;
    for i in 0..KEYS {
        let key = ChannelName::new(&format!("user.user-{i}")).unwrap();
        let data = format!(
            r#"{{"user":"user-{i}","balance":{},"ccy":"USD","ts":1795803982627}}"#,
            i * 7
        );
        hub.publish(&Publication::encode(
            key,
            epoch.clone(),
            i + 1,
            1,
            &data,
            None,
        ));
        if i % 1000 == 999 {
            hot_seq += 1;
            for c in &hot {
                let data = format!(r#"{{"px":{hot_seq},"qty":0.5}}"#);
                hub.publish(&Publication::encode(
                    c.clone(),
                    epoch.clone(),
                    hot_seq,
                    1,
                    &data,
                    None,
                ));
            }
            // Fan-out stays complete and in order for every subscriber of every hot channel.
            for (h, list) in subs.iter().enumerate() {
                for (k, s) in list.iter().enumerate() {
                    assert!(!s.queue.drain_into(&mut sink), "no overflow");
                    for f in sink.drain(..) {
                        let got = seq_of(&f);
                        assert_eq!(got, received[h][k] + 1, "hot {h} subscriber {k}");
                        received[h][k] = got;
                    }
                }
            }
        }
        if i % 50_000 == 0 {
            hub.maintain(Instant::now());
            peak = peak.max(rss());
            assert!(
                hub.stats().history_bytes <= BUDGET + 4096,
                "{:?}",
                hub.stats()
            );
        }
    }
    hub.maintain(Instant::now());
    peak = peak.max(rss());
    let stats = hub.stats();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{KEYS} keys in {secs:.1}s: RSS {} MiB -> peak {} MiB (budget {} MiB, +{} MiB allowed); \
         ledger {} MiB; {} channels, {} positions; evictions budget {} idle {} position {}",
        rss0 >> 20,
        peak >> 20,
        BUDGET >> 20,
        OVERHEAD >> 20,
        stats.history_bytes >> 20,
        stats.channels,
        stats.positions,
        hub.evictions(EvictionCause::Budget),
        hub.evictions(EvictionCause::Idle),
        hub.evictions(EvictionCause::Position),
    );
    assert!(
        peak - rss0 <= BUDGET + OVERHEAD,
        "RSS grew by {} MiB, budget {} MiB + overhead {} MiB",
        (peak - rss0) >> 20,
        BUDGET >> 20,
        OVERHEAD >> 20
    );
    assert!(hub.evictions(EvictionCause::Budget) > 0);
    assert!(
        hub.evictions(EvictionCause::Position) > 0,
        "some keys forgotten entirely"
    );
    assert!(received.iter().flatten().all(|&n| n == hot_seq));

    // Hot channels recover exactly (their whole ring survived a million one-off keys).
    for c in &hot {
        let since = hot_seq - 500;
        let s = Subscriber {
            id: hub.next_subscriber_id(),
            shard: 0,
            queue: Arc::new(ConnQueue::new(16)),
        };
        let r = hub
            .subscribe(
                c,
                Some(&Position {
                    epoch: "e".into(),
                    seq: since,
                }),
                s,
            )
            .unwrap();
        assert!(r.recovered, "{c}");
        let replayed: Vec<u64> = r.replay.iter().map(seq_of).collect();
        assert_eq!(replayed, (since + 1..=hot_seq).collect::<Vec<_>>());
    }
    // An early key is gone: asking for its message gets recovered:false, never a gap —
    // whether its position was kept or forgotten entirely.
    for i in [0u64, 1, 2, 10_000] {
        let key = ChannelName::new(&format!("user.user-{i}")).unwrap();
        let s = Subscriber {
            id: hub.next_subscriber_id(),
            shard: 0,
            queue: Arc::new(ConnQueue::new(16)),
        };
        let r = hub
            .subscribe(
                &key,
                Some(&Position {
                    epoch: "e".into(),
                    seq: i,
                }),
                s,
            )
            .unwrap();
        assert!(!r.recovered, "user-{i}");
        assert!(r.replay.is_empty());
    }
    // Idle channels leave: an hour later only the subscribed hot channels are left.
    hub.maintain(Instant::now() + Duration::from_secs(3600));
    let after = hub.stats();
    assert!(after.channels <= HOT + 4, "{after:?}");
}
