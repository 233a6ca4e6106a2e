//! Hub tests: fan-out, recovery, ordering, and the memory bound — budget eviction, idle
//! eviction, kept positions, floors, the placeholder cap — with recovery answers checked
//! against what was really published.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use ws_protocol::ServerMessage;

use super::*;

fn ch(s: &str) -> ChannelName {
    ChannelName::new(s).unwrap()
}

fn publication(c: &str, epoch: &str, seq: u64) -> Publication {
    Publication::encode(
        ch(c),
        Arc::from(epoch),
        seq,
        1,
        &format!("{{\"n\":{seq}}}"),
        None,
    )
}

fn sub(hub: &Hub, cap: usize) -> Subscriber {
    Subscriber {
        id: hub.next_subscriber_id(),
        shard: 0,
        queue: Arc::new(ConnQueue::new(cap)),
    }
}

fn pos(epoch: &str, seq: u64) -> Position {
    Position {
        epoch: epoch.into(),
        seq,
    }
}

fn seqs(frames: &[Bytes]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| {
            // Server frames here are short text frames: 2-byte header (payload < 126)
            // or 4-byte header.
            let start = if f[1] == 126 { 4 } else { 2 };
            match ServerMessage::decode(&f[start..]).unwrap() {
                ServerMessage::Message { seq, .. } => seq,
                other => panic!("{other:?}"),
            }
        })
        .collect()
}

fn drain(q: &ConnQueue) -> Vec<Bytes> {
    let mut out = VecDeque::new();
    q.drain_into(&mut out);
    out.into_iter().collect()
}

fn cfg(history_len: usize) -> HubConfig {
    HubConfig {
        history_len,
        ..HubConfig::default()
    }
}

fn at(hub: &Hub, secs: u64) -> Instant {
    hub.started + Duration::from_secs(secs)
}

#[test]
fn fan_out_shares_one_encoded_frame() {
    let hub = Hub::new(HubConfig::default(), 1, "e1");
    let subs: Vec<_> = (0..3).map(|_| sub(&hub, 10)).collect();
    for s in &subs {
        hub.subscribe(&ch("a"), None, s.clone()).unwrap();
    }
    let p = publication("a", "e1", 1);
    assert_eq!(hub.publish(&p), Published::Delivered(3));
    for s in &subs {
        let got = drain(&s.queue);
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].as_ptr(),
            p.frame.as_ptr(),
            "same allocation, not a copy"
        );
    }
}

#[test]
fn since_replays_exactly_the_missing_messages_then_live() {
    let hub = Hub::new(cfg(100), 1, "e1");
    for seq in 1..=60 {
        hub.publish(&publication("a", "e1", seq));
    }
    let s = sub(&hub, 100);
    let r = hub
        .subscribe(&ch("a"), Some(&pos("e1", 10)), s.clone())
        .unwrap();
    assert!(r.recovered);
    assert_eq!(r.seq, 60);
    assert_eq!(seqs(&r.replay), (11..=60).collect::<Vec<_>>());
    hub.publish(&publication("a", "e1", 61));
    assert_eq!(seqs(&drain(&s.queue)), vec![61]);
}

#[test]
fn positions_outside_the_ring_or_epoch_are_not_recovered() {
    let hub = Hub::new(cfg(10), 1, "e1");
    for seq in 1..=30 {
        hub.publish(&publication("a", "e1", seq));
    }
    let cases = [
        (pos("e1", 19), false), // 20 was evicted
        (pos("e1", 20), true),  // 21..=30 all kept
        (pos("e1", 30), true),  // up to date
        (pos("e1", 31), true),  // ahead: this shard lags behind the client's last one
        (pos("e1", 41), false), // further ahead than a history's length
        (pos("old", 25), false),
    ];
    for (p, expected) in cases {
        let r = hub.subscribe(&ch("a"), Some(&p), sub(&hub, 10)).unwrap();
        assert_eq!(r.recovered, expected, "{p:?}");
        if !expected {
            assert!(r.replay.is_empty());
        }
    }
}

