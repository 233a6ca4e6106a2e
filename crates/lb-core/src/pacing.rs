//! Global admission pacing for new connections: a FIFO queue drained at a fixed rate.
//!
//! The Go predecessor found that queueing arrivals (instead of refusing them) *raised* the
//! share of connections that survived a ramp. This is GCRA (the algorithm `governor` uses)
//! with reservations: each arrival is given the earliest admission instant that keeps the
//! rate, in arrival order, and sleeps until then. Reservations make the queue strictly FIFO
//! and cost O(1) with no wake-ups beyond the sleeper's own timer; governor's `until_ready`
//! instead re-polls waiters with jitter and admits them in no particular order. A client is
//! refused (and told 1013) when its wait would exceed `max_wait` or `max_queue` are already
//! waiting, so the queue is bounded in time and memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::PacingConfig;

/// Why a client was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacingRejection {
    #[error("admission queue is full")]
    QueueFull,
    #[error("admission wait would exceed the limit")]
    WaitTooLong,
}

/// The admission pacer, shared by all connections of one LB process.
#[derive(Debug)]
pub struct Pacer {
    cfg: PacingConfig,
    interval: Duration,
    tolerance: Duration,
    tat: Mutex<Option<Instant>>,
    waiting: Arc<AtomicUsize>,
}

/// A granted admission slot; wait on it with [`Reservation::wait`].
#[derive(Debug)]
pub struct Reservation {
    at: Instant,
    queued: Option<QueueSlot>,
}

#[derive(Debug)]
struct QueueSlot(Arc<AtomicUsize>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Reservation {
    /// When the client is admitted.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// Sleeps until the admission instant; leaves the queue when done or dropped.
    pub async fn wait(self) {
        if self.queued.is_some() {
            tokio::time::sleep_until(self.at).await;
        }
    }
}

impl Pacer {
    /// A pacer with `cfg` (rate 0 admits everyone at once).
    pub fn new(cfg: PacingConfig) -> Self {
        let interval = if cfg.rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1) / cfg.rate
        };
        let tolerance = interval * cfg.burst.saturating_sub(1);
        Self {
            cfg,
            interval,
            tolerance,
            tat: Mutex::new(None),
            waiting: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Clients currently waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The configuration.
    pub fn config(&self) -> PacingConfig {
        self.cfg
    }

    /// Reserves the next admission slot for a client arriving at `now`.
    pub fn reserve(&self, now: Instant) -> Result<Reservation, PacingRejection> {
        if self.cfg.rate == 0 {
            return Ok(Reservation {
                at: now,
                queued: None,
            });
        }
        let mut tat = self.tat.lock();
        let current = tat.map_or(now, |t| t.max(now));
        let at = now.max(current.checked_sub(self.tolerance).unwrap_or(now));
        let wait = at.saturating_duration_since(now);
        if wait > self.cfg.max_wait {
            return Err(PacingRejection::WaitTooLong);
        }
        let queued = if wait.is_zero() {
            None
        } else {
            if self.waiting.load(Ordering::Relaxed) >= self.cfg.max_queue {
                return Err(PacingRejection::QueueFull);
            }
            self.waiting.fetch_add(1, Ordering::Relaxed);
            Some(QueueSlot(self.waiting.clone()))
        };
        *tat = Some(current.max(at) + self.interval);
        Ok(Reservation { at, queued })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer(rate: u32, burst: u32, max_wait_ms: u64, max_queue: usize) -> Pacer {
        Pacer::new(
            PacingConfig::try_new(rate, burst, Duration::from_millis(max_wait_ms), max_queue)
                .unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_paced_in_arrival_order() {
        let p = pacer(500, 100, 3_000, 10_000);
        let now = Instant::now();
        let mut held = Vec::new();
        let mut rejected = 0;
        for _ in 0..2_000 {
            match p.reserve(now) {
                Ok(r) => held.push(r),
                Err(PacingRejection::WaitTooLong) => rejected += 1,
                Err(e) => panic!("{e}"),
            }
        }
        let ats: Vec<Instant> = held.iter().map(Reservation::at).collect();
        // 100 at once, then one per 2 ms for 3 s.
        assert_eq!(ats.iter().filter(|a| **a == now).count(), 100);
        assert_eq!(ats.len(), 100 + 1_500);
        assert_eq!(rejected, 400);
        assert!(
            ats.windows(2).all(|w| w[0] <= w[1]),
            "FIFO: admission instants never go back"
        );
        assert_eq!(ats[100] - now, Duration::from_millis(2));
        assert_eq!(*ats.last().unwrap() - now, Duration::from_millis(3_000));
        assert_eq!(p.queue_len(), 1_500);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_bound_and_slots_released_on_drop() {
        let p = pacer(10, 1, 10_000, 3);
        let now = Instant::now();
        let first = p.reserve(now).unwrap();
        assert_eq!(first.at(), now);
        let queued: Vec<_> = (0..3).map(|_| p.reserve(now).unwrap()).collect();
        assert_eq!(p.queue_len(), 3);
        assert_eq!(p.reserve(now).unwrap_err(), PacingRejection::QueueFull);
        drop(queued);
        assert_eq!(p.queue_len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn sustained_rate_is_kept_over_time() {
        let p = pacer(100, 1, 1_000, 1_000);
        let start = Instant::now();
        let mut admitted = 0;
        // Arrivals at 200/s for 2 s against a 100/s pacer: about half wait, none is lost
        // before the wait limit.
        for i in 0..400u64 {
            let now = start + Duration::from_millis(i * 5);
            tokio::time::advance(now.saturating_duration_since(Instant::now())).await;
            if p.reserve(now).is_ok() {
                admitted += 1;
            }
        }
        // 2 s of arrivals at 100/s plus 1 s of queue.
        assert!((290..=301).contains(&admitted), "{admitted}");
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_pacer_admits_everyone_now() {
        let p = pacer(0, 0, 0, 0);
        let now = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(p.reserve(now).unwrap().at(), now);
        }
        assert_eq!(p.queue_len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_sleeps_until_the_slot() {
        let p = pacer(10, 1, 10_000, 10);
        let t0 = Instant::now();
        p.reserve(t0).unwrap().wait().await;
        let r = p.reserve(Instant::now()).unwrap();
        r.wait().await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(100));
        assert_eq!(p.queue_len(), 0);
    }
}
