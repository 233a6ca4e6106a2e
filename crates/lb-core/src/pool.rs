//! The set of shards one LB dials, with each shard's breaker, failure window, last health
//! report, membership state and live relay count, safe to share between all connection
//! tasks.
//!
//! Shards live in a fixed table of [`MAX_SHARDS`] slots, one per shard URL (the key), each
//! carrying a caller-chosen target `T` (ws-lb: how to dial the shard). Membership updates
//! ([`ShardPool::update`]) mark slots listed or removed and never move a shard to another
//! slot, so indexes stay valid in `Tried` sets, leases and metrics across updates (see
//! [`crate::membership`]).
//!
//! Every method takes a short `parking_lot` lock per slot and never holds it across an
//! `.await`. A granted call is a [`Lease`]: it must be resolved with [`Lease::succeed`] or
//! [`Lease::fail`]; dropping it unresolved (the client vanished mid-handshake) releases a
//! half-open trial slot without counting an outcome. From selection on, the call counts in
//! the shard's live relay count; a successful handshake hands that count to a
//! [`RelayCount`], which the relay holds until it ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;

use crate::breaker::{BreakerState, CircuitBreaker, Ticket, Transition};
use crate::config::{BreakerConfig, ScoreConfig};
use crate::error::AttemptError;
use crate::membership::{slow_start_weight, MemberState, Update, REJOIN_WINDOW};
use crate::retry::{Tried, MAX_SHARDS};
use crate::score::{health_score, FailureWindow};
use crate::select::{pick, Admission, Candidate};

/// Receives breaker transitions (ws-lb turns them into metrics and log lines).
pub trait PoolObserver: Send + Sync + std::fmt::Debug {
    fn transition(&self, shard: usize, transition: Transition);
}

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct NoObserver;

impl PoolObserver for NoObserver {
    fn transition(&self, _: usize, _: Transition) {}
}

#[derive(Debug)]
struct ShardState<T> {
    key: String,
    target: T,
    breaker: CircuitBreaker,
    window: FailureWindow,
    utilization: f64,
    /// Slot capacity from the last `/health` (0: unknown).
    capacity: u64,
    /// This LB's live relay count when `utilization` was measured.
    polled_relays: usize,
    /// What the shard's last `/health` answer said (`Ok` until the first answer), or what
    /// it answered an upgrade with since (`draining` / `starting`, see `told_by_upgrade`).
    reported: Reported,
    /// `reported` came from an upgrade's 503 rather than a poll: the next poll replaces it,
    /// and a failed poll drops it (back to `Ok`, the breaker deciding), so that a shard
    /// whose health endpoint broke while it was starting is not kept out for good.
    told_by_upgrade: bool,
    /// How the last `/health` poll went (`Answered` until the first poll).
    poll: PollOutcome,
    /// Whether the last failure counted against this shard was a timeout (connect or
    /// handshake): what an overloaded LB sees from every shard at once. Panic routing
    /// only passes breakers opened this way, never one opened by refusals or errors.
    timed_out: bool,
    /// In the current member list.
    listed: bool,
    /// When it left the list (while not listed).
    removed_at: Option<Instant>,
    /// Seen healthy since it was (re)listed; `Some(None)`: without slow start.
    admitted: Option<Option<Instant>>,
}

impl<T> ShardState<T> {
    fn new(key: String, target: T, cfg: &Settings, admitted: Option<Option<Instant>>) -> Self {
        Self {
            key,
            target,
            breaker: CircuitBreaker::new(cfg.breaker),
            window: FailureWindow::new(cfg.score),
            utilization: 0.0,
            capacity: 0,
            polled_relays: 0,
            reported: Reported::Ok,
            told_by_upgrade: false,
            poll: PollOutcome::Answered,
            timed_out: false,
            listed: true,
            removed_at: None,
            admitted,
        }
    }

    /// Refused by a breaker that timeouts opened while its health polls pass: the sign of
    /// this LB's own overload rather than the shard's (see [`ShardPool::panic_select`]).
    fn refused_by_own_overload(&self) -> bool {
        self.health_ok() && self.timed_out && self.breaker.state() != BreakerState::Closed
    }

    fn health_ok(&self) -> bool {
        self.poll == PollOutcome::Answered
    }

    /// Refused by a breaker that timeouts opened on a shard this LB can still connect to
    /// (its polls pass, or connect and time out): busy or hung, or this LB overloaded — not
    /// down or cut off. The client should back off (1013).
    fn refused_as_overloaded(&self) -> bool {
        self.poll != PollOutcome::Unreachable
            && self.timed_out
            && self.breaker.state() != BreakerState::Closed
    }

    fn member(&self, now: Instant, slow_start: Duration) -> MemberState {
        match (self.listed, self.admitted) {
            (false, _) => MemberState::Removed,
            (true, None) => MemberState::Pending,
            (true, Some(from)) if slow_start_weight(from, now, slow_start) < 1.0 => {
                MemberState::Warming
            }
            (true, Some(_)) => MemberState::Active,
        }
    }

    /// A `/health` poll failed (`NoAnswer` or `Unreachable`).
    fn poll_failed(&mut self, outcome: PollOutcome) {
        self.poll = outcome;
        if self.told_by_upgrade {
            self.told_by_upgrade = false;
            self.reported = Reported::Ok;
        }
    }

    /// Utilization from the last poll, moved by the relays this LB opened or saw end since:
    /// between two polls every LB sees its own new clients at once, so P2C does not keep
    /// choosing the shard whose stale score looked best.
    fn live_utilization(&self, relays: usize) -> f64 {
        if self.capacity == 0 {
            return self.utilization;
        }
        let delta = relays as f64 - self.polled_relays as f64;
        (self.utilization + delta / self.capacity as f64).clamp(0.0, 1.0)
    }
}

/// How a shard's last `/health` poll went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PollOutcome {
    Answered,
    /// Connected, but no usable answer in time: a hung shard, or this LB too busy to read it.
    NoAnswer,
    /// Could not connect (refused, or the connect timed out): down or cut off from this LB.
    Unreachable,
}

#[derive(Debug)]
struct Slot<T> {
    state: Mutex<Option<ShardState<T>>>,
    /// Handshakes in progress plus relays running, from this LB.
    relays: Arc<AtomicUsize>,
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    breaker: BreakerConfig,
    score: ScoreConfig,
    slow_start: Duration,
}

/// The status a shard reports on its `/health` (ws-protocol's `ShardStatus`, which this crate
/// does not depend on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reported {
    /// Takes new clients.
    Ok,
    /// Shutting down: no new client.
    Draining,
    /// Re-reading its history after a start: no new client until `ok`.
    Starting,
}

