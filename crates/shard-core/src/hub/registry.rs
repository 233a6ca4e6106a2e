//! The registry's segments and what keeps them bounded: the channel table, the clock that
//! orders channels for eviction, the byte ledger, and the per-epoch floors that keep
//! recovery answers honest once a channel is forgotten.
//!
//! A segment holds 1/[`SEGMENTS`](super::SEGMENTS) of the channels (by name hash) under one
//! `RwLock`. Publishing to a known channel takes the read lock only long enough to clone the
//! channel's `Arc`; creating and forgetting channels take the write lock of that one
//! segment, never a process-wide lock.
//!
//! Eviction is CLOCK (second chance) over the segment's `clock` queue: the hand is the
//! front. A channel used since the hand last passed (a publication after its first, or a
//! subscription) has its `referenced` bit cleared and goes to the back. Otherwise its
//! history is dropped, and a channel without subscribers becomes a *position* — the same
//! entry, holding only (epoch, last seq), so demoting it needs no table operation. A
//! position the hand reaches again unused is forgotten. A channel that carried a single
//! message and never had a subscriber here is forgotten at once: nobody here can hold a
//! position in it, and a stream of one-off keys (a topic keyed by order id) is the load
//! eviction must be cheapest for. So one-off keys are the first to go, a hot channel
//! survives a full turn of the hand after each use, and a position outlives its history
//! by at least one turn.

use std::collections::VecDeque;
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use metrics::Counter;
use parking_lot::RwLock;
use ws_protocol::ChannelName;

use super::Channel;
use crate::metrics as m;

/// Accounted bytes of a published channel's entry (also when only its position is left)
/// besides its name and history: the shared `Channel` allocation (~190 B), its hash-table
/// slot at the table's worst load (~60 B), its place in the clock and the name's
/// reference-counted header. Calibrated against RSS by `tests/it/memory.rs`.
const ENTRY: usize = 320;
/// Per history entry besides the frame's bytes: the `Bytes` shared header and allocator
/// rounding of the frame's buffer. Ring slots are counted by capacity ([`HISTORY_SLOT`]).
const FRAME_OVERHEAD: usize = 64;
/// One slot of a history ring.
pub(super) const HISTORY_SLOT: usize = size_of::<(u64, Bytes)>();
/// Epochs whose floors a segment tracks one by one before folding the oldest into one floor
/// for all epochs (Kafka: one epoch per partition generation).
const MAX_FLOOR_EPOCHS: usize = 16;

pub(super) fn entry_cost(name: &ChannelName) -> usize {
    ENTRY + name.as_str().len()
}

pub(super) fn frame_cost(frame: &Bytes) -> usize {
    frame.len() + FRAME_OVERHEAD
}

/// Why history or a channel left the registry (the `cause` label of
/// `ws_shard_channel_evictions_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionCause {
    /// The process was over `history_budget`: a least recently used channel's history was
    /// dropped (and, without subscribers, the channel left the registry, its position kept).
    Budget,
    /// A channel without subscribers carried no message for `channel_idle_timeout`: it left
    /// the registry, its position kept.
    Idle,
    /// A kept position was dropped for the budget: the channel is forgotten entirely.
    Position,
}

