//! The channel registry: who is subscribed to what, the recent history of every channel, and
//! fan-out.
//!
//! One hub serves every shard of a process. A published message arrives as a
//! [`Publication`] whose WebSocket frame was encoded once by the source; the hub stores the
//! same `Bytes` in the channel's history and pushes clones of it (a reference-count bump,
//! no copy) onto every subscriber's queue.
//!
//! Ordering and recovery: each channel has one mutex guarding its position, history and
//! subscriber list. Publishing and subscribing both take it, so a subscriber registered with
//! a `since` position receives exactly the history after that position (returned by
//! [`Hub::subscribe`]) and then every later message through its queue — no gap, no
//! duplicate. The lock is never held across an `.await`; pushes are non-blocking.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use metrics::{Counter, Gauge, Histogram};
use parking_lot::{Mutex, RwLock};
use ws_protocol::frame::{encode_frame, OP_TEXT};
use ws_protocol::message::encode_message;
use ws_protocol::{ChannelName, Position};

use crate::config::HubConfig;
use crate::metrics as m;
use crate::queue::{ConnQueue, Push};

const SEGMENTS: usize = 32;
/// Most shards one process can run (deliveries are counted per shard in a fixed array).
pub const MAX_SHARDS_PER_PROCESS: usize = 64;

/// One message, positioned and encoded, ready for fan-out.
#[derive(Debug, Clone)]
pub struct Publication {
    pub channel: ChannelName,
    /// Stream generation; positions are only comparable within one epoch.
    pub epoch: Arc<str>,
    /// Strictly increasing within the epoch.
    pub seq: u64,
    /// The source guarantees to deliver every message of this epoch with `seq >= covers_from`
    /// (the embedded bus: 1; Kafka: the offset it started reading the partition at).
    pub covers_from: u64,
    /// The complete WebSocket text frame of the `message`.
    pub frame: Bytes,
    /// When the source produced the message (for the fan-out latency histogram).
    pub origin: Option<SystemTime>,
}

impl Publication {
    /// Builds the frame around `data_json` (one valid JSON value) once.
    pub fn encode(
        channel: ChannelName,
        epoch: Arc<str>,
        seq: u64,
        covers_from: u64,
        data_json: &str,
        origin: Option<SystemTime>,
    ) -> Self {
        let json = encode_message(channel.as_str(), &epoch, seq, data_json);
        let frame = encode_frame(OP_TEXT, json.as_bytes());
        Self {
            channel,
            epoch,
            seq,
            covers_from,
            frame,
            origin,
        }
    }
}

/// A connection's registration on a channel.
#[derive(Debug, Clone)]
pub struct Subscriber {
    /// Unique per connection (from [`Hub::next_subscriber_id`]).
    pub id: u64,
    /// The shard the connection belongs to (for per-shard delivery counts).
    pub shard: u32,
    pub queue: Arc<ConnQueue>,
}

/// What a subscriber gets back.
#[derive(Debug)]
pub struct Subscribed {
    /// The channel's position at subscription time.
    pub epoch: Arc<str>,
    pub seq: u64,
    /// Whether every message after the requested position was found (always `false`
    /// without a requested position).
    pub recovered: bool,
    /// Frames to send before any live message, oldest first.
    pub replay: Vec<Bytes>,
}

/// Outcome of a publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Stored and pushed to this many subscriber queues.
    Delivered(usize),
    /// Same epoch and a `seq` not above the last one: dropped (a source replay).
    Duplicate,
}

#[derive(Debug)]
struct ChannelState {
    epoch: Arc<str>,
    last_seq: u64,
    covers_from: u64,
    published: bool,
    removed: bool,
    history: VecDeque<(u64, Bytes)>,
    subscribers: Vec<Entry>,
}

/// A subscriber on one channel. `skip_through` is set when the subscriber's position is
/// ahead of this shard (it came from a shard whose source was further along): messages up
/// to that `seq` are not delivered to it again.
#[derive(Debug)]
struct Entry {
    sub: Subscriber,
    skip_through: Option<u64>,
}

#[derive(Debug)]
struct Channel {
    state: Mutex<ChannelState>,
}

#[derive(Debug)]
struct HubMetrics {
    published: Counter,
    duplicates: Counter,
    channels: Gauge,
    subscriptions: Gauge,
    replayed: Counter,
    fanout: Histogram,
    deliveries: Vec<Counter>,
}

