//! The channel registry: who is subscribed to what, the recent history of every channel,
//! fan-out, and the memory bound on all of it.
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
//!
//! Memory: every byte the registry holds because of messages — history frames, ring slots,
//! channel entries, kept positions — is counted in one ledger against `history_budget`.
//! Over budget, the publisher that crossed it evicts least recently used history (CLOCK, see
//! [`registry`]) from every segment until the ledger is 1/32 below the budget.
//! Channels without subscribers leave the registry after `channel_idle_timeout` without a
//! message ([`Hub::maintain`]). A channel that left keeps its position (epoch, last seq),
//! so a client that missed nothing still recovers; when the position goes too, the
//! segment's floor for that epoch rises, and a `since` below a channel's coverage always
//! gets `recovered:false`. Placeholders — channels created by subscriptions that have
//! carried nothing — are not in the ledger; `max_empty_channels` caps their number.

mod registry;

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use metrics::{Counter, Gauge, Histogram};
use parking_lot::{Mutex, RwLock};
use ws_protocol::frame::{encode_frame, OP_TEXT};
use ws_protocol::message::encode_message;
use ws_protocol::{ChannelName, Position};

use crate::config::HubConfig;
use crate::metrics as m;
use crate::queue::{ConnQueue, Push};
pub use registry::EvictionCause;
use registry::{entry_cost, frame_cost, Ledger, Segment, HISTORY_SLOT};

const SEGMENTS: usize = 32;
/// Most entries the eviction hand visits per segment per turn (bounds how long one
/// segment's write lock is held: ~50 µs).
const EVICT_VISITS: usize = 1024;
/// Most eviction turns per publication that crossed the budget (a turn frees little when
/// most entries were used recently: it clears their bits for the next).
const EVICT_TURNS: usize = 8;
/// Entries the idle sweep visits per segment per call at least.
const MIN_SWEEP_VISITS: usize = 16;
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
        let frame = encode_publication(&channel, &epoch, seq, data_json);
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

fn encode_publication(channel: &ChannelName, epoch: &str, seq: u64, data_json: &str) -> Bytes {
    let json = encode_message(channel.as_str(), epoch, seq, data_json);
    encode_frame(OP_TEXT, json.as_bytes())
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

/// A subscription the registry refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// Creating the channel would exceed `max_empty_channels`.
    #[error(
        "this shard already holds {limit} channels that have carried no message \
         (max_empty_channels); channels that carry messages can still be subscribed"
    )]
    TooManyEmptyChannels { limit: usize },
}

/// Outcome of a publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Stored and pushed to this many subscriber queues.
    Delivered(usize),
    /// Same epoch and a `seq` not above the last one: dropped (a source replay).
    Duplicate,
}

/// Registry figures (the gauges, read directly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubStats {
    /// Bytes counted against `history_budget`.
    pub history_bytes: usize,
    /// Channels with state (published ones and placeholders).
    pub channels: usize,
    /// Channels kept only as a position.
    pub positions: usize,
    /// Placeholders: channels created by subscriptions that have carried nothing.
    pub empty: usize,
}

#[derive(Debug)]
struct ChannelState {
    epoch: Arc<str>,
    last_seq: u64,
    covers_from: u64,
    /// Has carried a message (in any epoch). Published channels are in the clock;
    /// placeholders are not.
    published: bool,
    /// Only the position is left (epoch, last seq): no history, no subscriber. Counted in
    /// `ws_shard_channel_positions`; a publication or a subscription makes it a channel
    /// again.
    position: bool,
    /// Set when the channel left the table: holders of the `Arc` look the name up again.
    removed: bool,
    /// CLOCK bit: used since the hand last passed.
    referenced: bool,
    /// Ever used: a second message or a subscriber. A channel never used is forgotten
    /// outright when evicted (no position kept).
    used: bool,
    /// Hub clock at the last publication or subscriber change.
    last_active_ms: u64,
    history: History,
    /// Accounted bytes of `history`: frames and ring capacity.
    history_bytes: usize,
    subscribers: Vec<Entry>,
}

impl ChannelState {
    fn new(epoch: Arc<str>, covers_from: u64) -> Self {
        Self {
            epoch,
            last_seq: 0,
            covers_from,
            published: false,
            position: false,
            removed: false,
            referenced: false,
            used: false,
            last_active_ms: 0,
            history: History::Empty,
            history_bytes: 0,
            subscribers: Vec::new(),
        }
    }

