//! The per-shard circuit breaker: Closed → Open → Half-open → Closed.
//!
//! Closed admits every call and counts consecutive failures; `failure_threshold` of them open
//! the breaker. Open refuses calls until `open_timeout` has passed; the next call then moves
//! it to Half-open. Half-open admits at most `half_open_max_calls` trial calls at a time;
//! `success_threshold` successful trials close it, any failed trial re-opens it.
//!
//! Outcomes of calls admitted in an earlier state (a slow call admitted while Closed that
//! finishes after the breaker opened, or a trial from a previous Half-open period) are
//! ignored: each Half-open period has a generation number, and a permit remembers the
//! generation it was issued in. Without that, a late result could close a breaker that the
//! current trials have not vindicated, or free a trial slot twice.

use serde::Serialize;
use tokio::time::Instant;

use crate::config::BreakerConfig;

/// The three breaker states, as exported in metrics and `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// Label value used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// All states, for exporting one gauge per state.
    pub const ALL: [BreakerState; 3] = [Self::Closed, Self::Open, Self::HalfOpen];
}

/// A state change, reported so the caller can export it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

/// What a granted call is: a normal call, or a trial of the given Half-open generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ticket {
    Normal,
    Trial { generation: u64 },
}

/// The call was refused: the breaker is open, or half-open with every trial slot taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAdmitted;