#[test]
fn a_client_ahead_of_a_lagging_shard_gets_each_message_once() {
    let hub = Hub::new(cfg(100), 1, "e1");
    for seq in 1..=10 {
        hub.publish(&publication("a", "e1", seq));
    }
    // The client saw up to 15 on a shard whose source was ahead of this one.
    let s = sub(&hub, 100);
    let r = hub
        .subscribe(&ch("a"), Some(&pos("e1", 15)), s.clone())
        .unwrap();
    assert!(r.recovered);
    assert!(r.replay.is_empty());
    for seq in 11..=20 {
        hub.publish(&publication("a", "e1", seq));
    }
    assert_eq!(seqs(&drain(&s.queue)), (16..=20).collect::<Vec<_>>());
}

#[test]
fn duplicates_are_dropped_and_epoch_change_resets_history() {
    let hub = Hub::new(cfg(10), 1, "e1");
    hub.publish(&publication("a", "e1", 5));
    assert_eq!(
        hub.publish(&publication("a", "e1", 5)),
        Published::Duplicate
    );
    assert_eq!(
        hub.publish(&publication("a", "e1", 4)),
        Published::Duplicate
    );
    hub.publish(&publication("a", "e2", 1));
    let r = hub
        .subscribe(&ch("a"), Some(&pos("e1", 4)), sub(&hub, 10))
        .unwrap();
    assert!(!r.recovered);
    assert_eq!(&*r.epoch, "e2");
}

#[test]
fn slow_subscriber_never_blocks_others() {
    let hub = Hub::new(HubConfig::default(), 1, "e");
    let slow = sub(&hub, 2);
    let fast = sub(&hub, 1000);
    hub.subscribe(&ch("a"), None, slow.clone()).unwrap();
    hub.subscribe(&ch("a"), None, fast.clone()).unwrap();
    for seq in 1..=100 {
        hub.publish(&publication("a", "e", seq));
    }
    let mut out = VecDeque::new();
    assert!(slow.queue.drain_into(&mut out), "slow subscriber is marked");
    assert_eq!(seqs(&drain(&fast.queue)), (1..=100).collect::<Vec<_>>());
}

#[test]
fn invented_channels_are_forgotten_published_ones_kept() {
    let hub = Hub::new(HubConfig::default(), 1, "e");
    let s = sub(&hub, 10);
    for i in 0..100 {
        hub.subscribe(&ch(&format!("junk{i}")), None, s.clone())
            .unwrap();
    }
    hub.subscribe(&ch("real"), None, s.clone()).unwrap();
    assert_eq!(hub.stats().empty, 101);
    hub.publish(&publication("real", "e", 1));
    assert_eq!(hub.channel_count(), 101);
    assert_eq!(hub.stats().empty, 100);
    for i in 0..100 {
        assert!(hub.unsubscribe(&ch(&format!("junk{i}")), s.id));
    }
    assert!(hub.unsubscribe(&ch("real"), s.id));
    assert!(!hub.unsubscribe(&ch("real"), s.id));
    assert_eq!(hub.channel_count(), 1);
    assert_eq!(hub.stats().empty, 0);
    assert_eq!(hub.subscription_count(), 0);
    assert_eq!(hub.position(&ch("real")), Some(pos("e", 1)));
}

#[test]
fn concurrent_publish_and_subscribe_never_gap_or_duplicate() {
    let hub = Hub::new(cfg(10_000), 1, "e");
    let publisher = {
        let hub = hub.clone();
        std::thread::spawn(move || {
            for seq in 1..=5_000 {
                hub.publish(&publication("a", "e", seq));
            }
        })
    };
    let mut checked = 0;
    while checked < 50 {
        let s = sub(&hub, 100_000);
        let r = hub
            .subscribe(&ch("a"), Some(&pos("e", 0)), s.clone())
            .unwrap();
        assert!(r.recovered);
        let mut all = seqs(&r.replay);
        assert_eq!(all.len() as u64, r.seq);
        if publisher.is_finished() {
            checked = 50;
        }
        std::thread::yield_now();
        all.extend(seqs(&drain(&s.queue)));
        assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "gap or duplicate");
        hub.unsubscribe(&ch("a"), s.id);
        checked += 1;
    }
    publisher.join().unwrap();
}

// ---- the memory bound ----------------------------------------------------------------