    /// Drops the history; what it covered is no longer recoverable. Returns the bytes freed.
    fn drop_history(&mut self) -> usize {
        self.history = History::Empty;
        self.covers_from = self.covers_from.max(self.last_seq.saturating_add(1));
        std::mem::take(&mut self.history_bytes)
    }
}

/// A channel's history, oldest first. Most channels of a high-cardinality topic carry one
/// message: it is kept inline, and a ring is allocated from the second.
#[derive(Debug)]
enum History {
    Empty,
    One((u64, Bytes)),
    Ring(VecDeque<(u64, Bytes)>),
}

impl History {
    fn len(&self) -> usize {
        match self {
            Self::Empty => 0,
            Self::One(_) => 1,
            Self::Ring(r) => r.len(),
        }
    }

    /// Accounted bytes of the ring's slots (an inline entry is part of the channel entry).
    fn ring_bytes(&self) -> usize {
        match self {
            Self::Ring(r) => r.capacity() * HISTORY_SLOT,
            _ => 0,
        }
    }

    fn pop_front(&mut self) -> Option<(u64, Bytes)> {
        match self {
            Self::Empty => None,
            Self::One(_) => match std::mem::replace(self, Self::Empty) {
                Self::One(e) => Some(e),
                _ => None,
            },
            Self::Ring(r) => r.pop_front(),
        }
    }

    fn push_back(&mut self, entry: (u64, Bytes)) {
        match self {
            Self::Empty => *self = Self::One(entry),
            Self::One(_) => {
                if let Self::One(first) = std::mem::replace(self, Self::Empty) {
                    let mut ring = VecDeque::with_capacity(2);
                    ring.push_back(first);
                    ring.push_back(entry);
                    *self = Self::Ring(ring);
                }
            }
            Self::Ring(r) => r.push_back(entry),
        }
    }

    fn iter(&self) -> impl Iterator<Item = &(u64, Bytes)> + '_ {
        let (one, ring) = match self {
            Self::Empty => (None, None),
            Self::One(e) => (Some(e), None),
            Self::Ring(r) => (None, Some(r.iter())),
        };
        one.into_iter().chain(ring.into_iter().flatten())
    }
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
    name: ChannelName,
    /// `name`'s hash: its segment and its place in the segment's table.
    hash: u64,
    state: Mutex<ChannelState>,
}

impl Channel {
    fn new(name: &ChannelName, hash: u64, state: ChannelState) -> Arc<Self> {
        Arc::new(Self {
            name: name.clone(),
            hash,
            state: Mutex::new(state),
        })
    }
}

/// A message as it reaches [`Hub::publish_inner`].
#[derive(Debug, Clone, Copy)]
enum Incoming<'a> {
    /// Positioned and encoded by the source.
    Encoded(&'a Publication),
    /// To be numbered by the hub (the embedded bus) and encoded under the channel lock.
    Next {
        epoch: &'a Arc<str>,
        data_json: &'a str,
        origin: Option<SystemTime>,
    },
}

impl Incoming<'_> {
    fn epoch(&self) -> &Arc<str> {
        match self {
            Self::Encoded(p) => &p.epoch,
            Self::Next { epoch, .. } => epoch,
        }
    }

    fn covers_from(&self) -> u64 {
        match self {
            Self::Encoded(p) => p.covers_from,
            Self::Next { .. } => 1,
        }
    }

    fn origin(&self) -> Option<SystemTime> {
        match self {
            Self::Encoded(p) => p.origin,
            Self::Next { origin, .. } => *origin,
        }
    }
}

/// What one publication did under the channel lock.
struct Applied {
    outcome: Published,
    seq: u64,
    added: usize,
    freed: usize,
}

/// Deliveries of one publication per shard, counted under the channel lock and added to
/// the shards' counters after it.
type PerShard = [u64; MAX_SHARDS_PER_PROCESS];

#[derive(Debug)]
struct HubMetrics {
    published: Counter,
    duplicates: Counter,
    channels: Gauge,
    positions: Gauge,
    empty: Gauge,
    history_bytes: Gauge,
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
    segments: Vec<Segment>,
    /// Hashes channel names once per operation: bits 32.. pick the segment, the whole
    /// hash places the channel in the segment's table.
    hasher: foldhash::fast::RandomState,
    next_id: AtomicU64,
    ledger: Ledger,
    /// Placeholders in the registry (bounded by `max_empty_channels`).
    empty: AtomicUsize,
    /// Segment the next eviction turn starts at.
    evict_cursor: AtomicUsize,
    /// The ledger when eviction last ended above its target (0: it did not).
    evict_stuck_at: AtomicUsize,
    /// The hub clock: milliseconds since `started`, advanced by [`Hub::maintain`]. Coarse
    /// on purpose: publishing stamps channels with it without reading the system clock.
    started: Instant,
    now_ms: AtomicU64,
    metrics: HubMetrics,
}