impl Reported {
    /// Whether a shard with this status may be given a new client.
    pub fn takes_clients(self) -> bool {
        self == Reported::Ok
    }

    /// The status as `/health` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Draining => "draining",
            Self::Starting => "starting",
        }
    }
}

/// A point-in-time view of one shard, for `/health` and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct ShardSnapshot {
    pub shard_id: usize,
    /// The shard's key (ws-lb: its URL).
    pub url: String,
    pub member: MemberState,
    /// Selection weight (below 1 during slow start, 0 when it takes no clients).
    pub weight: f64,
    pub breaker: BreakerState,
    pub score: f64,
    /// Utilization as selection sees it now (last poll plus this LB's relays since).
    pub utilization: f64,
    /// Slot capacity from the last `/health` (0: not polled yet).
    pub capacity: u64,
    /// This LB's handshakes in progress and relays to the shard.
    pub relays: usize,
    pub recent_failures: usize,
    pub failure_rate: f64,
    /// The status of the shard's last `/health` answer, or of an upgrade's 503 since: `ok`,
    /// `draining` (shutting down) or `starting` (re-reading its history); only `ok` takes
    /// new clients.
    pub reported: Reported,
    /// Whether the last `/health` poll succeeded.
    pub health_ok: bool,
    /// Whether the shard counts as available: it takes new clients, its breaker would admit
    /// one now, and — unless the breaker is closed — its last `/health` poll succeeded. A
    /// breaker whose open timeout ran out on a shard that does not answer its polls still
    /// lets a trial through, but is not counted: otherwise `/health` and
    /// `ws_lb_shards_available` said `ok` / 1 between the timeout and the next failed trial
    /// while every shard was down.
    pub admits: bool,
}

/// All shards of one LB.
#[derive(Debug)]
pub struct ShardPool<T> {
    slots: Box<[Slot<T>]>,
    /// Slots `0..used` have been assigned a key at some point.
    used: AtomicUsize,
    /// Key to slot, for every assigned slot; held only by updates.
    directory: Mutex<HashMap<String, usize>>,
    settings: Settings,
    observer: Arc<dyn PoolObserver>,
}

/// Too many (or no) shards for one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a pool holds 1 to {MAX_SHARDS} shards, got {0}")]
pub struct PoolSizeError(pub usize);

/// A granted call on one shard.
#[derive(Debug)]
pub struct Lease<'a, T> {
    pool: &'a ShardPool<T>,
    index: usize,
    target: T,
    ticket: Option<Ticket>,
    /// Whether this lease still holds one unit of the shard's relay count.
    counted: bool,
    /// Granted past an open breaker because every breaker was open (see [`ShardPool::select`]).
    panic: bool,
}

/// The availability rule of [`ShardSnapshot::admits`]: a closed breaker counts; one that is
/// open past its timeout or half-open counts only while the shard answers its polls.
fn counts_as_available(breaker: &CircuitBreaker, health_ok: bool, now: Instant) -> bool {
    breaker.would_admit(now) && (breaker.state() == BreakerState::Closed || health_ok)
}

/// One unit of a shard's live relay count, held for as long as a relay runs.
#[derive(Debug)]
#[must_use = "the relay count drops when this does"]
pub struct RelayCount(Arc<AtomicUsize>);

impl Drop for RelayCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<T: Clone> ShardPool<T> {
    /// A pool of `members` (key, target), all admitted at full weight (a process starts
    /// with its shards as they are: slow start is for shards that join a running pool).
    pub fn new(
        members: Vec<(String, T)>,
        breaker: BreakerConfig,
        score: ScoreConfig,
        slow_start: Duration,
        observer: Arc<dyn PoolObserver>,
    ) -> Result<Self, PoolSizeError> {
        if members.is_empty() || members.len() > MAX_SHARDS {
            return Err(PoolSizeError(members.len()));
        }
        let slots = (0..MAX_SHARDS)
            .map(|_| Slot {
                state: Mutex::new(None),
                relays: Arc::new(AtomicUsize::new(0)),
            })
            .collect();
        let pool = Self {
            slots,
            used: AtomicUsize::new(0),
            directory: Mutex::new(HashMap::new()),
            settings: Settings {
                breaker,
                score,
                slow_start,
            },
            observer,
        };
        pool.apply(members, Instant::now(), Some(None))?;
        Ok(pool)
    }

    /// Makes `members` the listed set: new keys join pending (admitted after a healthy
    /// poll, then slow start), keys no longer listed are removed (no new clients; their
    /// relays continue), keys listed again rejoin (see [`crate::membership`]). Shards that
    /// stay keep all their state. An empty list or one too long changes nothing.
    pub fn update(&self, members: Vec<(String, T)>, now: Instant) -> Result<Update, PoolSizeError> {
        if members.is_empty() || members.len() > MAX_SHARDS {
            return Err(PoolSizeError(members.len()));
        }
        self.apply(members, now, None)
    }

    fn apply(
        &self,
        members: Vec<(String, T)>,
        now: Instant,
        admit_new: Option<Option<Instant>>,
    ) -> Result<Update, PoolSizeError> {
        let mut directory = self.directory.lock();
        let mut wanted: Vec<(String, T)> = Vec::with_capacity(members.len());
        for (key, target) in members {
            if !wanted.iter().any(|(k, _)| *k == key) {
                wanted.push((key, target));
            }
        }
        // Enough free slots for the new keys? Checked before anything changes. A slot
        // can be reused only when it is not listed after this update and nothing relays
        // to it (an unlisted slot's count only goes down).
        let fresh = wanted
            .iter()
            .filter(|(k, _)| !directory.contains_key(k))
            .count();
        let used = self.used.load(Ordering::Acquire);
        let reusable: Vec<usize> = {
            let mut r: Vec<(Option<Instant>, usize)> = (0..used)
                .filter_map(|i| {
                    let slot = self.slots.get(i)?;
                    let s = slot.state.lock();
                    let s = s.as_ref()?;
                    let stays = wanted.iter().any(|(k, _)| *k == s.key);
                    (!stays && slot.relays.load(Ordering::Relaxed) == 0)
                        .then_some((s.removed_at, i))
                })
                .collect();
            // Longest removed first; still-listed ones (about to be removed) last.
            r.sort_by_key(|&(at, i)| (at.is_none(), at, i));
            r.into_iter().map(|(_, i)| i).collect()
        };
        if fresh > MAX_SHARDS - used + reusable.len() {
            return Err(PoolSizeError(used + fresh - reusable.len()));
        }
        let mut update = Update::default();
        for i in 0..used {
            let Some(slot) = self.slots.get(i) else {
                continue;
            };
            let mut s = slot.state.lock();
            if let Some(s) = s.as_mut() {
                if s.listed && !wanted.iter().any(|(k, _)| *k == s.key) {
                    s.listed = false;
                    s.removed_at = Some(now);
                    update.removed.push(i);
                }
            }
        }
        let mut reusable = reusable.into_iter();
        let mut next_fresh = used;
        for (key, target) in wanted {
            if let Some(&i) = directory.get(&key) {
                let Some(slot) = self.slots.get(i) else {
                    continue;
                };
                let mut s = slot.state.lock();
                let Some(s) = s.as_mut() else { continue };
                s.target = target;
                if !s.listed {
                    s.listed = true;
                    let away = s.removed_at.map(|at| now.saturating_duration_since(at));
                    if away.is_none_or(|d| d > REJOIN_WINDOW) {
                        s.admitted = admit_new;
                    }
                    s.removed_at = None;
                    update.rejoined.push(i);
                }
                continue;
            }
            let i = if next_fresh < MAX_SHARDS {
                next_fresh += 1;
                next_fresh - 1
            } else {
                match reusable.next() {
                    Some(i) => i,
                    None => break,
                }
            };
            let Some(slot) = self.slots.get(i) else {
                continue;
            };
            let mut s = slot.state.lock();
            if let Some(old) = s.as_ref() {
                directory.remove(&old.key);
            }
            directory.insert(key.clone(), i);
            *s = Some(ShardState::new(key, target, &self.settings, admit_new));
            update.added.push(i);
        }
        self.used.store(next_fresh, Ordering::Release);
        Ok(update)
    }