/// A hub with a small budget and the given idle timeout.
fn bounded(budget: usize, idle_secs: u64) -> Arc<Hub> {
    Hub::new(
        HubConfig {
            history_len: 100,
            history_budget: budget,
            channel_idle_timeout: Duration::from_secs(idle_secs),
            max_empty_channels: 1000,
        },
        1,
        "e",
    )
}

#[test]
fn the_ledger_stays_within_the_budget_whatever_the_number_of_keys() {
    let budget = 256 << 10;
    let hub = bounded(budget, 3600);
    let largest =
        frame_cost(&publication("key-99999", "e", 1).frame) + entry_cost(&ch("key-99999"));
    for i in 0..100_000u64 {
        // Every other key carries a second message: those keep a position when evicted,
        // one-off keys are forgotten outright.
        for seq in 1..=1 + i % 2 {
            hub.publish(&publication(&format!("key-{i}"), "e", seq));
            // Eviction runs in the publish that crosses the budget.
            assert!(
                hub.stats().history_bytes <= budget + largest,
                "{} over {budget} after key {i}",
                hub.stats().history_bytes
            );
        }
    }
    let s = hub.stats();
    assert!(
        s.channels + s.positions < 3_000,
        "registry bounded by the budget: {s:?}"
    );
    assert!(s.positions > 0, "positions are kept while they fit: {s:?}");
    let forgotten = hub.evictions(EvictionCause::Position);
    assert!(forgotten > 90_000, "{forgotten}");
}

#[test]
fn eviction_goes_on_past_a_long_run_of_recently_used_channels() {
    // The hand first meets hundreds of channels used again (their bits set: a turn only
    // clears them), then one-off keys. A turn that frees nothing must not end the pass while
    // the hand has not reached what can go: here the ledger stays within the budget plus
    // the 1/64 of it after which the publish path retries, plus one publication (stopping
    // at the first later turn that frees nothing took it 2-4 × 1/64 over).
    let budget = 256 << 10;
    let hub = bounded(budget, 3600);
    let largest =
        frame_cost(&publication("once-99999", "e", 1).frame) + entry_cost(&ch("once-99999"));
    for i in 0..250u64 {
        for seq in 1..=2 {
            hub.publish(&publication(&format!("warm-{i}"), "e", seq));
        }
    }
    let mut worst = 0;
    for i in 0..20_000u64 {
        hub.publish(&publication(&format!("once-{i}"), "e", 1));
        worst = worst.max(hub.stats().history_bytes);
    }
    assert!(
        worst <= budget + budget / 64 + largest,
        "ledger reached {worst}, budget {budget} (+{} +{largest})",
        budget / 64
    );
    assert!(hub.evictions(EvictionCause::Position) > 19_000);
}

#[test]
fn hot_channels_keep_their_history_while_one_off_keys_are_evicted() {
    let budget = 256 << 10;
    let hub = bounded(budget, 3600);
    let hot: Vec<String> = (0..5).map(|i| format!("hot-{i}")).collect();
    let mut seq = 0;
    for i in 0..50_000u64 {
        if i % 100 == 0 {
            seq += 1;
            for h in &hot {
                hub.publish(&publication(h, "e", seq));
            }
        }
        hub.publish(&publication(&format!("once-{i}"), "e", 1));
    }
    for h in &hot {
        // 100 messages kept (history_len), none lost to the one-off keys.
        let r = hub
            .subscribe(&ch(h), Some(&pos("e", seq - 100)), sub(&hub, 10))
            .unwrap();
        assert!(r.recovered, "{h}");
        assert_eq!(seqs(&r.replay), (seq - 99..=seq).collect::<Vec<_>>());
    }
}

#[test]
fn evicted_history_answers_recovered_false_and_a_client_that_missed_nothing_recovers() {
    // A budget that holds the channel's history but not thousands of other channels.
    let hub = bounded(256 << 10, 3600);
    for seq in 1..=50 {
        hub.publish(&publication("a", "e", seq));
    }
    // "a" is not used again: one-off keys push it out; stop as soon as its history is gone
    // (its position is kept for one more turn of the hand).
    let mut i = 0;
    while hub.slot_for_test("a") == "live" && i < 100_000 {
        hub.publish(&publication(&format!("k{i}"), "e", 1));
        i += 1;
    }
    assert_eq!(hub.slot_for_test("a"), "position");
    assert!(hub.evictions(EvictionCause::Budget) > 0);
    let r = hub
        .subscribe(&ch("a"), Some(&pos("e", 40)), sub(&hub, 10))
        .unwrap();
    assert!(!r.recovered, "41..=50 were evicted: no silent gap");
    assert!(r.replay.is_empty());
    assert_eq!(r.seq, 50, "the position is still known");
    let s = sub(&hub, 10);
    let r = hub
        .subscribe(&ch("a"), Some(&pos("e", 50)), s.clone())
        .unwrap();
    assert!(r.recovered, "nothing missed: nothing to replay");
    assert!(r.replay.is_empty());
    hub.publish(&publication("a", "e", 51));
    assert_eq!(seqs(&drain(&s.queue)), vec![51]);
}