/// The state machine. Not thread-safe by itself; [`crate::pool::ShardPool`] wraps it.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    cfg: BreakerConfig,
    state: State,
    generation: u64,
    last_failure: Option<Instant>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: State::Closed { failures: 0 },
            generation: 0,
            last_failure: None,
        }
    }

    /// The current state (an open breaker whose timeout passed still reads Open until a call
    /// arrives; see [`Self::would_admit`]).
    pub fn state(&self) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// When the last failure was recorded.
    pub fn last_failure(&self) -> Option<Instant> {
        self.last_failure
    }

    /// Trial calls currently in flight (0 unless half-open).
    pub fn trials_in_flight(&self) -> u32 {
        match self.state {
            State::HalfOpen { in_flight, .. } => in_flight,
            _ => 0,
        }
    }

    /// Whether [`Self::acquire`] would grant a call now, without changing anything.
    pub fn would_admit(&self, now: Instant) -> bool {
        match self.state {
            State::Closed { .. } => true,
            State::Open { until } => now >= until,
            State::HalfOpen { in_flight, .. } => in_flight < self.cfg.half_open_max_calls,
        }
    }

    /// Asks to make a call now.
    pub fn acquire(&mut self, now: Instant) -> Result<(Ticket, Option<Transition>), NotAdmitted> {
        match self.state {
            State::Closed { .. } => Ok((Ticket::Normal, None)),
            State::Open { until } if now >= until => {
                self.generation += 1;
                self.state = State::HalfOpen {
                    in_flight: 1,
                    successes: 0,
                };
                let t = Transition {
                    from: BreakerState::Open,
                    to: BreakerState::HalfOpen,
                };
                Ok((
                    Ticket::Trial {
                        generation: self.generation,
                    },
                    Some(t),
                ))
            }
            State::Open { .. } => Err(NotAdmitted),
            State::HalfOpen {
                in_flight,
                successes,
            } if in_flight < self.cfg.half_open_max_calls => {
                self.state = State::HalfOpen {
                    in_flight: in_flight + 1,
                    successes,
                };
                Ok((
                    Ticket::Trial {
                        generation: self.generation,
                    },
                    None,
                ))
            }
            State::HalfOpen { .. } => Err(NotAdmitted),
        }
    }

    fn is_current_trial(&self, ticket: Ticket) -> bool {
        matches!((ticket, self.state), (Ticket::Trial { generation }, State::HalfOpen { .. }) if generation == self.generation)
    }

    /// Records a successful call.
    pub fn on_success(&mut self, ticket: Ticket) -> Option<Transition> {
        match (ticket, self.state) {
            (Ticket::Normal, State::Closed { .. }) => {
                self.state = State::Closed { failures: 0 };
                None
            }
            (
                Ticket::Trial { .. },
                State::HalfOpen {
                    in_flight,
                    successes,
                },
            ) if self.is_current_trial(ticket) => {
                let successes = successes + 1;
                if successes >= self.cfg.success_threshold {
                    self.state = State::Closed { failures: 0 };
                    Some(Transition {
                        from: BreakerState::HalfOpen,
                        to: BreakerState::Closed,
                    })
                } else {
                    self.state = State::HalfOpen {
                        in_flight: in_flight.saturating_sub(1),
                        successes,
                    };
                    None
                }
            }
            _ => None,
        }
    }

    /// Records a failed call at `now`.
    pub fn on_failure(&mut self, ticket: Ticket, now: Instant) -> Option<Transition> {
        self.last_failure = Some(now);
        match (ticket, self.state) {
            (Ticket::Normal, State::Closed { failures }) => {
                let failures = failures + 1;
                if failures >= self.cfg.failure_threshold {
                    self.state = State::Open {
                        until: now + self.cfg.open_timeout,
                    };
                    Some(Transition {
                        from: BreakerState::Closed,
                        to: BreakerState::Open,
                    })
                } else {
                    self.state = State::Closed { failures };
                    None
                }
            }
            (Ticket::Trial { .. }, State::HalfOpen { .. }) if self.is_current_trial(ticket) => {
                self.state = State::Open {
                    until: now + self.cfg.open_timeout,
                };
                Some(Transition {
                    from: BreakerState::HalfOpen,
                    to: BreakerState::Open,
                })
            }
            _ => None,
        }
    }

    /// Releases a granted call that ended without an outcome (the client went away first).
    pub fn on_cancel(&mut self, ticket: Ticket) {
        if let State::HalfOpen {
            in_flight,
            successes,
        } = self.state
        {
            if self.is_current_trial(ticket) {
                self.state = State::HalfOpen {
                    in_flight: in_flight.saturating_sub(1),
                    successes,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn cfg() -> BreakerConfig {
        BreakerConfig::try_new(3, Duration::from_secs(30), 2, 2).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn closed_opens_after_consecutive_failures_only() {
        let mut b = CircuitBreaker::new(cfg());
        let now = Instant::now();
        for _ in 0..2 {
            let (t, _) = b.acquire(now).unwrap();
            assert_eq!(b.on_failure(t, now), None);
        }
        // A success resets the count: failures must be consecutive.
        let (t, _) = b.acquire(now).unwrap();
        b.on_success(t);
        for _ in 0..2 {
            let (t, _) = b.acquire(now).unwrap();
            assert_eq!(b.on_failure(t, now), None);
        }
        let (t, _) = b.acquire(now).unwrap();
        assert_eq!(
            b.on_failure(t, now),
            Some(Transition {
                from: BreakerState::Closed,
                to: BreakerState::Open
            })
        );
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.acquire(now), Err(NotAdmitted));
    }

    #[tokio::test(start_paused = true)]
    async fn open_goes_half_open_after_the_timeout() {
        let mut b = CircuitBreaker::new(cfg());
        let start = Instant::now();
        for _ in 0..3 {
            let (t, _) = b.acquire(start).unwrap();
            b.on_failure(t, start);
        }
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!b.would_admit(Instant::now()));
        assert_eq!(b.acquire(Instant::now()), Err(NotAdmitted));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.would_admit(Instant::now()));
        let (ticket, t) = b.acquire(Instant::now()).unwrap();
        assert!(matches!(ticket, Ticket::Trial { .. }));
        assert_eq!(
            t,
            Some(Transition {
                from: BreakerState::Open,
                to: BreakerState::HalfOpen
            })
        );
    }

    /// resilience4j's shouldOnlyPermitFourCallsInHalfOpenState, with our cap of 2.
    #[tokio::test(start_paused = true)]
    async fn half_open_caps_concurrent_trials() {
        let cfg = BreakerConfig::try_new(1, Duration::from_secs(5), 4, 10).unwrap();
        let mut b = CircuitBreaker::new(cfg);
        let now = Instant::now();
        let (t, _) = b.acquire(now).unwrap();
        b.on_failure(t, now);
        let later = now + Duration::from_secs(5);
        let granted: Vec<_> = (0..10).filter_map(|_| b.acquire(later).ok()).collect();
        assert_eq!(granted.len(), 4);
        assert_eq!(b.trials_in_flight(), 4);
        // One trial finishing frees exactly one slot.
        b.on_success(granted[0].0);
        assert!(b.acquire(later).is_ok());
        assert_eq!(b.acquire(later), Err(NotAdmitted));
        // A cancelled trial frees its slot too.
        b.on_cancel(granted[1].0);
        assert!(b.acquire(later).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_closes_on_enough_successes_and_reopens_on_any_failure() {
        let mut b = CircuitBreaker::new(cfg());
        let now = Instant::now();
        for _ in 0..3 {
            let (t, _) = b.acquire(now).unwrap();
            b.on_failure(t, now);
        }
        let t1 = now + Duration::from_secs(30);
        let (a, _) = b.acquire(t1).unwrap();
        let (c, _) = b.acquire(t1).unwrap();
        assert_eq!(b.on_success(a), None);
        assert_eq!(
            b.on_success(c),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed
            })
        );
        assert_eq!(b.state(), BreakerState::Closed);

        for _ in 0..3 {
            let (t, _) = b.acquire(t1).unwrap();
            b.on_failure(t, t1);
        }
        let t2 = t1 + Duration::from_secs(30);
        let (a, _) = b.acquire(t2).unwrap();
        let (c, _) = b.acquire(t2).unwrap();
        assert_eq!(b.on_success(a), None);
        assert_eq!(
            b.on_failure(c, t2),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Open
            })
        );
        assert_eq!(b.acquire(t2), Err(NotAdmitted));
    }

    #[tokio::test(start_paused = true)]
    async fn stale_outcomes_are_ignored() {
        let mut b = CircuitBreaker::new(cfg());
        let now = Instant::now();
        let (slow, _) = b.acquire(now).unwrap();
        for _ in 0..3 {
            let (t, _) = b.acquire(now).unwrap();
            b.on_failure(t, now);
        }
        // The slow call admitted while closed succeeds after the breaker opened.
        assert_eq!(b.on_success(slow), None);
        assert_eq!(b.state(), BreakerState::Open);
        // A trial from a previous half-open period cannot touch the next one.
        let t1 = now + Duration::from_secs(30);
        let (old_trial, _) = b.acquire(t1).unwrap();
        let (failing, _) = b.acquire(t1).unwrap();
        b.on_failure(failing, t1);
        let t2 = t1 + Duration::from_secs(30);
        let (new_trial, _) = b.acquire(t2).unwrap();
        assert_eq!(b.on_success(old_trial), None);
        b.on_cancel(old_trial);
        assert_eq!(b.trials_in_flight(), 1);
        assert_eq!(b.on_success(new_trial), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire,
        Succeed(usize),
        Fail(usize),
        Cancel(usize),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Acquire),
            2 => (0usize..8).prop_map(Op::Succeed),
            2 => (0usize..8).prop_map(Op::Fail),
            1 => (0usize..8).prop_map(Op::Cancel),
            1 => (0u64..20).prop_map(Op::Advance),
        ]
    }

    /// A deliberately simple reference model, in whole seconds.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Model {
        Closed(u32),
        Open(u64),
        Half { gen: u64, inflight: u32, ok: u32 },
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn matches_the_reference_model(ops in proptest::collection::vec(op(), 1..200)) {
            let (threshold, timeout, cap, needed) = (3u32, 10u64, 2u32, 2u32);
            let cfg = BreakerConfig::try_new(threshold, Duration::from_secs(timeout), cap, needed).unwrap();
            let base = Instant::now();
            let mut secs = 0u64;
            let mut b = CircuitBreaker::new(cfg);
            let mut model = Model::Closed(0);
            let mut gen = 0u64;
            // Outstanding permits: (ticket, model generation or None for normal).
            let mut held: Vec<(Ticket, Option<u64>)> = Vec::new();
            for op in ops {
                let now = base + Duration::from_secs(secs);
                match op {
                    Op::Advance(s) => secs += s,
                    Op::Acquire => {
                        let expected = match model {
                            Model::Closed(_) => Some(None),
                            Model::Open(until) if secs >= until => {
                                gen += 1;
                                model = Model::Half { gen, inflight: 1, ok: 0 };
                                Some(Some(gen))
                            }
                            Model::Open(_) => None,
                            Model::Half { gen: g, inflight, ok } if inflight < cap => {
                                model = Model::Half { gen: g, inflight: inflight + 1, ok };
                                Some(Some(g))
                            }
                            Model::Half { .. } => None,
                        };
                        let got = b.acquire(now);
                        prop_assert_eq!(got.is_ok(), expected.is_some());
                        if let (Ok((t, _)), Some(g)) = (got, expected) {
                            held.push((t, g));
                        }
                    }
                    Op::Succeed(i) | Op::Fail(i) | Op::Cancel(i) if i < held.len() => {
                        let (ticket, g) = held.remove(i);
                        let current = matches!(model, Model::Half { gen: mg, .. } if Some(mg) == g);
                        match op {
                            Op::Succeed(_) => {
                                b.on_success(ticket);
                                model = match (g, model) {
                                    (None, Model::Closed(_)) => Model::Closed(0),
                                    (Some(_), Model::Half { gen: mg, inflight, ok }) if current => {
                                        if ok + 1 >= needed { Model::Closed(0) } else { Model::Half { gen: mg, inflight: inflight - 1, ok: ok + 1 } }
                                    }
                                    (_, m) => m,
                                };
                            }
                            Op::Fail(_) => {
                                b.on_failure(ticket, now);
                                model = match (g, model) {
                                    (None, Model::Closed(f)) => if f + 1 >= threshold { Model::Open(secs + timeout) } else { Model::Closed(f + 1) },
                                    (Some(_), Model::Half { .. }) if current => Model::Open(secs + timeout),
                                    (_, m) => m,
                                };
                            }
                            _ => {
                                b.on_cancel(ticket);
                                if let (true, Model::Half { gen: mg, inflight, ok }) = (current, model) {
                                    model = Model::Half { gen: mg, inflight: inflight - 1, ok };
                                }
                            }
                        }
                    }
                    _ => {}
                }
                let state = match model {
                    Model::Closed(_) => BreakerState::Closed,
                    Model::Open(_) => BreakerState::Open,
                    Model::Half { .. } => BreakerState::HalfOpen,
                };
                prop_assert_eq!(b.state(), state);
                if let Model::Half { inflight, .. } = model {
                    prop_assert_eq!(b.trials_in_flight(), inflight);
                    prop_assert!(inflight <= cap);
                }
            }
        }
    }
}