    /// The listed shards (pending, warming, active) and their targets: what to poll.
    pub fn listed(&self) -> Vec<(usize, T)> {
        self.assigned()
            .filter_map(|(i, slot)| {
                let s = slot.state.lock();
                let s = s.as_ref()?;
                s.listed.then(|| (i, s.target.clone()))
            })
            .collect()
    }

    /// Chooses a shard not yet in `tried` and takes a call permit on it.
    pub fn select<R: Rng + ?Sized>(
        &self,
        tried: Tried,
        now: Instant,
        rng: &mut R,
    ) -> Option<Lease<'_, T>> {
        let mut excluded = tried;
        loop {
            // Shards panic routing may use (`panic_select`): breaker open (not half-open: its
            // trials are the breaker's own test) by timeouts, polls passing.
            let mut panic_ok = Tried::default();
            let candidates: Vec<Candidate> = self
                .assigned()
                .filter(|(i, _)| !excluded.contains(*i))
                .filter_map(|(index, slot)| {
                    let mut s = slot.state.lock();
                    let s = s.as_mut()?;
                    if !s.reported.takes_clients() || !s.listed {
                        return None;
                    }
                    let ramp_from = s.admitted?;
                    let admission = match (s.breaker.state(), s.breaker.would_admit(now)) {
                        (_, false) => Admission::Refused,
                        (BreakerState::Closed, true) => Admission::Closed,
                        (_, true) => Admission::Trial,
                    };
                    let rate = s.window.failure_rate(now);
                    let relays = slot.relays.load(Ordering::Relaxed);
                    let score = health_score(s.live_utilization(relays), rate);
                    let c = Candidate {
                        index,
                        admission,
                        score,
                        weight: slow_start_weight(ramp_from, now, self.settings.slow_start),
                        last_failure: s.breaker.last_failure(),
                    };
                    if s.refused_by_own_overload() && s.breaker.state() == BreakerState::Open {
                        panic_ok.insert(index);
                    }
                    Some(c)
                })
                .collect();
            let Some(index) = pick(&candidates, rng) else {
                return self.panic_select(&candidates, panic_ok, rng);
            };
            let slot = self.slots.get(index)?;
            let acquired = {
                let mut s = slot.state.lock();
                s.as_mut()
                    .map(|s| (s.breaker.acquire(now), s.target.clone()))
            };
            match acquired {
                Some((Ok((ticket, transition)), target)) => {
                    if let Some(t) = transition {
                        self.observer.transition(index, t);
                    }
                    slot.relays.fetch_add(1, Ordering::Relaxed);
                    return Some(Lease {
                        pool: self,
                        index,
                        target,
                        ticket: Some(ticket),
                        counted: true,
                        panic: false,
                    });
                }
                // Another task took the last trial slot between snapshot and acquire.
                _ => excluded.insert(index),
            }
        }
    }

    /// Panic routing, as Envoy's panic threshold and its outlier detection's
    /// `max_ejection_percent` do: when no shard this client may use admits (no breaker
    /// closed, none due for a trial) but some of them have a breaker opened by timeouts and
    /// still pass their health polls, the failures that opened the breakers are more likely this LB's own
    /// (an overloaded LB times out its dials to every shard at once) than every shard's.
    /// Refusing every client for `circuit_breaker_timeout` would turn an overload into an
    /// outage of this LB, so the client is sent to one of those shards (P2C on score) past
    /// its breaker. Such a call changes no breaker: its failure counts in the shard's
    /// failure window and score only, and the breaker recovers through its own trials.
    /// Shards whose polls fail (down, unreachable), whose last failure was not a timeout
    /// (refused, an HTTP error: the shard's own answer) or whose breaker is half-open (its
    /// trials are limited on purpose) are never chosen this way.
    fn panic_select<R: Rng + ?Sized>(
        &self,
        candidates: &[Candidate],
        eligible: Tried,
        rng: &mut R,
    ) -> Option<Lease<'_, T>> {
        if candidates.iter().any(|c| c.admission != Admission::Refused) {
            return None;
        }
        let healthy: Vec<Candidate> = candidates
            .iter()
            .filter(|c| eligible.contains(c.index))
            .map(|c| Candidate {
                admission: Admission::Closed,
                ..*c
            })
            .collect();
        let index = pick(&healthy, rng)?;
        let slot = self.slots.get(index)?;
        let target = slot.state.lock().as_ref()?.target.clone();
        slot.relays.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            pool: self,
            index,
            target,
            ticket: Some(Ticket::Normal),
            counted: true,
            panic: true,
        })
    }
}

impl<T> ShardPool<T> {
    fn assigned(&self) -> impl Iterator<Item = (usize, &Slot<T>)> {
        let used = self.used.load(Ordering::Acquire);
        self.slots.iter().take(used).enumerate()
    }