impl EvictionCause {
    /// Every cause, in label order.
    pub const ALL: [EvictionCause; 3] = [Self::Budget, Self::Idle, Self::Position];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Budget => "budget",
            Self::Idle => "idle",
            Self::Position => "position",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The process-wide byte count, position count and eviction counters; atomics only.
#[derive(Debug)]
pub(super) struct Ledger {
    bytes: AtomicUsize,
    /// Channels that are only a position.
    pub(super) positions: AtomicUsize,
    evictions: [Counter; 3],
    evicted: [AtomicU64; 3],
}

impl Ledger {
    pub(super) fn new() -> Self {
        Self {
            bytes: AtomicUsize::new(0),
            positions: AtomicUsize::new(0),
            // Registered at zero so that `rate()` sees every cause from the start.
            evictions: EvictionCause::ALL.map(|c| {
                let counter = metrics::counter!(m::CHANNEL_EVICTIONS, "cause" => c.label());
                counter.increment(0);
                counter
            }),
            evicted: Default::default(),
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Applies a change computed under a channel lock.
    pub(super) fn apply(&self, added: usize, freed: usize) {
        if added > freed {
            self.bytes.fetch_add(added - freed, Ordering::Relaxed);
        } else if freed > added {
            self.bytes.fetch_sub(freed - added, Ordering::Relaxed);
        }
    }

    /// Evictions of `cause` so far.
    pub(super) fn evictions(&self, cause: EvictionCause) -> u64 {
        self.evicted
            .get(cause.index())
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    fn evicted(&self, cause: EvictionCause) {
        if let Some(c) = self.evictions.get(cause.index()) {
            c.increment(1);
        }
        if let Some(n) = self.evicted.get(cause.index()) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The highest `seq` of each epoch among the channels this segment forgot entirely. A
/// channel created afterwards vouches only for messages above its epoch's floor, so a
/// client positioned before it gets `recovered:false`, never a gap.
#[derive(Debug, Default)]
pub(super) struct Floors {
    by_epoch: Vec<(Arc<str>, u64)>,
    /// Applies to every epoch: floors folded together when too many epochs were tracked
    /// (conservative: it can only turn a recovery into `recovered:false`).
    any: u64,
}

impl Floors {
    pub(super) fn get(&self, epoch: &str) -> u64 {
        self.by_epoch
            .iter()
            .find(|(e, _)| **e == *epoch)
            .map_or(0, |(_, s)| *s)
            .max(self.any)
    }

    fn raise(&mut self, epoch: &Arc<str>, seq: u64) {
        if let Some((_, s)) = self.by_epoch.iter_mut().find(|(e, _)| **e == **epoch) {
            *s = (*s).max(seq);
            return;
        }
        if self.by_epoch.len() >= MAX_FLOOR_EPOCHS {
            let (_, oldest) = self.by_epoch.remove(0);
            self.any = self.any.max(oldest);
        }
        self.by_epoch.push((epoch.clone(), seq));
    }
}

/// The channel table of a segment, keyed by the hash stored in each channel (computed once
/// per operation by the hub, with foldhash seeded per process: several times faster than
/// std's SipHash on short names, and an attacker who does not know the seed cannot aim
/// names at one bucket). The hand removes a channel by its stored hash and pointer, without
/// hashing or comparing the name again.
#[derive(Debug, Default)]
pub(super) struct Table(hashbrown::HashTable<Arc<Channel>>);

impl Table {
    pub(super) fn get(&self, hash: u64, name: &ChannelName) -> Option<&Arc<Channel>> {
        self.0.find(hash, |c| c.name == *name)
    }

    /// The channel `name`, created by `create` if absent; `true` if it was there.
    pub(super) fn get_or_insert(
        &mut self,
        hash: u64,
        name: &ChannelName,
        create: impl FnOnce() -> Arc<Channel>,
    ) -> (Arc<Channel>, bool) {
        match self.0.entry(hash, |c| c.name == *name, |c| c.hash) {
            hashbrown::hash_table::Entry::Occupied(o) => (o.get().clone(), true),
            hashbrown::hash_table::Entry::Vacant(v) => (v.insert(create()).get().clone(), false),
        }
    }

    pub(super) fn insert(&mut self, ch: Arc<Channel>) {
        self.0.insert_unique(ch.hash, ch, |c| c.hash);
    }

    /// Removes this very channel (not another of the same name).
    pub(super) fn remove(&mut self, ch: &Arc<Channel>) -> bool {
        match self.0.find_entry(ch.hash, |c| Arc::ptr_eq(c, ch)) {
            Ok(e) => {
                e.remove();
                true
            }
            Err(_) => false,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Arc<Channel>> {
        self.0.iter()
    }
}

/// One segment of the registry.
#[derive(Debug, Default)]
pub(super) struct Segment {
    pub(super) inner: RwLock<SegmentInner>,
}

#[derive(Debug, Default)]
pub(super) struct SegmentInner {
    pub(super) map: Table,
    /// Every published channel of the segment (positions included), each exactly once, in
    /// clock order (the hand is the front). Placeholders are not in it: they leave with
    /// their last subscriber and are bounded by `max_empty_channels`.
    pub(super) clock: VecDeque<Arc<Channel>>,
    pub(super) floors: Floors,
    /// Fraction of a visit owed to this segment by past eviction turns.
    pub(super) hand_credit: f64,
}

impl Segment {
    /// The channel `name` (of hash `hash`), under the read lock only.
    pub(super) fn get(&self, hash: u64, name: &ChannelName) -> Option<Arc<Channel>> {
        self.inner.read().map.get(hash, name).cloned()
    }
}

impl SegmentInner {
    /// Moves the hand over at most `visits` channels, evicting what was not used since it
    /// last passed. Returns the bytes freed (already taken off the ledger).
    pub(super) fn evict(&mut self, visits: usize, ledger: &Ledger) -> usize {
        let mut freed = 0;
        for _ in 0..visits.min(self.clock.len()) {
            let Some(ch) = self.clock.pop_front() else {
                break;
            };
            let mut st = ch.state.lock();
            if st.removed {
                // Not reachable (only the hand removes published channels); dropping it
                // keeps the clock clean either way.
                continue;
            }
            if st.referenced {
                st.referenced = false;
            } else if st.position || (!st.used && st.subscribers.is_empty()) {
                // A position unused for a whole turn, or a channel that carried one message
                // and was never subscribed here (nobody here can hold a position in it):
                // forget it.
                if st.position {
                    ledger.positions.fetch_sub(1, Ordering::Relaxed);
                } else {
                    freed += st.drop_history();
                    ledger.evicted(EvictionCause::Budget);
                }
                st.removed = true;
                self.floors.raise(&st.epoch, st.last_seq);
                drop(st);
                self.map.remove(&ch);
                ledger.evicted(EvictionCause::Position);
                freed += entry_cost(&ch.name);
                continue;
            } else if st.subscribers.is_empty() {
                freed += st.drop_history();
                st.position = true;
                ledger.positions.fetch_add(1, Ordering::Relaxed);
                ledger.evicted(EvictionCause::Budget);
            } else if st.history_bytes > 0 {
                // Subscribed: the channel stays, its history goes.
                freed += st.drop_history();
                ledger.evicted(EvictionCause::Budget);
            }
            drop(st);
            self.clock.push_back(ch);
        }
        ledger.apply(0, freed);
        freed
    }

    /// Moves the hand over at most `visits` channels, turning those without subscribers
    /// whose last activity is `idle_ms` or more before `now_ms` into positions. Returns the
    /// bytes freed (already taken off the ledger).
    pub(super) fn sweep_idle(
        &mut self,
        visits: usize,
        now_ms: u64,
        idle_ms: u64,
        ledger: &Ledger,
    ) -> usize {
        let mut freed = 0;
        for _ in 0..visits.min(self.clock.len()) {
            let Some(ch) = self.clock.pop_front() else {
                break;
            };
            let mut st = ch.state.lock();
            if st.removed {
                continue;
            }
            if !st.position
                && st.subscribers.is_empty()
                && now_ms.saturating_sub(st.last_active_ms) >= idle_ms
            {
                freed += st.drop_history();
                st.position = true;
                ledger.positions.fetch_add(1, Ordering::Relaxed);
                ledger.evicted(EvictionCause::Idle);
            }
            drop(st);
            self.clock.push_back(ch);
        }
        ledger.apply(0, freed);
        freed
    }

    /// Gives back table memory after a burst of channels has gone (hash tables never shrink
    /// by themselves).
    pub(super) fn shrink(&mut self) {
        let len = self.map.0.len();
        if self.map.0.capacity() > 4 * len.max(256) {
            self.map.0.shrink_to(2 * len, |c| c.hash);
        }
        let len = self.clock.len();
        if self.clock.capacity() > 4 * len.max(256) {
            self.clock.shrink_to(2 * len);
        }
    }
}
