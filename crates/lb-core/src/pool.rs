//! The set of shards one LB dials, with each shard's breaker, failure window and last health
//! report, safe to share between all connection tasks.
//!
//! Every method takes a short `parking_lot` lock per shard and never holds it across an
//! `.await`. A granted call is a [`Lease`]: it must be resolved with [`Lease::succeed`] or
//! [`Lease::fail`]; dropping it unresolved (the client vanished mid-handshake) releases a
//! half-open trial slot without counting an outcome.

use std::sync::Arc;

use parking_lot::Mutex;
use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;

use crate::breaker::{BreakerState, CircuitBreaker, Ticket, Transition};
use crate::config::{BreakerConfig, ScoreConfig};
use crate::error::AttemptError;
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
struct ShardState {
    breaker: CircuitBreaker,
    window: FailureWindow,
    utilization: f64,
    draining: bool,
    health_ok: bool,
}

/// A point-in-time view of one shard, for `/health` and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct ShardSnapshot {
    pub shard_id: usize,
    pub breaker: BreakerState,
    pub score: f64,
    pub utilization: f64,
    pub recent_failures: usize,
    pub failure_rate: f64,
    pub draining: bool,
    /// Whether the last `/health` poll succeeded.
    pub health_ok: bool,
    /// Whether a new client could be sent there now.
    pub admits: bool,
}

/// All shards of one LB.
#[derive(Debug)]
pub struct ShardPool {
    shards: Vec<Mutex<ShardState>>,
    observer: Arc<dyn PoolObserver>,
}

/// Too many shards for one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a pool holds 1 to {MAX_SHARDS} shards, got {0}")]
pub struct PoolSizeError(pub usize);

/// A granted call on one shard.
#[derive(Debug)]
pub struct Lease<'a> {
    pool: &'a ShardPool,
    index: usize,
    ticket: Option<Ticket>,
}

impl ShardPool {
    /// A pool of `n` shards, all closed, with unknown utilization (treated as 0).
    pub fn new(
        n: usize,
        breaker: BreakerConfig,
        score: ScoreConfig,
        observer: Arc<dyn PoolObserver>,
    ) -> Result<Self, PoolSizeError> {
        if n == 0 || n > MAX_SHARDS {
            return Err(PoolSizeError(n));
        }
        let shards = (0..n)
            .map(|_| {
                Mutex::new(ShardState {
                    breaker: CircuitBreaker::new(breaker),
                    window: FailureWindow::new(score),
                    utilization: 0.0,
                    draining: false,
                    health_ok: true,
                })
            })
            .collect();
        Ok(Self { shards, observer })
    }

    /// Number of shards.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Always false: a pool has at least one shard.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Stores the result of a `/health` poll.
    pub fn set_health(&self, index: usize, utilization: f64, draining: bool) {
        if let Some(s) = self.shards.get(index) {
            let mut s = s.lock();
            s.utilization = if utilization.is_nan() {
                1.0
            } else {
                utilization.clamp(0.0, 1.0)
            };
            s.draining = draining;
            s.health_ok = true;
        }
    }