    /// Whether some shard not in `tried` that would take clients is refused by a breaker
    /// that timeouts opened while this LB can still connect to it (its polls pass, or
    /// connect and then time out): busy or hung shards, or this LB's own overload (see
    /// [`Self::panic_select`]), not shards that are down or cut off. A client refused for
    /// that reason should back off (1013), not reconnect at once as after a restart (1012)
    /// — the same close it got while the timeouts were still attempts of its own. (Before,
    /// polls had to pass: when this LB's polls timed out too, clients went from 1013 to 1012
    /// the moment the breakers opened.)
    pub fn refused_by_timeouts(&self, tried: Tried) -> bool {
        self.assigned()
            .filter(|(i, _)| !tried.contains(*i))
            .any(|(_, slot)| {
                slot.state.lock().as_ref().is_some_and(|s| {
                    s.listed && s.reported.takes_clients() && s.refused_as_overloaded()
                })
            })
    }

    /// Number of listed shards.
    pub fn len(&self) -> usize {
        self.assigned()
            .filter(|(_, slot)| slot.state.lock().as_ref().is_some_and(|s| s.listed))
            .count()
    }

    /// Always false: a pool lists at least one shard.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stores the result of a `/health` poll: utilization, slot capacity (0 if unknown)
    /// and the status the shard reported. A pending shard that answers `ok` is admitted
    /// here, and starts its slow start.
    pub fn set_health(
        &self,
        index: usize,
        utilization: f64,
        capacity: u64,
        reported: Reported,
        now: Instant,
    ) {
        if let Some(slot) = self.slots.get(index) {
            let mut s = slot.state.lock();
            let Some(s) = s.as_mut() else { return };
            s.utilization = if utilization.is_nan() {
                1.0
            } else {
                utilization.clamp(0.0, 1.0)
            };
            s.capacity = capacity;
            s.polled_relays = slot.relays.load(Ordering::Relaxed);
            s.reported = reported;
            s.told_by_upgrade = false;
            s.poll = PollOutcome::Answered;
            if s.listed && s.admitted.is_none() && reported.takes_clients() {
                s.admitted = Some((!self.settings.slow_start.is_zero()).then_some(now));
            }
        }
    }

    /// Records that a `/health` poll failed. The breaker is left to handshake outcomes; the
    /// shard stays selectable so that a broken health endpoint alone never empties the pool
    /// (a `draining` / `starting` learnt from an upgrade's answer is dropped too).
    pub fn set_health_unreachable(&self, index: usize) {
        if let Some(slot) = self.slots.get(index) {
            if let Some(s) = slot.state.lock().as_mut() {
                s.poll_failed(PollOutcome::NoAnswer);
            }
        }
    }

    /// Records that this LB could not even open a TCP connection to the shard for its
    /// `/health` poll (refused, or the connect timed out): the same evidence as a failed
    /// connect, so while the breaker is closed it counts as one failed call. Without it, a
    /// shard this LB cannot reach (a network partition between the two) never opens its
    /// breaker: once a few attempts failed, the score makes it lose almost every P2C
    /// comparison, so consecutive failures pile up too slowly, and it keeps being tried now
    /// and then, each try costing a client `attempt_timeout`. A reachable shard that answers
    /// its poll slowly or with an error does not count (a busy or half-broken health
    /// endpoint alone must never empty the pool), and open or half-open breakers are left
    /// to the handshakes (trials), as before.
    pub fn probe_unreachable(&self, index: usize, now: Instant) {
        let transition = self.slots.get(index).and_then(|slot| {
            let mut s = slot.state.lock();
            let s = s.as_mut()?;
            s.poll_failed(PollOutcome::Unreachable);
            if s.breaker.state() != BreakerState::Closed {
                return None;
            }
            let (ticket, _) = s.breaker.acquire(now).ok()?;
            s.breaker.on_failure(ticket, now)
        });
        if let Some(t) = transition {
            self.observer.transition(index, t);
        }
    }

    /// Whether any shard counts as available now (for the LB's own `/health`; see
    /// [`ShardSnapshot::admits`]).
    pub fn any_admits(&self, now: Instant) -> bool {
        self.assigned().any(|(_, slot)| {
            let s = slot.state.lock();
            s.as_ref().is_some_and(|s| {
                s.listed
                    && s.admitted.is_some()
                    && s.reported.takes_clients()
                    && counts_as_available(&s.breaker, s.health_ok(), now)
            })
        })
    }

    /// A snapshot of every shard that has a slot (removed ones included).
    pub fn snapshot(&self, now: Instant) -> Vec<ShardSnapshot> {
        let slow_start = self.settings.slow_start;
        self.assigned()
            .filter_map(|(shard_id, slot)| {
                let mut s = slot.state.lock();
                let s = s.as_mut()?;
                let relays = slot.relays.load(Ordering::Relaxed);
                let failure_rate = s.window.failure_rate(now);
                let utilization = s.live_utilization(relays);
                let member = s.member(now, slow_start);
                let weight = match s.admitted {
                    Some(from) if member.takes_clients() => {
                        slow_start_weight(from, now, slow_start)
                    }
                    _ => 0.0,
                };
                Some(ShardSnapshot {
                    shard_id,
                    url: s.key.clone(),
                    member,
                    weight,
                    breaker: s.breaker.state(),
                    score: health_score(utilization, failure_rate),
                    utilization,
                    capacity: s.capacity,
                    relays,
                    recent_failures: s.window.failures(now),
                    failure_rate,
                    reported: s.reported,
                    health_ok: s.health_ok(),
                    admits: member.takes_clients()
                        && s.reported.takes_clients()
                        && counts_as_available(&s.breaker, s.health_ok(), now),
                })
            })
            .collect()
    }

    fn resolve(&self, index: usize, ticket: Ticket, outcome: Option<&AttemptError>, now: Instant) {
        let Some(slot) = self.slots.get(index) else {
            return;
        };
        let transition = {
            let mut s = slot.state.lock();
            let Some(s) = s.as_mut() else { return };
            match outcome {
                None => {
                    s.window.record(now, false);
                    s.breaker.on_success(ticket)
                }
                // The shard said it is draining or starting: as if a poll had said so (no
                // new client until a poll says `ok`), and nothing held against it — a
                // half-open trial just gives its slot back.
                Some(AttemptError::NotReady(status)) => {
                    s.reported = *status;
                    s.told_by_upgrade = true;
                    s.breaker.on_cancel(ticket);
                    None
                }
                Some(e) if e.counts_against_shard() => {
                    s.timed_out = matches!(
                        e,
                        AttemptError::ConnectTimeout(_) | AttemptError::HandshakeTimeout(_)
                    );
                    s.window.record(now, true);
                    s.breaker.on_failure(ticket, now)
                }
                Some(_) => {
                    s.breaker.on_cancel(ticket);
                    None
                }
            }
        };
        if let Some(t) = transition {
            self.observer.transition(index, t);
        }
    }
}