#[test]
fn idle_channels_leave_the_registry_keeping_their_position() {
    let hub = bounded(64 << 20, 60);
    for seq in 1..=5 {
        hub.publish(&publication("quiet", "e", seq));
        hub.publish(&publication("watched", "e", seq));
    }
    let watcher = sub(&hub, 100);
    hub.subscribe(&ch("watched"), None, watcher.clone())
        .unwrap();
    hub.maintain(at(&hub, 59));
    assert_eq!(hub.stats().channels, 2, "not idle yet");
    hub.maintain(at(&hub, 61));
    let s = hub.stats();
    assert_eq!((s.channels, s.positions), (1, 1), "{s:?}");
    assert_eq!(hub.evictions(EvictionCause::Idle), 1);
    assert_eq!(hub.position(&ch("quiet")), Some(pos("e", 5)));
    // A client that saw everything recovers; one that missed messages is told.
    let r = hub
        .subscribe(&ch("quiet"), Some(&pos("e", 3)), sub(&hub, 10))
        .unwrap();
    assert!(!r.recovered);
    let late = sub(&hub, 10);
    let r = hub
        .subscribe(&ch("quiet"), Some(&pos("e", 5)), late.clone())
        .unwrap();
    assert!(r.recovered && r.replay.is_empty() && r.seq == 5);
    hub.publish(&publication("quiet", "e", 6));
    assert_eq!(seqs(&drain(&late.queue)), vec![6]);
    // The watched channel kept its history.
    let r = hub
        .subscribe(&ch("watched"), Some(&pos("e", 0)), sub(&hub, 10))
        .unwrap();
    assert_eq!(seqs(&r.replay), vec![1, 2, 3, 4, 5]);
}

#[test]
fn a_channel_forgotten_entirely_never_recovers_an_old_position() {
    let hub = bounded(2 << 20, 60);
    for seq in 1..=20 {
        hub.publish(&publication("gone", "e", seq));
    }
    hub.maintain(at(&hub, 61));
    assert_eq!(hub.position(&ch("gone")), Some(pos("e", 20)), "kept");
    hub.forget_all_positions_for_test();
    assert_eq!(hub.position(&ch("gone")), None, "forgotten");
    assert!(hub.evictions(EvictionCause::Position) >= 1);
    // Unknown now: a position inside what it carried is not covered...
    let r = hub
        .subscribe(&ch("gone"), Some(&pos("e", 12)), sub(&hub, 10))
        .unwrap();
    assert!(!r.recovered);
    // ... even by the "client ahead of this shard" rule, and not after it carries again
    // from a source that claims to cover everything.
    for (c, since) in [("gone", 20), ("gone", 21), ("gone", 12)] {
        let r = hub
            .subscribe(&ch(c), Some(&pos("e", since)), sub(&hub, 10))
            .unwrap();
        assert!(!r.recovered, "{since}");
    }
    hub.publish(&publication("gone", "e", 30));
    let r = hub
        .subscribe(&ch("gone"), Some(&pos("e", 12)), sub(&hub, 10))
        .unwrap();
    assert!(!r.recovered, "13..=20 were forgotten");
    let r = hub
        .subscribe(&ch("gone"), Some(&pos("e", 20)), sub(&hub, 10))
        .unwrap();
    assert!(r.recovered, "everything after the floor is covered");
    assert_eq!(seqs(&r.replay), vec![30]);
}