    /// Records that a `/health` poll failed. The breaker is left to handshake outcomes; the
    /// shard stays selectable so that a broken health endpoint alone never empties the pool.
    pub fn set_health_unreachable(&self, index: usize) {
        if let Some(s) = self.shards.get(index) {
            s.lock().health_ok = false;
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
        let transition = self.shards.get(index).and_then(|s| {
            let mut s = s.lock();
            s.health_ok = false;
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

    /// Chooses a shard not yet in `tried` and takes a call permit on it.
    pub fn select<R: Rng + ?Sized>(
        &self,
        tried: Tried,
        now: Instant,
        rng: &mut R,
    ) -> Option<Lease<'_>> {
        let mut excluded = tried;
        loop {
            let candidates: Vec<Candidate> = self
                .shards
                .iter()
                .enumerate()
                .filter(|(i, _)| !excluded.contains(*i))
                .filter_map(|(index, s)| {
                    let mut s = s.lock();
                    if s.draining {
                        return None;
                    }
                    let admission = match (s.breaker.state(), s.breaker.would_admit(now)) {
                        (_, false) => Admission::Refused,
                        (BreakerState::Closed, true) => Admission::Closed,
                        (_, true) => Admission::Trial,
                    };
                    let rate = s.window.failure_rate(now);
                    let score = health_score(s.utilization, rate);
                    Some(Candidate {
                        index,
                        admission,
                        score,
                        last_failure: s.breaker.last_failure(),
                    })
                })
                .collect();
            let index = pick(&candidates, rng)?;
            let acquired = self
                .shards
                .get(index)
                .map(|s| s.lock().breaker.acquire(now));
            match acquired {
                Some(Ok((ticket, transition))) => {
                    if let Some(t) = transition {
                        self.observer.transition(index, t);
                    }
                    return Some(Lease {
                        pool: self,
                        index,
                        ticket: Some(ticket),
                    });
                }
                // Another task took the last trial slot between snapshot and acquire.
                _ => excluded.insert(index),
            }
        }
    }

    /// Whether any shard would take a new client now (for the LB's own `/health`).
    pub fn any_admits(&self, now: Instant) -> bool {
        self.shards.iter().any(|s| {
            let s = s.lock();
            !s.draining && s.breaker.would_admit(now)
        })
    }

    /// A snapshot of every shard.
    pub fn snapshot(&self, now: Instant) -> Vec<ShardSnapshot> {
        self.shards
            .iter()
            .enumerate()
            .map(|(shard_id, s)| {
                let mut s = s.lock();
                let failure_rate = s.window.failure_rate(now);
                ShardSnapshot {
                    shard_id,
                    breaker: s.breaker.state(),
                    score: health_score(s.utilization, failure_rate),
                    utilization: s.utilization,
                    recent_failures: s.window.failures(now),
                    failure_rate,
                    draining: s.draining,
                    health_ok: s.health_ok,
                    admits: !s.draining && s.breaker.would_admit(now),
                }
            })
            .collect()
    }

    fn resolve(&self, index: usize, ticket: Ticket, outcome: Option<&AttemptError>, now: Instant) {
        let Some(shard) = self.shards.get(index) else {
            return;
        };
        let transition = {
            let mut s = shard.lock();
            match outcome {
                None => {
                    s.window.record(now, false);
                    s.breaker.on_success(ticket)
                }
                Some(e) if e.counts_against_shard() => {
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

impl Lease<'_> {
    /// The chosen shard.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Whether this call is a half-open trial.
    pub fn is_trial(&self) -> bool {
        matches!(self.ticket, Some(Ticket::Trial { .. }))
    }

    /// The handshake with the shard succeeded.
    pub fn succeed(mut self) {
        if let Some(t) = self.ticket.take() {
            self.pool.resolve(self.index, t, None, Instant::now());
        }
    }

    /// The handshake with the shard failed with `error`.
    pub fn fail(mut self, error: &AttemptError) {
        if let Some(t) = self.ticket.take() {
            self.pool
                .resolve(self.index, t, Some(error), Instant::now());
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            if let Some(s) = self.pool.shards.get(self.index) {
                s.lock().breaker.on_cancel(t);
            }
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

    fn pool(n: usize, obs: Arc<dyn PoolObserver>) -> ShardPool {
        let b = BreakerConfig::try_new(3, Duration::from_secs(30), 2, 2).unwrap();
        ShardPool::new(n, b, ScoreConfig::default(), obs).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn steers_new_clients_to_lightly_loaded_shards() {
        let p = pool(3, Arc::new(NoObserver));
        p.set_health(0, 0.9, false);
        p.set_health(1, 0.1, false);
        p.set_health(2, 0.1, false);
        let mut rng = StdRng::seed_from_u64(42);
        let mut counts = [0usize; 3];
        for _ in 0..3_000 {
            let lease = p
                .select(Tried::default(), Instant::now(), &mut rng)
                .unwrap();
            counts[lease.index()] += 1;
            lease.succeed();
        }
        assert_eq!(counts[0], 0, "{counts:?}");
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
            lease.succeed();
        }
        assert!(
            p.select(tried, Instant::now(), &mut rng).is_none(),
            "only the open shard left: nothing admitted"
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
            l.succeed();
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
        lease.succeed();
        p.probe_unreachable(0, Instant::now());
        p.probe_unreachable(0, Instant::now());
        assert_eq!(p.snapshot(Instant::now())[0].breaker, BreakerState::Closed);
        p.probe_unreachable(0, Instant::now());
        let snap = p.snapshot(Instant::now());
        assert_eq!(snap[0].breaker, BreakerState::Open);
        assert!(!snap[0].admits && !snap[0].health_ok);
        assert_eq!(snap[1].breaker, BreakerState::Closed);
        // Open: probes change nothing; after the timeout the next client is the trial.
        tokio::time::advance(Duration::from_secs(30)).await;
        p.probe_unreachable(0, Instant::now());
        assert!(p.snapshot(Instant::now())[0].admits);
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
        p.set_health(0, 0.0, true);
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..50 {
            assert_eq!(
                p.select(Tried::default(), Instant::now(), &mut rng)
                    .unwrap()
                    .index(),
                1
            );
        }
        p.set_health(1, 0.5, true);
        assert!(!p.any_admits(Instant::now()));
        assert!(p
            .select(Tried::default(), Instant::now(), &mut rng)
            .is_none());
    }

    #[test]
    fn size_bounds() {
        assert!(ShardPool::new(
            0,
            BreakerConfig::default(),
            ScoreConfig::default(),
            Arc::new(NoObserver)
        )
        .is_err());
        assert!(ShardPool::new(
            129,
            BreakerConfig::default(),
            ScoreConfig::default(),
            Arc::new(NoObserver)
        )
        .is_err());
    }
}
