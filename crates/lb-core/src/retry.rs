//! Bookkeeping for one client's handshake: which shards were tried, what failed, how much of
//! the deadline is left. Each shard is tried at most once per client.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::RetryConfig;
use crate::error::{AttemptError, FinalClose};

/// Largest number of shards a pool may hold (the tried-set is a bit mask).
pub const MAX_SHARDS: usize = 128;

/// Set of shard indexes already tried by one client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tried(u128);

impl Tried {
    /// Whether `index` was tried.
    pub fn contains(&self, index: usize) -> bool {
        index < MAX_SHARDS && self.0 & (1u128 << index) != 0
    }

    /// Marks `index` as tried.
    pub fn insert(&mut self, index: usize) {
        if index < MAX_SHARDS {
            self.0 |= 1u128 << index;
        }
    }

    /// Number of shards tried.
    pub fn len(&self) -> usize {
        self.0.count_ones() as usize
    }

    /// Whether nothing was tried.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

/// Progress of one client's handshake across shards.
#[derive(Debug)]
pub struct Attempts {
    cfg: RetryConfig,
    deadline: Instant,
    tried: Tried,
    errors: Vec<AttemptError>,
}

impl Attempts {
    /// Starts the clock for one client.
    pub fn start(cfg: RetryConfig, now: Instant) -> Self {
        Self {
            cfg,
            deadline: now + cfg.deadline,
            tried: Tried::default(),
            errors: Vec::new(),
        }
    }

    /// Shards tried so far.
    pub fn tried(&self) -> Tried {
        self.tried
    }

    /// Attempts made so far.
    pub fn count(&self) -> usize {
        self.tried.len()
    }

    /// Marks `index` as being tried now and returns the budget for this attempt, or `None`
    /// if the overall deadline has passed.
    pub fn begin(&mut self, index: usize, now: Instant) -> Option<Duration> {
        let left = self
            .deadline
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())?;
        self.tried.insert(index);
        Some(left.min(self.cfg.attempt_timeout))
    }

    /// Records the failure of the attempt in progress.
    pub fn fail(&mut self, error: AttemptError) {
        self.errors.push(error);
    }

    /// When the next attempt may start (after the configured delay), or `None` if that is
    /// past the deadline.
    pub fn next_start(&self, now: Instant) -> Option<Instant> {
        let at = now + self.cfg.delay;
        (at < self.deadline).then_some(at)
    }

    /// Whether the overall deadline has passed.
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }

    /// The errors collected so far.
    pub fn errors(&self) -> &[AttemptError] {
        &self.errors
    }

    /// The close to send when no more attempts will be made.
    pub fn final_close(&self, now: Instant) -> FinalClose {
        FinalClose::decide(&self.errors, self.expired(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{OVERLOADED, UNAVAILABLE};

    #[tokio::test(start_paused = true)]
    async fn budgets_shrink_to_the_deadline() {
        let cfg = RetryConfig::try_new(
            Duration::from_millis(10),
            Duration::from_secs(3),
            Duration::from_secs(2),
        )
        .unwrap();
        let t0 = Instant::now();
        let mut a = Attempts::start(cfg, t0);
        assert_eq!(a.begin(0, t0), Some(Duration::from_secs(2)));
        a.fail(AttemptError::ConnectRefused("x".into()));
        let t1 = t0 + Duration::from_millis(2500);
        assert_eq!(a.begin(1, t1), Some(Duration::from_millis(500)));
        assert!(a.tried().contains(0) && a.tried().contains(1) && !a.tried().contains(2));
        assert_eq!(a.next_start(t0 + Duration::from_millis(2995)), None);
        assert_eq!(a.begin(2, t0 + Duration::from_secs(3)), None);
        assert_eq!(a.final_close(t1), UNAVAILABLE);
        a.fail(AttemptError::HttpStatus(503));
        assert_eq!(a.final_close(t1), OVERLOADED);
    }

    #[test]
    fn tried_set_bounds() {
        let mut t = Tried::default();
        t.insert(127);
        t.insert(500);
        assert!(t.contains(127) && !t.contains(500));
        assert_eq!(t.len(), 1);
    }
}