#[test]
fn hub_numbering_resumes_above_a_forgotten_channel() {
    let hub = bounded(2 << 20, 60);
    let e: Arc<str> = Arc::from("e");
    for _ in 0..7 {
        hub.publish_next(&ch("n"), &e, "1", None);
    }
    hub.maintain(at(&hub, 61));
    // Kept position: numbering simply continues.
    assert_eq!(hub.publish_next(&ch("n"), &e, "1", None), 8);
    hub.maintain(at(&hub, 200));
    hub.forget_all_positions_for_test();
    // Forgotten: numbering resumes above the floor, never at 1 again.
    assert_eq!(hub.publish_next(&ch("n"), &e, "1", None), 9);
    assert_eq!(hub.publish_next(&ch("n"), &e, "1", None), 10);
}

#[test]
fn placeholders_are_capped_with_a_clear_error() {
    let hub = Hub::new(
        HubConfig {
            max_empty_channels: 3,
            ..HubConfig::default()
        },
        1,
        "e",
    );
    let s = sub(&hub, 10);
    for i in 0..3 {
        hub.subscribe(&ch(&format!("x{i}")), None, s.clone())
            .unwrap();
    }
    let err = hub.subscribe(&ch("x3"), None, s.clone()).unwrap_err();
    assert_eq!(err, SubscribeError::TooManyEmptyChannels { limit: 3 });
    assert!(err.to_string().contains("max_empty_channels"));
    // Channels that exist stay open to everyone: placeholders and published ones.
    hub.subscribe(&ch("x0"), None, sub(&hub, 10)).unwrap();
    hub.publish(&publication("busy", "e", 1));
    hub.subscribe(&ch("busy"), None, s.clone()).unwrap();
    // A placeholder that gets a message no longer counts, and leaving frees a place.
    hub.publish(&publication("x1", "e", 1));
    hub.subscribe(&ch("x3"), None, s.clone()).unwrap();
    assert!(hub.subscribe(&ch("x4"), None, s.clone()).is_err());
    assert!(hub.unsubscribe(&ch("x2"), s.id));
    hub.subscribe(&ch("x4"), None, s.clone()).unwrap();
    assert_eq!(hub.stats().empty, 3);
}

#[test]
fn a_placeholder_for_a_forgotten_channel_does_not_vouch_for_seq_zero() {
    let hub = bounded(2 << 20, 60);
    hub.publish(&publication("p", "e", 1));
    hub.maintain(at(&hub, 61));
    hub.forget_all_positions_for_test();
    // A client that subscribed before the first message holds {e, 0}: it missed 1.
    let r = hub
        .subscribe(&ch("p"), Some(&pos("e", 0)), sub(&hub, 10))
        .unwrap();
    assert!(!r.recovered);
    // On a fresh hub the same request is covered.
    let fresh = bounded(2 << 20, 60);
    let r = fresh
        .subscribe(&ch("p"), Some(&pos("e", 0)), sub(&fresh, 10))
        .unwrap();
    assert!(r.recovered);
}

#[test]
fn the_ledger_returns_to_zero_when_everything_is_gone() {
    let hub = bounded(2 << 20, 60);
    let s = sub(&hub, 1 << 20);
    hub.subscribe(&ch("h"), None, s.clone()).unwrap();
    for seq in 1..=500 {
        hub.publish(&publication("h", "e", seq));
        hub.publish(&publication(&format!("k{}", seq % 37), "e", seq));
    }
    hub.publish(&publication("h", "e2", 1));
    hub.subscribe(&ch("placeholder"), None, s.clone()).unwrap();
    assert!(hub.stats().history_bytes > 0);
    hub.unsubscribe(&ch("h"), s.id);
    hub.unsubscribe(&ch("placeholder"), s.id);
    hub.maintain(at(&hub, 61));
    hub.forget_all_positions_for_test();
    let s = hub.stats();
    assert_eq!(
        s,
        HubStats {
            history_bytes: 0,
            channels: 0,
            positions: 0,
            empty: 0
        }
    );
}