impl Hub {
    /// A hub serving `shards` shards. `default_epoch` is reported for channels that have
    /// not received a message yet.
    pub fn new(cfg: HubConfig, shards: u32, default_epoch: &str) -> Arc<Self> {
        let deliveries = (0..shards.min(MAX_SHARDS_PER_PROCESS as u32))
            .map(|i| metrics::counter!(m::DELIVERIES, "shard_id" => i.to_string()))
            .collect();
        metrics::gauge!(m::HISTORY_BUDGET).set(cfg.history_budget as f64);
        Arc::new(Self {
            cfg,
            default_epoch: RwLock::new(Arc::from(default_epoch)),
            segments: (0..SEGMENTS).map(|_| Segment::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
            next_id: AtomicU64::new(1),
            ledger: Ledger::new(),
            empty: AtomicUsize::new(0),
            evict_cursor: AtomicUsize::new(0),
            evict_stuck_at: AtomicUsize::new(0),
            started: Instant::now(),
            now_ms: AtomicU64::new(0),
            metrics: HubMetrics {
                published: metrics::counter!(m::PUBLISHED),
                duplicates: metrics::counter!(m::DUPLICATES),
                channels: metrics::gauge!(m::CHANNELS),
                positions: metrics::gauge!(m::CHANNEL_POSITIONS),
                empty: metrics::gauge!(m::EMPTY_CHANNELS),
                history_bytes: metrics::gauge!(m::HISTORY_BYTES),
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

    /// How often [`Hub::maintain`] should run: a quarter of the idle timeout, between
    /// 10 ms and 1 s.
    pub fn maintenance_interval(&self) -> Duration {
        (self.cfg.channel_idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// The channel's hash and segment.
    fn locate(&self, channel: &ChannelName) -> (u64, &Segment) {
        let hash = self.hasher.hash_one(channel.as_str());
        // Not the low bits (the table's bucket index) nor the top 7 (its tag byte).
        let idx = ((hash >> 32) as usize) % SEGMENTS;
        // SEGMENTS is non-zero and idx is reduced modulo it.
        let seg = self
            .segments
            .get(idx)
            .unwrap_or_else(|| unreachable!("segment index in range"));
        (hash, seg)
    }

    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Relaxed)
    }

    /// Stores and fans out one message positioned by its source.
    pub fn publish(&self, p: &Publication) -> Published {
        self.publish_inner(&p.channel, Incoming::Encoded(p)).0
    }

    /// Numbers a message on `channel` in `epoch` (the next `seq` after the channel's last;
    /// above every `seq` a forgotten channel of the epoch used), encodes it once, stores and
    /// fans it out. For sources that number messages per channel themselves, like the
    /// embedded bus, without keeping a counter per channel forever. Returns the `seq`.
    pub fn publish_next(
        &self,
        channel: &ChannelName,
        epoch: &Arc<str>,
        data_json: &str,
        origin: Option<SystemTime>,
    ) -> u64 {
        let msg = Incoming::Next {
            epoch,
            data_json,
            origin,
        };
        self.publish_inner(channel, msg).1
    }

    fn publish_inner(&self, name: &ChannelName, msg: Incoming<'_>) -> (Published, u64) {
        let (hash, seg) = self.locate(name);
        let mut per_shard: PerShard = [0; MAX_SHARDS_PER_PROCESS];
        // Fast path: a published channel in the same epoch, found under the read lock.
        if let Some(ch) = seg.get(hash, name) {
            let mut st = ch.state.lock();
            if !st.removed && st.published && *st.epoch == **msg.epoch() {
                self.unpark(&mut st);
                let applied = self.apply(&mut st, name, msg, 0, &mut per_shard);
                drop(st);
                return self.after_publish(applied, msg, &per_shard);
            }
        }
        // Slow path, under the segment's write lock: a new channel, a placeholder's first
        // message, or a new epoch (which needs the floor).
        let mut guard = seg.inner.write();
        let w = &mut *guard;
        let (ch, existing) = w.map.get_or_insert(hash, name, || {
            Channel::new(name, hash, ChannelState::new(msg.epoch().clone(), 1))
        });
        let mut st = ch.state.lock();
        if !st.published {
            if existing {
                // A placeholder's first message.
                self.empty.fetch_sub(1, Ordering::Relaxed);
            }
            w.clock.push_back(ch.clone());
            self.ledger.apply(entry_cost(name), 0);
        }
        self.unpark(&mut st);
        let floor = w.floors.get(msg.epoch());
        let applied = self.apply(&mut st, name, msg, floor, &mut per_shard);
        drop(st);
        drop(guard);
        self.after_publish(applied, msg, &per_shard)
    }

    /// A channel that was only a position is used again.
    fn unpark(&self, st: &mut ChannelState) {
        if st.position {
            st.position = false;
            self.ledger.positions.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The publication itself, under the channel lock. `floor` is the segment's floor for
    /// the message's epoch; only read when the channel starts a stream (first message or
    /// new epoch), which the fast path never does.
    fn apply(
        &self,
        st: &mut ChannelState,
        name: &ChannelName,
        msg: Incoming<'_>,
        floor: u64,
        per_shard: &mut PerShard,
    ) -> Applied {
        let epoch = msg.epoch();
        let same_epoch = *st.epoch == **epoch;
        let continuing = st.published && same_epoch;
        let seq = match msg {
            Incoming::Encoded(p) => p.seq,
            Incoming::Next { .. } if continuing => st.last_seq.saturating_add(1),
            Incoming::Next { .. } => floor.saturating_add(1),
        };
        let mut out = Applied {
            outcome: Published::Duplicate,
            seq,
            added: 0,
            freed: 0,
        };
        if continuing && seq <= st.last_seq {
            return out;
        }
        if !continuing {
            out.freed += st.drop_history();
            st.epoch = epoch.clone();
            // A channel forgotten in this epoch may have carried messages up to the floor:
            // vouch only for what comes after it.
            st.covers_from = msg.covers_from().max(floor.saturating_add(1));
            // Positions of the old epoch mean nothing in the new one.
            for e in &mut st.subscribers {
                e.skip_through = None;
            }
        }
        // The first message of a channel does not count as a use: a key published once and
        // never again is the first to be evicted.
        st.referenced |= st.published;
        st.used |= st.published;
        st.published = true;
        st.last_seq = seq;
        st.last_active_ms = self.now_ms();
        let encoded;
        let frame = match msg {
            Incoming::Encoded(p) => &p.frame,
            Incoming::Next { data_json, .. } => {
                encoded = encode_publication(name, epoch, seq, data_json);
                &encoded
            }
        };
        if self.cfg.history_len == 0 {
            st.covers_from = seq.saturating_add(1);
        } else {
            let ring_before = st.history.ring_bytes();
            let mut trimmed = 0;
            if st.history.len() >= self.cfg.history_len {
                if let Some((evicted, old)) = st.history.pop_front() {
                    st.covers_from = evicted.saturating_add(1);
                    trimmed = frame_cost(&old);
                }
            }
            st.history.push_back((seq, frame.clone()));
            let ring_after = st.history.ring_bytes();
            let stored = frame_cost(frame) + ring_after.saturating_sub(ring_before);
            // `trimmed` was counted when its frame was stored.
            st.history_bytes = (st.history_bytes + stored).saturating_sub(trimmed);
            out.added += stored;
            out.freed += trimmed;
        }
        let mut delivered = 0;
        for e in &mut st.subscribers {
            if let Some(through) = e.skip_through {
                if seq <= through {
                    continue;
                }
                e.skip_through = None;
            }
            if e.sub.queue.push(frame) == Push::Queued {
                delivered += 1;
                if let Some(c) = per_shard.get_mut(e.sub.shard as usize) {
                    *c += 1;
                }
            }
        }
        out.outcome = Published::Delivered(delivered);
        out
    }

    fn after_publish(
        &self,
        applied: Applied,
        msg: Incoming<'_>,
        per_shard: &PerShard,
    ) -> (Published, u64) {
        if applied.outcome == Published::Duplicate {
            self.metrics.duplicates.increment(1);
            return (Published::Duplicate, applied.seq);
        }
        self.ledger.apply(applied.added, applied.freed);
        self.metrics.published.increment(1);
        for (counter, &n) in self.metrics.deliveries.iter().zip(per_shard) {
            if n > 0 {
                counter.increment(n);
            }
        }
        if let Some(origin) = msg.origin() {
            if let Ok(elapsed) = origin.elapsed() {
                self.metrics.fanout.record(elapsed.as_secs_f64());
            }
        }
        self.enforce_budget(false);
        (applied.outcome, applied.seq)
    }

    /// Evicts while the ledger is over the budget, until it is 1/32 below (so eviction runs
    /// in batches, not on every publication). Each turn moves the hand of every segment over
    /// the same fraction of its entries — the share of bytes to free, at least 1/64 — so
    /// every entry ages at the same rate whatever the size of its segment, as under one hand
    /// over the whole registry. A segment another thread holds is skipped, never waited for.
    ///
    /// What cannot be evicted — the entries of subscribed channels — can keep the ledger
    /// over the budget; then the publish path does not try again until the ledger grew by
    /// another 1/64 of the budget ([`Hub::maintain`] still tries every tick), so
    /// publications do not each walk a registry that has nothing to give.
    fn enforce_budget(&self, from_maintenance: bool) {
        let budget = self.cfg.history_budget;
        let bytes = self.ledger.bytes();
        if bytes <= budget {
            return;
        }
        let stuck_at = self.evict_stuck_at.load(Ordering::Relaxed);
        if !from_maintenance && stuck_at > 0 && bytes <= stuck_at.saturating_add(budget / 64) {
            return;
        }
        let target = budget - budget / 32;
        for _turn in 0..EVICT_TURNS {
            let bytes = self.ledger.bytes();
            if bytes <= target {
                break;
            }
            let fraction = ((bytes - target) as f64 / bytes as f64).max(1.0 / 64.0);
            let start = self.evict_cursor.fetch_add(1, Ordering::Relaxed);
            for k in 0..SEGMENTS {
                let Some(seg) = self.segments.get((start + k) % SEGMENTS) else {
                    continue;
                };
                let Some(mut w) = seg.inner.try_write() else {
                    continue;
                };
                // Fractional visits carry over, so small segments age as fast as large ones.
                let due = w.hand_credit + w.clock.len() as f64 * fraction;
                let visits = due.floor();
                w.hand_credit = due - visits;
                w.evict((visits as usize).min(EVICT_VISITS), &self.ledger);
            }
        }
        let bytes = self.ledger.bytes();
        let stuck_at = if bytes > target { bytes } else { 0 };
        self.evict_stuck_at.store(stuck_at, Ordering::Relaxed);
    }

    /// Registers `sub` on `channel`, replaying history after `since` if it is recoverable.
    pub fn subscribe(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        sub: Subscriber,
    ) -> Result<Subscribed, SubscribeError> {
        let (hash, seg) = self.locate(channel);
        loop {
            let ch = match seg.get(hash, channel) {
                Some(ch) => ch,
                None => self.create_for_subscribe(seg, hash, channel)?,
            };
            let mut st = ch.state.lock();
            if st.removed {
                continue;
            }
            self.unpark(&mut st);
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
                // not seen is still to come here. Skip what it already has. Only for a
                // channel this registry has a position for: a placeholder knows nothing.
                Some(pos)
                    if st.published
                        && same_epoch(pos)
                        && pos.seq > st.last_seq
                        && pos.seq - st.last_seq <= self.cfg.history_len.max(1) as u64 =>
                {
                    skip_through = Some(pos.seq);
                    (true, Vec::new())
                }
                _ => (false, Vec::new()),
            };
            st.subscribers.push(Entry { sub, skip_through });
            st.referenced = true;
            st.used = true;
            st.last_active_ms = self.now_ms();
            let out = Subscribed {
                epoch: st.epoch.clone(),
                seq: st.last_seq,
                recovered,
                replay,
            };
            drop(st);
            self.metrics.subscriptions.increment(1.0);
            self.metrics.replayed.increment(out.replay.len() as u64);
            return Ok(out);
        }
    }

    /// The channel a subscription registers on, under the segment's write lock: the one in
    /// the table, or a new placeholder if the cap allows.
    fn create_for_subscribe(
        &self,
        seg: &Segment,
        hash: u64,
        name: &ChannelName,
    ) -> Result<Arc<Channel>, SubscribeError> {
        let mut guard = seg.inner.write();
        let w = &mut *guard;
        if let Some(ch) = w.map.get(hash, name) {
            return Ok(ch.clone());
        }
        let limit = self.cfg.max_empty_channels;
        if self.empty.fetch_add(1, Ordering::Relaxed) >= limit {
            self.empty.fetch_sub(1, Ordering::Relaxed);
            return Err(SubscribeError::TooManyEmptyChannels { limit });
        }
        let epoch = self.default_epoch.read().clone();
        // A channel of this name may have been forgotten: a position at or below the floor
        // is not covered.
        let covers_from = w.floors.get(&epoch).saturating_add(1);
        let ch = Channel::new(name, hash, ChannelState::new(epoch, covers_from));
        w.map.insert(ch.clone());
        Ok(ch)
    }

    /// Removes subscriber `id` from `channel`. A channel that never received a message and
    /// has no subscriber left is forgotten at once, so clients cannot grow the registry by
    /// subscribing to invented names; a published one starts its idle time.
    pub fn unsubscribe(&self, channel: &ChannelName, id: u64) -> bool {
        let (hash, seg) = self.locate(channel);
        let Some(ch) = seg.get(hash, channel) else {
            return false;
        };
        let (found, now_empty) = {
            let mut st = ch.state.lock();
            let before = st.subscribers.len();
            st.subscribers.retain(|e| e.sub.id != id);
            st.last_active_ms = self.now_ms();
            let found = st.subscribers.len() != before;
            (found, st.subscribers.is_empty() && !st.published)
        };
        if found {
            self.metrics.subscriptions.decrement(1.0);
        }
        if now_empty {
            let mut w = seg.inner.write();
            let gone = {
                let mut st = ch.state.lock();
                let gone = !st.removed && st.subscribers.is_empty() && !st.published;
                st.removed |= gone;
                gone
            };
            if gone && w.map.remove(&ch) {
                self.empty.fetch_sub(1, Ordering::Relaxed);
            }
        }
        found
    }

    /// The channel's current position, if the registry knows the channel (live or kept).
    pub fn position(&self, channel: &ChannelName) -> Option<Position> {
        let (hash, seg) = self.locate(channel);
        let ch = seg.get(hash, channel)?;
        let st = ch.state.lock();
        Some(Position {
            epoch: st.epoch.to_string(),
            seq: st.last_seq,
        })
    }

    /// Advances the hub clock to `now`, moves channels idle for `channel_idle_timeout` out
    /// of the registry (each segment's hand visits every entry at least once per half idle
    /// timeout), gives back table memory after bursts, enforces the budget and updates the
    /// gauges. Called every [`Hub::maintenance_interval`] by the server.
    pub fn maintain(&self, now: Instant) {
        let now_ms = u64::try_from(now.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX);
        let prev = self.now_ms.fetch_max(now_ms, Ordering::Relaxed);
        let elapsed = now_ms.saturating_sub(prev);
        let idle_ms = u64::try_from(self.cfg.channel_idle_timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let half = (idle_ms / 2).max(1);
        for seg in &self.segments {
            let mut w = seg.inner.write();
            let len = w.clock.len();
            let share = (len as u128 * u128::from(elapsed)).div_ceil(u128::from(half));
            let visits = usize::try_from(share)
                .unwrap_or(usize::MAX)
                .max(MIN_SWEEP_VISITS);
            w.sweep_idle(visits, now_ms, idle_ms, &self.ledger);
            w.shrink();
        }
        self.enforce_budget(true);
        let s = self.stats();
        self.metrics.history_bytes.set(s.history_bytes as f64);
        self.metrics.channels.set(s.channels as f64);
        self.metrics.positions.set(s.positions as f64);
        self.metrics.empty.set(s.empty as f64);
    }

    /// Registry figures now.
    pub fn stats(&self) -> HubStats {
        let entries: usize = self.segments.iter().map(|s| s.inner.read().map.len()).sum();
        let positions = self.ledger.positions.load(Ordering::Relaxed);
        HubStats {
            history_bytes: self.ledger.bytes(),
            channels: entries.saturating_sub(positions),
            positions,
            empty: self.empty.load(Ordering::Relaxed),
        }
    }

    /// Evictions of `cause` since the hub started (also `ws_shard_channel_evictions_total`).
    pub fn evictions(&self, cause: EvictionCause) -> u64 {
        self.ledger.evictions(cause)
    }

    /// Number of channels with state (published ones and placeholders).
    pub fn channel_count(&self) -> usize {
        self.stats().channels
    }

    /// Total subscriptions across channels (walks the registry; for tests and health).
    pub fn subscription_count(&self) -> usize {
        self.segments
            .iter()
            .map(|s| {
                s.inner
                    .read()
                    .map
                    .iter()
                    .map(|c| c.state.lock().subscribers.len())
                    .sum::<usize>()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests;