impl<T> Lease<'_, T> {
    /// The chosen shard.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The chosen shard's target.
    pub fn target(&self) -> &T {
        &self.target
    }

    /// Whether this call was granted by panic routing, past an open breaker.
    pub fn is_panic(&self) -> bool {
        self.panic
    }

    /// Whether this call is a half-open trial.
    pub fn is_trial(&self) -> bool {
        matches!(self.ticket, Some(Ticket::Trial { .. }))
    }

    /// The handshake with the shard succeeded; the returned count is the relay's.
    pub fn succeed(mut self) -> RelayCount {
        if let Some(t) = self.ticket.take() {
            self.pool.resolve(self.index, t, None, Instant::now());
        }
        self.counted = false;
        let relays = self
            .pool
            .slots
            .get(self.index)
            .map(|s| s.relays.clone())
            .unwrap_or_else(|| Arc::new(AtomicUsize::new(1)));
        RelayCount(relays)
    }

    /// The handshake with the shard failed with `error`.
    pub fn fail(mut self, error: &AttemptError) {
        if let Some(t) = self.ticket.take() {
            self.pool
                .resolve(self.index, t, Some(error), Instant::now());
        }
    }
}

impl<T> Drop for Lease<'_, T> {
    fn drop(&mut self) {
        let Some(slot) = self.pool.slots.get(self.index) else {
            return;
        };
        if let Some(t) = self.ticket.take() {
            if let Some(s) = slot.state.lock().as_mut() {
                s.breaker.on_cancel(t);
            }
        }
        if self.counted {
            slot.relays.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use std::time::Duration;

    #[derive(Debug, Default)]
    struct Record(Mutex<Vec<(usize, Transition)>>);
    impl PoolObserver for Record {
        fn transition(&self, shard: usize, t: Transition) {
            self.0.lock().push((shard, t));
        }
    }

    fn keys(n: std::ops::Range<usize>) -> Vec<(String, ())> {
        n.map(|i| (format!("ws://s{i}:1/ws"), ())).collect()
    }

    fn pool_with(n: usize, slow_start: Duration, obs: Arc<dyn PoolObserver>) -> ShardPool<()> {
        let b = BreakerConfig::try_new(3, Duration::from_secs(30), 2, 2).unwrap();
        ShardPool::new(keys(0..n), b, ScoreConfig::default(), slow_start, obs).unwrap()
    }

    fn pool(n: usize, obs: Arc<dyn PoolObserver>) -> ShardPool<()> {
        pool_with(n, Duration::ZERO, obs)
    }

    fn health(p: &ShardPool<()>, i: usize, utilization: f64, draining: bool) {
        let reported = if draining {
            Reported::Draining
        } else {
            Reported::Ok
        };
        p.set_health(i, utilization, 100, reported, Instant::now());
    }

    /// Picks `n` clients, each released at once; counts per slot.
    fn spread(p: &ShardPool<()>, n: usize, rng: &mut StdRng) -> Vec<usize> {
        let mut counts = vec![0; MAX_SHARDS];
        for _ in 0..n {
            let lease = p.select(Tried::default(), Instant::now(), rng).unwrap();
            counts[lease.index()] += 1;
            drop(lease.succeed());
        }
        counts
    }

    #[tokio::test(start_paused = true)]
    async fn steers_new_clients_to_lightly_loaded_shards() {
        let p = pool(3, Arc::new(NoObserver));
        health(&p, 0, 0.9, false);
        health(&p, 1, 0.1, false);
        health(&p, 2, 0.1, false);
        let mut rng = StdRng::seed_from_u64(42);
        let mut counts = [0usize; 3];
        for _ in 0..3_000 {
            let lease = p
                .select(Tried::default(), Instant::now(), &mut rng)
                .unwrap();
            counts[lease.index()] += 1;
            drop(lease.succeed());
        }
        assert_eq!(counts[0], 0, "{counts:?}");
    }

    /// Opens shard `i`'s breaker (3 failures in the test pool).
    fn open(p: &ShardPool<()>, i: usize, rng: &mut StdRng) {
        let mut tried = Tried::default();
        for j in 0..p.len() {
            if j != i {
                tried.insert(j);
            }
        }
        for _ in 0..3 {
            let lease = p.select(tried, Instant::now(), rng).unwrap();
            assert_eq!(lease.index(), i);
            lease.fail(&AttemptError::HandshakeTimeout(Duration::from_secs(2)));
        }
        assert_eq!(p.snapshot(Instant::now())[i].breaker, BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn every_breaker_open_routes_past_them_to_shards_that_pass_polls() {
        let p = pool(3, Arc::new(NoObserver));
        let mut rng = StdRng::seed_from_u64(7);
        // One breaker open, two closed: no panic, the open shard gets nothing.
        open(&p, 0, &mut rng);
        for _ in 0..50 {
            let lease = p
                .select(Tried::default(), Instant::now(), &mut rng)
                .unwrap();
            assert!(!lease.is_panic());
            assert_ne!(lease.index(), 0);
            drop(lease.succeed());
        }
        open(&p, 1, &mut rng);
        open(&p, 2, &mut rng);
        // Shard 2's polls fail: it is never chosen past its breaker.
        p.set_health_unreachable(2);
        let mut seen = [0usize; 3];
        for _ in 0..200 {
            let lease = p
                .select(Tried::default(), Instant::now(), &mut rng)
                .unwrap();
            assert!(lease.is_panic());
            seen[lease.index()] += 1;
            // Neither outcome of a panic call moves a breaker.
            if seen.iter().sum::<usize>() % 2 == 0 {
                lease.fail(&AttemptError::HandshakeTimeout(Duration::from_secs(2)));
            } else {
                drop(lease.succeed());
            }
        }
        // P2C on score among the two that pass their polls; never the one whose polls fail.
        assert_eq!((seen[0] + seen[1], seen[2]), (200, 0), "{seen:?}");
        assert!(p
            .snapshot(Instant::now())
            .iter()
            .all(|s| s.breaker == BreakerState::Open));
        // A client that tried both healthy shards gets none; so does everyone once no open
        // shard passes its polls.
        let mut tried = Tried::default();
        tried.insert(0);
        tried.insert(1);
        assert!(p.select(tried, Instant::now(), &mut rng).is_none());
        // Breakers opened by timeouts on shards that pass their polls: a client refused
        // while one of them is untried is told to back off (1013).
        assert!(p.refused_by_timeouts(Tried::default()));
        let mut all = tried;
        all.insert(2);
        assert!(!p.refused_by_timeouts(all));
        p.set_health_unreachable(0);
        p.set_health_unreachable(1);
        assert!(p
            .select(Tried::default(), Instant::now(), &mut rng)
            .is_none());
        // Polls that connect and time out (a hung shard, or this LB too busy to read the
        // answer): no panic routing, but the client is still told to back off (1013), as
        // while the timeouts were its own attempts.
        assert!(p.refused_by_timeouts(Tried::default()));
        // Polls that cannot connect: down or cut off, so 1012 (reconnect, elsewhere).
        for i in 0..3 {
            p.probe_unreachable(i, Instant::now());
        }
        assert!(
            !p.refused_by_timeouts(Tried::default()),
            "polls cannot connect: down or cut off, not this LB"
        );
        // After the open timeout the breakers' own trials come first again.
        tokio::time::advance(Duration::from_secs(31)).await;
        let lease = p
            .select(Tried::default(), Instant::now(), &mut rng)
            .unwrap();
        assert!(lease.is_trial() && !lease.is_panic());
    }

    #[tokio::test(start_paused = true)]
    async fn a_shard_that_answers_not_ready_is_skipped_until_a_poll_not_held_against_it() {
        let p = pool(2, Arc::new(NoObserver));
        let mut rng = StdRng::seed_from_u64(3);
        let mut only0 = Tried::default();
        only0.insert(1);
        // A closed breaker: a `starting` answer counts no failure (three would open it).
        for _ in 0..3 {
            p.set_health(0, 0.0, 100, Reported::Ok, Instant::now());
            let lease = p.select(only0, Instant::now(), &mut rng).unwrap();
            lease.fail(&AttemptError::NotReady(Reported::Starting));
            let s = &p.snapshot(Instant::now())[0];
            assert_eq!(
                (s.breaker, s.reported, s.recent_failures),
                (BreakerState::Closed, Reported::Starting, 0)
            );
            // ... and no client is sent there until a poll says `ok`.
            assert!(p.select(only0, Instant::now(), &mut rng).is_none());
        }
        // A half-open trial refused as `draining` gives its slot back: the breaker stays
        // half-open, and the next trial comes as soon as a poll says `ok`.
        p.set_health(0, 0.0, 100, Reported::Ok, Instant::now());
        open(&p, 0, &mut rng);
        tokio::time::advance(Duration::from_secs(30)).await;
        let trial = p.select(only0, Instant::now(), &mut rng).unwrap();
        assert!(trial.is_trial());
        trial.fail(&AttemptError::NotReady(Reported::Draining));
        let s = &p.snapshot(Instant::now())[0];
        assert_eq!(
            (s.breaker, s.reported),
            (BreakerState::HalfOpen, Reported::Draining)
        );
        assert!(p.select(only0, Instant::now(), &mut rng).is_none());
        p.set_health(0, 0.0, 100, Reported::Ok, Instant::now());
        for _ in 0..2 {
            let trial = p.select(only0, Instant::now(), &mut rng).unwrap();
            assert!(trial.is_trial());
            drop(trial.succeed());
        }
        assert_eq!(p.snapshot(Instant::now())[0].breaker, BreakerState::Closed);
        // What an upgrade said is dropped by a failed poll (a broken health endpoint alone
        // never keeps a shard out); what a poll said stays until the next poll.
        let lease = p.select(only0, Instant::now(), &mut rng).unwrap();
        lease.fail(&AttemptError::NotReady(Reported::Starting));
        p.set_health_unreachable(0);
        assert_eq!(p.snapshot(Instant::now())[0].reported, Reported::Ok);
        assert!(p.select(only0, Instant::now(), &mut rng).is_some());
        p.set_health(0, 0.0, 100, Reported::Starting, Instant::now());
        p.set_health_unreachable(0);
        p.probe_unreachable(0, Instant::now());
        assert_eq!(p.snapshot(Instant::now())[0].reported, Reported::Starting);
    }

    #[tokio::test(start_paused = true)]
    async fn failing_shard_opens_is_avoided_then_recovers() {
        let rec = Arc::new(Record::default());
        let p = pool(2, rec.clone());
        let mut rng = StdRng::seed_from_u64(1);
        let mut tried = Tried::default();
        tried.insert(1);
        for _ in 0..3 {
            let lease = p.select(tried, Instant::now(), &mut rng).unwrap();
            assert_eq!(lease.index(), 0);
            lease.fail(&AttemptError::ConnectRefused("down".into()));
        }
        assert_eq!(
            rec.0.lock().last().unwrap(),
            &(
                0,
                Transition {
                    from: BreakerState::Closed,
                    to: BreakerState::Open
                }
            )
        );
        for _ in 0..100 {
            let lease = p
                .select(Tried::default(), Instant::now(), &mut rng)
                .unwrap();
            assert_eq!(lease.index(), 1, "traffic avoids the open shard");
            drop(lease.succeed());
        }
        assert!(
            p.select(tried, Instant::now(), &mut rng).is_none(),
            "only the open shard left: nothing admitted"
        );
        assert!(
            !p.refused_by_timeouts(tried),
            "opened by refusals: the shard is down, not this LB overloaded"
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        // Past the timeout the recovering shard is probed first, even with a healthy one
        // available, but never by more than the configured trial calls at once.
        let picks: Vec<_> = (0..5)
            .filter_map(|_| p.select(Tried::default(), Instant::now(), &mut rng))
            .collect();
        let trials: Vec<_> = picks.into_iter().filter(|l| l.index() == 0).collect();
        assert_eq!(
            trials.len(),
            2,
            "half-open admits at most the configured trial calls"
        );
        assert!(trials.iter().all(Lease::is_trial));
        for l in trials {
            drop(l.succeed());
        }
        let kinds: Vec<_> = rec.0.lock().iter().map(|(_, t)| (t.from, t.to)).collect();
        assert_eq!(
            kinds,
            vec![
                (BreakerState::Closed, BreakerState::Open),
                (BreakerState::Open, BreakerState::HalfOpen),
                (BreakerState::HalfOpen, BreakerState::Closed)
            ]
        );
        assert!(p.snapshot(Instant::now())[0].admits);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_lease_frees_the_trial_slot() {
        let p = pool(1, Arc::new(NoObserver));
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..3 {
            p.select(Tried::default(), Instant::now(), &mut rng)
                .unwrap()
                .fail(&AttemptError::HttpStatus(503));
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        let a = p
            .select(Tried::default(), Instant::now(), &mut rng)
            .unwrap();
        let b = p
            .select(Tried::default(), Instant::now(), &mut rng)
            .unwrap();
        assert!(p
            .select(Tried::default(), Instant::now(), &mut rng)
            .is_none());
        drop(a);
        let c = p.select(Tried::default(), Instant::now(), &mut rng);
        assert!(c.is_some());
        drop(b);
    }

    #[tokio::test(start_paused = true)]
    async fn unreachable_probes_count_as_failures_only_while_closed() {
        let p = pool(2, Arc::new(NoObserver));
        let mut rng = StdRng::seed_from_u64(3);
        // A success between probes resets the count, as for handshakes.
        p.probe_unreachable(0, Instant::now());
        p.probe_unreachable(0, Instant::now());
        let lease = loop {
            let l = p
                .select(Tried::default(), Instant::now(), &mut rng)
                .unwrap();
            if l.index() == 0 {
                break l;
            }
        };
        drop(lease.succeed());
        p.probe_unreachable(0, Instant::now());
        p.probe_unreachable(0, Instant::now());
        assert_eq!(p.snapshot(Instant::now())[0].breaker, BreakerState::Closed);
        p.probe_unreachable(0, Instant::now());
        let snap = p.snapshot(Instant::now());
        assert_eq!(snap[0].breaker, BreakerState::Open);
        assert!(!snap[0].admits && !snap[0].health_ok);
        assert_eq!(snap[1].breaker, BreakerState::Closed);
        // Open: probes change nothing; after the timeout the next client is the trial, but
        // a shard that does not answer its polls is not reported available meanwhile.
        tokio::time::advance(Duration::from_secs(30)).await;
        p.probe_unreachable(0, Instant::now());
        assert!(!p.snapshot(Instant::now())[0].admits);
        p.set_health(0, 0.0, 100, Reported::Ok, Instant::now());
        assert!(
            p.snapshot(Instant::now())[0].admits,
            "answering again: available"
        );
        p.probe_unreachable(0, Instant::now());
        let trial = p
            .select(Tried::default(), Instant::now(), &mut rng)
            .unwrap();
        assert!(trial.is_trial() && trial.index() == 0);
        // Half-open: probes leave the trial alone.
        p.probe_unreachable(0, Instant::now());
        assert_eq!(
            p.snapshot(Instant::now())[0].breaker,
            BreakerState::HalfOpen
        );
        drop(trial);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_shards_are_skipped_and_health_reflects_it() {
        let p = pool(2, Arc::new(NoObserver));
        health(&p, 0, 0.0, true);
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..50 {
            assert_eq!(
                p.select(Tried::default(), Instant::now(), &mut rng)
                    .unwrap()
                    .index(),
                1
            );
        }
        health(&p, 1, 0.5, true);
        assert!(!p.any_admits(Instant::now()));
        assert!(p
            .select(Tried::default(), Instant::now(), &mut rng)
            .is_none());
        // A starting shard takes no client either, and says which it is.
        p.set_health(1, 0.5, 100, Reported::Starting, Instant::now());
        assert!(!p.any_admits(Instant::now()));
        let snap = p.snapshot(Instant::now());
        assert_eq!(
            (snap[0].reported, snap[1].reported),
            (Reported::Draining, Reported::Starting)
        );
        assert!(!snap[0].admits && !snap[1].admits);
        health(&p, 1, 0.5, false);
        assert!(p.any_admits(Instant::now()));
        assert_eq!(p.snapshot(Instant::now())[1].reported, Reported::Ok);
    }

    #[test]
    fn size_bounds() {
        let make = |n| {
            ShardPool::new(
                keys(0..n),
                BreakerConfig::default(),
                ScoreConfig::default(),
                Duration::ZERO,
                Arc::new(NoObserver),
            )
        };
        assert_eq!(make(0).unwrap_err(), PoolSizeError(0));
        assert_eq!(make(129).unwrap_err(), PoolSizeError(129));
        assert_eq!(make(128).unwrap().len(), 128);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_shard_waits_for_health_then_ramps_over_the_slow_start() {
        let p = pool_with(9, Duration::from_secs(30), Arc::new(NoObserver));
        let mut rng = StdRng::seed_from_u64(11);
        for i in 0..9 {
            health(&p, i, 0.5, false);
        }
        let u = p.update(keys(0..10), Instant::now()).unwrap();
        assert_eq!(u.added, vec![9]);
        assert!(u.removed.is_empty() && u.rejoined.is_empty());
        assert_eq!(p.snapshot(Instant::now())[9].member, MemberState::Pending);
        assert_eq!(spread(&p, 2_000, &mut rng)[9], 0, "pending: no client");
        // A draining answer does not admit it either.
        health(&p, 9, 0.0, true);
        assert_eq!(p.snapshot(Instant::now())[9].member, MemberState::Pending);
        // Healthy and empty: admitted at the floor weight. Without slow start it would win
        // every pair it is in (2/10 of all clients); at 10 % it gets about 2 %.
        health(&p, 9, 0.0, false);
        assert_eq!(p.snapshot(Instant::now())[9].member, MemberState::Warming);
        let share = |c: &[usize]| c[9] as f64 / c.iter().sum::<usize>() as f64;
        let first = share(&spread(&p, 10_000, &mut rng));
        assert!((0.01..0.035).contains(&first), "{first}");
        tokio::time::advance(Duration::from_secs(15)).await;
        let half = share(&spread(&p, 10_000, &mut rng));
        assert!((0.08..0.13).contains(&half), "{half}");
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(p.snapshot(Instant::now())[9].member, MemberState::Active);
        let full = share(&spread(&p, 10_000, &mut rng));
        assert!((0.17..0.23).contains(&full), "{full}");
    }

    #[tokio::test(start_paused = true)]
    async fn removal_stops_new_clients_keeps_relays_and_state_and_a_quick_rejoin_restores_it() {
        let rec = Arc::new(Record::default());
        let p = pool_with(3, Duration::from_secs(30), rec.clone());
        let mut rng = StdRng::seed_from_u64(2);
        // Shard 1 holds a relay and has a history: two failures, then its breaker opens.
        let relay = loop {
            let l = p
                .select(Tried::default(), Instant::now(), &mut rng)
                .unwrap();
            if l.index() == 1 {
                break l.succeed();
            }
        };
        let mut only_1 = Tried::default();
        only_1.insert(0);
        only_1.insert(2);
        for _ in 0..3 {
            p.select(only_1, Instant::now(), &mut rng)
                .unwrap()
                .fail(&AttemptError::ConnectRefused("x".into()));
        }
        assert_eq!(p.snapshot(Instant::now())[1].breaker, BreakerState::Open);
        let u = p
            .update([keys(0..1), keys(2..3)].concat(), Instant::now())
            .unwrap();
        assert_eq!(u.removed, vec![1]);
        let snap = p.snapshot(Instant::now());
        assert_eq!(snap[1].member, MemberState::Removed);
        assert_eq!(snap[1].relays, 1, "its relay is untouched");
        assert!(!snap[1].admits);
        assert_eq!(p.len(), 2);
        assert_eq!(
            p.listed().iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            [0, 2]
        );
        // Past its open timeout a listed shard would get the trial; a removed one never.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(spread(&p, 500, &mut rng)[1], 0);
        // Updates that keep shards 0 and 2 leave their state alone.
        health(&p, 0, 0.7, false);
        let before = p.snapshot(Instant::now());
        let u = p
            .update([keys(2..3), keys(0..1)].concat(), Instant::now())
            .unwrap();
        assert!(!u.changed());
        let after = p.snapshot(Instant::now());
        assert_eq!(before[0].utilization, after[0].utilization);
        // Back within the rejoin window: same slot, breaker still open (now due a
        // trial), active at once, its relay counted.
        let u = p.update(keys(0..3), Instant::now()).unwrap();
        assert_eq!(u.rejoined, vec![1]);
        let snap = p.snapshot(Instant::now());
        assert_eq!(snap[1].member, MemberState::Active);
        assert_eq!(snap[1].breaker, BreakerState::Open);
        assert_eq!(snap[1].relays, 1);
        let trial = p
            .select(Tried::default(), Instant::now(), &mut rng)
            .unwrap();
        assert!(trial.is_trial() && trial.index() == 1);
        drop(trial);
        drop(relay);
        assert_eq!(p.snapshot(Instant::now())[1].relays, 0);
        // Gone for longer than the rejoin window: it must pass a health poll again.
        p.update(keys(0..1), Instant::now()).unwrap();
        tokio::time::advance(REJOIN_WINDOW + Duration::from_secs(1)).await;
        p.update(keys(0..3), Instant::now()).unwrap();
        let snap = p.snapshot(Instant::now());
        assert_eq!(snap[1].member, MemberState::Pending);
        assert_eq!(snap[2].member, MemberState::Pending);
        assert_eq!(snap[1].breaker, BreakerState::HalfOpen, "history kept");
        let kinds: Vec<_> = rec.0.lock().iter().map(|(i, t)| (*i, t.to)).collect();
        assert_eq!(kinds.first(), Some(&(1, BreakerState::Open)));
    }

    #[tokio::test(start_paused = true)]
    async fn flapping_does_not_move_slots_or_reset_a_ramp() {
        let p = pool_with(2, Duration::from_secs(30), Arc::new(NoObserver));
        p.update(keys(0..3), Instant::now()).unwrap();
        health(&p, 2, 0.0, false);
        tokio::time::advance(Duration::from_secs(10)).await;
        let w = p.snapshot(Instant::now())[2].weight;
        for _ in 0..20 {
            p.update(keys(0..2), Instant::now()).unwrap();
            let u = p.update(keys(0..3), Instant::now()).unwrap();
            assert_eq!(u.rejoined, vec![2]);
            assert!(u.added.is_empty());
        }
        let snap = p.snapshot(Instant::now());
        assert_eq!(snap.len(), 3, "no new slot per flap");
        assert_eq!(snap[2].member, MemberState::Warming);
        assert!((snap[2].weight - w).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn bad_lists_change_nothing_and_full_tables_reuse_idle_removed_slots() {
        let p = pool(2, Arc::new(NoObserver));
        assert_eq!(p.update(Vec::new(), Instant::now()), Err(PoolSizeError(0)));
        assert_eq!(p.len(), 2);
        // Fill the table: 128 keys, then move to 128 others. Only idle removed slots are
        // reused; one holding a relay is kept.
        p.update(keys(0..128), Instant::now()).unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let held = p
            .select(Tried::default(), Instant::now(), &mut rng)
            .unwrap();
        let held_slot = held.index();
        let relay = held.succeed();
        assert_eq!(
            p.update(keys(128..256), Instant::now()),
            Err(PoolSizeError(129))
        );
        assert_eq!(p.len(), 128, "a refused update changes nothing");
        let u = p.update(keys(128..255), Instant::now()).unwrap();
        assert_eq!(u.added.len(), 127);
        assert!(!u.added.contains(&held_slot));
        let snap = p.snapshot(Instant::now());
        assert_eq!(snap[held_slot].member, MemberState::Removed);
        assert_eq!(snap[held_slot].relays, 1);
        drop(relay);
    }

    #[tokio::test(start_paused = true)]
    async fn live_relay_counts_spread_clients_between_polls() {
        // Polled a second ago: shard 0 at 10 %, the others at 20 %, 100 slots each. On
        // stale scores shard 0 wins every pair it is in, two thirds of the clients until
        // the next poll; with this LB's own relays counted it only gets the 10 it was short.
        let p = pool(3, Arc::new(NoObserver));
        health(&p, 0, 0.1, false);
        health(&p, 1, 0.2, false);
        health(&p, 2, 0.2, false);
        let mut rng = StdRng::seed_from_u64(4);
        let mut counts = [0usize; 3];
        let mut relays = Vec::new();
        for _ in 0..150 {
            let lease = p
                .select(Tried::default(), Instant::now(), &mut rng)
                .unwrap();
            counts[lease.index()] += 1;
            relays.push(lease.succeed());
        }
        for (i, c) in counts.iter().enumerate() {
            let want = if i == 0 { 56.7 } else { 46.7 };
            assert!((*c as f64 - want).abs() <= 6.0, "{counts:?}");
        }
        let snap = p.snapshot(Instant::now());
        assert_eq!(snap.iter().map(|s| s.relays).sum::<usize>(), 150);
        // The next poll sees them in the shard's own count: nothing is counted twice.
        for s in &snap {
            health(&p, s.shard_id, s.utilization, false);
        }
        let again = p.snapshot(Instant::now());
        for (a, b) in snap.iter().zip(&again) {
            assert!((a.utilization - b.utilization).abs() < 1e-9);
        }
        drop(relays);
        let done = p.snapshot(Instant::now());
        assert!(done.iter().all(|s| s.relays == 0));
        assert!(
            done[0].utilization < snap[0].utilization,
            "ended relays count too"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_and_dropped_leases_give_their_count_back() {
        let p = pool(1, Arc::new(NoObserver));
        let mut rng = StdRng::seed_from_u64(1);
        let a = p
            .select(Tried::default(), Instant::now(), &mut rng)
            .unwrap();
        let b = p
            .select(Tried::default(), Instant::now(), &mut rng)
            .unwrap();
        assert_eq!(p.snapshot(Instant::now())[0].relays, 2, "in-flight counts");
        a.fail(&AttemptError::HttpStatus(503));
        drop(b);
        assert_eq!(p.snapshot(Instant::now())[0].relays, 0);
    }
}