#[test]
fn subscribed_channels_lose_history_but_never_their_subscribers() {
    // 1,000 subscribed channels need more than the budget for their entries alone: their
    // history goes, they stay, fan-out goes on, and eviction stops retrying on every publish.
    let hub = bounded(64 << 10, 3600);
    let s = sub(&hub, 1 << 20);
    for i in 0..1000 {
        hub.subscribe(&ch(&format!("s{i}")), None, s.clone())
            .unwrap();
    }
    for seq in 1..=3 {
        for i in 0..1000 {
            hub.publish(&publication(&format!("s{i}"), "e", seq));
        }
    }
    let got = drain(&s.queue);
    assert_eq!(got.len(), 3000, "every message delivered");
    let stats = hub.stats();
    assert_eq!(stats.channels, 1000);
    assert!(stats.history_bytes > 64 << 10, "over budget: {stats:?}");
    assert!(
        stats.history_bytes < 1000 * (entry_cost(&ch("s999")) + 200),
        "only entries and the newest frames left: {stats:?}"
    );
    assert!(hub.evict_stuck_at.load(Ordering::Relaxed) > 0);
    let r = hub
        .subscribe(&ch("s5"), Some(&pos("e", 1)), sub(&hub, 10))
        .unwrap();
    assert!(!r.recovered || seqs(&r.replay) == vec![2, 3]);
}

impl Hub {
    fn slot_for_test(&self, name: &str) -> &'static str {
        let (hash, seg) = self.locate(&ch(name));
        match seg.get(hash, &ch(name)) {
            Some(c) if c.state.lock().position => "position",
            Some(_) => "live",
            None => "none",
        }
    }

    /// Runs the hand until every kept position is forgotten (as a long run over budget
    /// would).
    fn forget_all_positions_for_test(&self) {
        for seg in &self.segments {
            let mut w = seg.inner.write();
            // One turn clears the bits, one demotes, one forgets.
            for _ in 0..3 {
                let n = w.clock.len();
                w.evict(n, &self.ledger);
            }
        }
    }
}

// ---- property: recovery answers are honest under any eviction ---------------------------

#[derive(Debug, Clone)]
enum Op {
    /// Publish the next message of channel `c`.
    Publish(u8),
    /// Subscribe to channel `c` asking for everything after `back` messages ago.
    Recover(u8, u8),
    /// Advance the hub clock by `s` seconds and run maintenance.
    Tick(u8),
    /// Publish to a fresh one-off key (eviction pressure).
    Noise(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..8).prop_map(Op::Publish),
        2 => (0u8..8, 0u8..40).prop_map(|(c, b)| Op::Recover(c, b)),
        1 => (0u8..40).prop_map(Op::Tick),
        4 => (0u16..500).prop_map(Op::Noise),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Whatever was evicted, `recovered:true` always comes with exactly the messages after
    /// the client's position, and the ledger stays within the budget plus one publication.
    #[test]
    fn recovery_is_honest_under_eviction(ops in proptest::collection::vec(op(), 1..150)) {
        let budget = 128 << 10;
        let hub = Hub::new(
            HubConfig {
                history_len: 30,
                history_budget: budget,
                channel_idle_timeout: Duration::from_secs(20),
                max_empty_channels: 100,
            },
            1,
            "e",
        );
        let mut last: HashMap<u8, u64> = HashMap::new();
        let mut secs = 0u64;
        let mut noise = 0u64;
        for op in ops {
            match op {
                Op::Publish(c) => {
                    let seq = last.entry(c).or_insert(0);
                    *seq += 1;
                    hub.publish(&publication(&format!("c{c}"), "e", *seq));
                }
                Op::Recover(c, back) => {
                    let truth = last.get(&c).copied().unwrap_or(0);
                    let since = truth.saturating_sub(u64::from(back));
                    let s = sub(&hub, 1000);
                    let name = ch(&format!("c{c}"));
                    let r = hub.subscribe(&name, Some(&pos("e", since)), s.clone()).unwrap();
                    if r.recovered {
                        prop_assert_eq!(r.seq, truth);
                        prop_assert_eq!(seqs(&r.replay), (since + 1..=truth).collect::<Vec<_>>());
                    }
                    hub.unsubscribe(&name, s.id);
                }
                Op::Tick(s) => {
                    secs += u64::from(s);
                    hub.maintain(hub.started + Duration::from_secs(secs));
                }
                Op::Noise(n) => {
                    for _ in 0..n {
                        noise += 1;
                        hub.publish(&publication(&format!("noise-{noise}"), "e", 1));
                    }
                }
            }
            prop_assert!(hub.stats().history_bytes <= budget + 4096);
        }
    }
}
