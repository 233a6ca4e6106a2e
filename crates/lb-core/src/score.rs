//! Shard health score: `0.6 × (1 − utilization) + 0.4 × (1 − recent_failure_rate)`.
//!
//! Utilization comes from the shard's `/health`; the failure rate from a sliding window of
//! recent handshake attempts ([`FailureWindow`]), bounded both by count and by age so an
//! old burst of failures stops counting against a shard that has since recovered.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::ScoreConfig;

/// Weight of spare capacity in the score.
pub const UTILIZATION_WEIGHT: f64 = 0.6;
/// Weight of recent handshake success in the score.
pub const FAILURE_WEIGHT: f64 = 0.4;

/// The score in [0, 1] (1 = idle and never failing). Inputs are clamped to [0, 1]; a NaN
/// input counts as the worst value so a broken measurement never makes a shard look good.
pub fn health_score(utilization: f64, failure_rate: f64) -> f64 {
    let clamp = |v: f64| if v.is_nan() { 1.0 } else { v.clamp(0.0, 1.0) };
    let s = UTILIZATION_WEIGHT * (1.0 - clamp(utilization))
        + FAILURE_WEIGHT * (1.0 - clamp(failure_rate));
    s.clamp(0.0, 1.0)
}

/// Outcomes of the most recent handshake attempts on one shard.
#[derive(Debug, Clone)]
pub struct FailureWindow {
    max_age: Duration,
    cap: usize,
    entries: VecDeque<(Instant, bool)>,
}

impl FailureWindow {
    /// An empty window.
    pub fn new(cfg: ScoreConfig) -> Self {
        Self {
            max_age: cfg.window,
            cap: cfg.window_len,
            entries: VecDeque::with_capacity(cfg.window_len.min(1024)),
        }
    }

    /// Records one attempt's outcome.
    pub fn record(&mut self, now: Instant, failed: bool) {
        if self.entries.len() == self.cap {
            self.entries.pop_front();
        }
        self.entries.push_back((now, failed));
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, _)) = self.entries.front() {
            if now.saturating_duration_since(at) > self.max_age {
                self.entries.pop_front();
            } else {
                break;
            }
        }
    }

    /// Failed attempts in the window.
    pub fn failures(&mut self, now: Instant) -> usize {
        self.expire(now);
        self.entries.iter().filter(|(_, failed)| *failed).count()
    }

    /// Fraction of attempts in the window that failed (0 with no attempts).
    pub fn failure_rate(&mut self, now: Instant) -> f64 {
        self.expire(now);
        if self.entries.is_empty() {
            return 0.0;
        }
        self.failures(now) as f64 / self.entries.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formula_matches_the_documented_weights() {
        assert!((health_score(0.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((health_score(1.0, 1.0)).abs() < 1e-12);
        assert!((health_score(0.5, 0.25) - (0.6 * 0.5 + 0.4 * 0.75)).abs() < 1e-12);
        assert_eq!(health_score(f64::NAN, 0.0), 0.4);
    }

    #[tokio::test(start_paused = true)]
    async fn window_forgets_by_count_and_age() {
        let mut w = FailureWindow::new(ScoreConfig::try_new(Duration::from_secs(10), 4).unwrap());
        let t0 = Instant::now();
        for _ in 0..4 {
            w.record(t0, true);
        }
        assert_eq!(w.failure_rate(t0), 1.0);
        w.record(t0, false);
        w.record(t0, false);
        assert_eq!(w.failure_rate(t0), 0.5);
        assert_eq!(w.failures(t0 + Duration::from_secs(11)), 0);
        assert_eq!(w.failure_rate(t0 + Duration::from_secs(11)), 0.0);
    }

    proptest! {
        #[test]
        fn score_is_bounded(u in any::<f64>(), f in any::<f64>()) {
            let s = health_score(u, f);
            prop_assert!((0.0..=1.0).contains(&s));
        }

        #[test]
        fn score_is_monotone_in_each_input(
            u1 in 0.0f64..=1.0, u2 in 0.0f64..=1.0, f1 in 0.0f64..=1.0, f2 in 0.0f64..=1.0,
        ) {
            let (ulo, uhi) = if u1 <= u2 { (u1, u2) } else { (u2, u1) };
            let (flo, fhi) = if f1 <= f2 { (f1, f2) } else { (f2, f1) };
            prop_assert!(health_score(ulo, f1) >= health_score(uhi, f1));
            prop_assert!(health_score(u1, flo) >= health_score(u1, fhi));
        }

        #[test]
        fn failure_rate_is_a_fraction(outcomes in proptest::collection::vec(any::<bool>(), 0..300)) {
            let mut w = FailureWindow::new(ScoreConfig::default());
            let now = Instant::now();
            for o in &outcomes {
                w.record(now, *o);
            }
            let r = w.failure_rate(now);
            prop_assert!((0.0..=1.0).contains(&r));
        }
    }
}