/// The registry. See the module documentation.
#[derive(Debug)]
pub struct Hub {
    cfg: HubConfig,
    default_epoch: RwLock<Arc<str>>,
    segments: Vec<RwLock<HashMap<ChannelName, Arc<Channel>>>>,
    next_id: AtomicU64,
    metrics: HubMetrics,
}

impl Hub {
    /// A hub serving `shards` shards. `default_epoch` is reported for channels that have
    /// not received a message yet.
    pub fn new(cfg: HubConfig, shards: u32, default_epoch: &str) -> Arc<Self> {
        m::register_process_series();
        let deliveries = (0..shards.min(MAX_SHARDS_PER_PROCESS as u32))
            .map(|i| metrics::counter!(m::DELIVERIES, "shard_id" => i.to_string()))
            .collect();
        Arc::new(Self {
            cfg,
            default_epoch: RwLock::new(Arc::from(default_epoch)),
            segments: (0..SEGMENTS).map(|_| RwLock::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
            metrics: HubMetrics {
                published: metrics::counter!(m::PUBLISHED),
                duplicates: metrics::counter!(m::DUPLICATES),
                channels: metrics::gauge!(m::CHANNELS),
                subscriptions: metrics::gauge!(m::SUBSCRIPTIONS),
                replayed: metrics::counter!(m::REPLAYED),
                fanout: metrics::histogram!(m::FANOUT_SECONDS),
                deliveries,
            },
        })
    }

    /// A fresh subscriber id.
    pub fn next_subscriber_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Changes the epoch reported for channels without messages (a source that learns its
    /// epoch late, like Kafka after metadata arrives).
    pub fn set_default_epoch(&self, epoch: &str) {
        *self.default_epoch.write() = Arc::from(epoch);
    }

    fn segment(&self, channel: &ChannelName) -> &RwLock<HashMap<ChannelName, Arc<Channel>>> {
        let mut h = DefaultHasher::new();
        channel.hash(&mut h);
        let idx = (h.finish() as usize) % SEGMENTS;
        // SEGMENTS is non-zero and idx is reduced modulo it.
        self.segments
            .get(idx)
            .unwrap_or_else(|| unreachable!("segment index in range"))
    }

    fn channel(&self, name: &ChannelName) -> Arc<Channel> {
        let seg = self.segment(name);
        if let Some(ch) = seg.read().get(name) {
            return ch.clone();
        }
        let mut w = seg.write();
        w.entry(name.clone())
            .or_insert_with(|| {
                self.metrics.channels.increment(1.0);
                Arc::new(Channel {
                    state: Mutex::new(ChannelState {
                        epoch: self.default_epoch.read().clone(),
                        last_seq: 0,
                        covers_from: 1,
                        published: false,
                        removed: false,
                        history: VecDeque::new(),
                        subscribers: Vec::new(),
                    }),
                })
            })
            .clone()
    }

    /// Stores and fans out one message.
    pub fn publish(&self, p: &Publication) -> Published {
        loop {
            let ch = self.channel(&p.channel);
            let mut st = ch.state.lock();
            if st.removed {
                continue;
            }
            let same_epoch = *st.epoch == *p.epoch;
            if st.published && same_epoch && p.seq <= st.last_seq {
                self.metrics.duplicates.increment(1);
                return Published::Duplicate;
            }
            if !st.published || !same_epoch {
                st.epoch = p.epoch.clone();
                st.history = VecDeque::new();
                st.covers_from = p.covers_from;
                // Positions of the old epoch mean nothing in the new one.
                for e in &mut st.subscribers {
                    e.skip_through = None;
                }
            }
            st.published = true;
            st.last_seq = p.seq;
            if self.cfg.history_len == 0 {
                st.covers_from = p.seq.saturating_add(1);
            } else {
                if st.history.len() >= self.cfg.history_len {
                    if let Some((evicted, _)) = st.history.pop_front() {
                        st.covers_from = evicted.saturating_add(1);
                    }
                }
                st.history.push_back((p.seq, p.frame.clone()));
            }
            let mut per_shard = [0u64; MAX_SHARDS_PER_PROCESS];
            let mut delivered = 0;
            for e in &mut st.subscribers {
                if let Some(through) = e.skip_through {
                    if p.seq <= through {
                        continue;
                    }
                    e.skip_through = None;
                }
                if e.sub.queue.push(&p.frame) == Push::Queued {
                    delivered += 1;
                    if let Some(c) = per_shard.get_mut(e.sub.shard as usize) {
                        *c += 1;
                    }
                }
            }
            drop(st);
            self.metrics.published.increment(1);
            for (counter, n) in self.metrics.deliveries.iter().zip(per_shard) {
                if n > 0 {
                    counter.increment(n);
                }
            }
            if let Some(origin) = p.origin {
                if let Ok(elapsed) = origin.elapsed() {
                    self.metrics.fanout.record(elapsed.as_secs_f64());
                }
            }
            return Published::Delivered(delivered);
        }
    }

    /// Registers `sub` on `channel`, replaying history after `since` if it is recoverable.
    pub fn subscribe(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        sub: Subscriber,
    ) -> Subscribed {
        loop {
            let ch = self.channel(channel);
            let mut st = ch.state.lock();
            if st.removed {
                continue;
            }
            let mut skip_through = None;
            let same_epoch = |pos: &Position| *st.epoch == *pos.epoch;
            let (recovered, replay) = match since {
                Some(pos)
                    if same_epoch(pos)
                        && pos.seq <= st.last_seq
                        && pos.seq.saturating_add(1) >= st.covers_from =>
                {
                    let replay: Vec<Bytes> = st
                        .history
                        .iter()
                        .filter(|(s, _)| *s > pos.seq)
                        .map(|(_, f)| f.clone())
                        .collect();
                    (true, replay)
                }
                // The client is ahead of this shard (its last shard's source was further
                // along). Within one history's length of lag nothing is missing: what it has
                // not seen is still to come here. Skip what it already has.
                Some(pos)
                    if same_epoch(pos)
                        && pos.seq > st.last_seq
                        && pos.seq - st.last_seq <= self.cfg.history_len.max(1) as u64 =>
                {
                    skip_through = Some(pos.seq);
                    (true, Vec::new())
                }
                _ => (false, Vec::new()),
            };
            st.subscribers.push(Entry { sub, skip_through });
            let out = Subscribed {
                epoch: st.epoch.clone(),
                seq: st.last_seq,
                recovered,
                replay,
            };
            drop(st);
            self.metrics.subscriptions.increment(1.0);
            self.metrics.replayed.increment(out.replay.len() as u64);
            return out;
        }
    }

    /// Removes subscriber `id` from `channel`. A channel that never received a message and
    /// has no subscriber left is forgotten, so clients cannot grow the registry by
    /// subscribing to invented names.
    pub fn unsubscribe(&self, channel: &ChannelName, id: u64) -> bool {
        let seg = self.segment(channel);
        let Some(ch) = seg.read().get(channel).cloned() else {
            return false;
        };
        let (found, now_empty) = {
            let mut st = ch.state.lock();
            let before = st.subscribers.len();
            st.subscribers.retain(|e| e.sub.id != id);
            let found = st.subscribers.len() != before;
            (found, st.subscribers.is_empty() && !st.published)
        };
        if found {
            self.metrics.subscriptions.decrement(1.0);
        }
        if now_empty {
            let mut w = seg.write();
            if let Some(ch) = w.get(channel) {
                let mut st = ch.state.lock();
                if st.subscribers.is_empty() && !st.published {
                    st.removed = true;
                    drop(st);
                    w.remove(channel);
                    self.metrics.channels.decrement(1.0);
                }
            }
        }
        found
    }

    /// The channel's current position, if the registry knows the channel.
    pub fn position(&self, channel: &ChannelName) -> Option<Position> {
        let ch = self.segment(channel).read().get(channel).cloned()?;
        let st = ch.state.lock();
        Some(Position {
            epoch: st.epoch.to_string(),
            seq: st.last_seq,
        })
    }

    /// Number of channels known.
    pub fn channel_count(&self) -> usize {
        self.segments.iter().map(|s| s.read().len()).sum()
    }

    /// Total subscriptions across channels (walks the registry; for tests and health).
    pub fn subscription_count(&self) -> usize {
        self.segments
            .iter()
            .map(|s| {
                s.read()
                    .values()
                    .map(|c| c.state.lock().subscribers.len())
                    .sum::<usize>()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ws_protocol::ServerMessage;

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

    #[test]
    fn fan_out_shares_one_encoded_frame() {
        let hub = Hub::new(HubConfig::default(), 1, "e1");
        let subs: Vec<_> = (0..3).map(|_| sub(&hub, 10)).collect();
        for s in &subs {
            hub.subscribe(&ch("a"), None, s.clone());
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
        let hub = Hub::new(HubConfig { history_len: 100 }, 1, "e1");
        for seq in 1..=60 {
            hub.publish(&publication("a", "e1", seq));
        }
        let s = sub(&hub, 100);
        let r = hub.subscribe(
            &ch("a"),
            Some(&Position {
                epoch: "e1".into(),
                seq: 10,
            }),
            s.clone(),
        );
        assert!(r.recovered);
        assert_eq!(r.seq, 60);
        assert_eq!(seqs(&r.replay), (11..=60).collect::<Vec<_>>());
        hub.publish(&publication("a", "e1", 61));
        assert_eq!(seqs(&drain(&s.queue)), vec![61]);
    }

    #[test]
    fn positions_outside_the_ring_or_epoch_are_not_recovered() {
        let hub = Hub::new(HubConfig { history_len: 10 }, 1, "e1");
        for seq in 1..=30 {
            hub.publish(&publication("a", "e1", seq));
        }
        let cases = [
            (
                Position {
                    epoch: "e1".into(),
                    seq: 19,
                },
                false,
            ), // 20 was evicted
            (
                Position {
                    epoch: "e1".into(),
                    seq: 20,
                },
                true,
            ), // 21..=30 all kept
            (
                Position {
                    epoch: "e1".into(),
                    seq: 30,
                },
                true,
            ), // up to date
            (
                Position {
                    epoch: "e1".into(),
                    seq: 31,
                },
                true,
            ), // ahead: this shard lags behind the client's last one
            (
                Position {
                    epoch: "e1".into(),
                    seq: 41,
                },
                false,
            ), // further ahead than a history's length
            (
                Position {
                    epoch: "old".into(),
                    seq: 25,
                },
                false,
            ),
        ];
        for (pos, expected) in cases {
            let r = hub.subscribe(&ch("a"), Some(&pos), sub(&hub, 10));
            assert_eq!(r.recovered, expected, "{pos:?}");
            if !expected {
                assert!(r.replay.is_empty());
            }
        }
    }

    #[test]
    fn a_client_ahead_of_a_lagging_shard_gets_each_message_once() {
        let hub = Hub::new(HubConfig { history_len: 100 }, 1, "e1");
        for seq in 1..=10 {
            hub.publish(&publication("a", "e1", seq));
        }
        // The client saw up to 15 on a shard whose source was ahead of this one.
        let s = sub(&hub, 100);
        let r = hub.subscribe(
            &ch("a"),
            Some(&Position {
                epoch: "e1".into(),
                seq: 15,
            }),
            s.clone(),
        );
        assert!(r.recovered);
        assert!(r.replay.is_empty());
        for seq in 11..=20 {
            hub.publish(&publication("a", "e1", seq));
        }
        assert_eq!(seqs(&drain(&s.queue)), (16..=20).collect::<Vec<_>>());
    }

    #[test]
    fn duplicates_are_dropped_and_epoch_change_resets_history() {
        let hub = Hub::new(HubConfig { history_len: 10 }, 1, "e1");
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
        let r = hub.subscribe(
            &ch("a"),
            Some(&Position {
                epoch: "e1".into(),
                seq: 4,
            }),
            sub(&hub, 10),
        );
        assert!(!r.recovered);
        assert_eq!(&*r.epoch, "e2");
    }

    #[test]
    fn slow_subscriber_never_blocks_others() {
        let hub = Hub::new(HubConfig::default(), 1, "e");
        let slow = sub(&hub, 2);
        let fast = sub(&hub, 1000);
        hub.subscribe(&ch("a"), None, slow.clone());
        hub.subscribe(&ch("a"), None, fast.clone());
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
            hub.subscribe(&ch(&format!("junk{i}")), None, s.clone());
        }
        hub.subscribe(&ch("real"), None, s.clone());
        hub.publish(&publication("real", "e", 1));
        assert_eq!(hub.channel_count(), 101);
        for i in 0..100 {
            assert!(hub.unsubscribe(&ch(&format!("junk{i}")), s.id));
        }
        assert!(hub.unsubscribe(&ch("real"), s.id));
        assert!(!hub.unsubscribe(&ch("real"), s.id));
        assert_eq!(hub.channel_count(), 1);
        assert_eq!(hub.subscription_count(), 0);
        assert_eq!(
            hub.position(&ch("real")),
            Some(Position {
                epoch: "e".into(),
                seq: 1
            })
        );
    }

    #[test]
    fn concurrent_publish_and_subscribe_never_gap_or_duplicate() {
        let hub = Hub::new(
            HubConfig {
                history_len: 10_000,
            },
            1,
            "e",
        );
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
            let r = hub.subscribe(
                &ch("a"),
                Some(&Position {
                    epoch: "e".into(),
                    seq: 0,
                }),
                s.clone(),
            );
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
}
