//! The ramp schedule: attempt `g` starts at `t0 + g / rate`, on absolute instants.
//!
//! Sleeping on absolute instants (never `sleep(1/rate)` in a loop) means a stall in the load
//! generator shows up as lag on the attempts it delayed and is then caught up, instead of
//! silently stretching the whole ramp and lowering the offered rate. The lag itself is
//! measured where each attempt really starts (in the connection task) and reported, so a
//! slow generator is never mistaken for a slow server.

use std::time::Duration;

use tokio::time::Instant;

/// Which share of a run this process performs: global attempts `g` with
/// `g % count == index`. A process that is not a worker is slot 0 of 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub count: u32,
}

impl Slot {
    /// The whole run in one process.
    pub const SOLO: Slot = Slot { index: 0, count: 1 };

    /// The global attempt indices this slot performs out of `total`, in schedule order.
    ///
    /// Interleaving (rather than giving each worker a contiguous block) keeps every worker
    /// busy for the whole ramp, so N workers at rate/N each add up to exactly the global
    /// schedule and their per-second timelines line up.
    pub fn indices(&self, total: u64) -> impl Iterator<Item = u64> {
        let step = usize::try_from(self.count.max(1)).unwrap_or(1);
        (u64::from(self.index)..total).step_by(step)
    }

    /// How many of `total` attempts this slot performs.
    pub fn share(&self, total: u64) -> u64 {
        let (i, n) = (u64::from(self.index), u64::from(self.count.max(1)));
        if i >= total {
            0
        } else {
            (total - i).div_ceil(n)
        }
    }

    /// Whether this process is a worker started by a parent with `--workers`.
    pub fn is_worker(&self) -> bool {
        self.count > 1
    }
}

/// The instants at which attempts are due.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    t0: Instant,
    rate: f64,
}

impl Schedule {
    /// Attempts at `rate` per second from `t0`; `rate` must be positive and finite (the
    /// config validates it).
    pub fn new(t0: Instant, rate: f64) -> Self {
        Self { t0, rate }
    }

    /// The start of the schedule; timelines count seconds from here.
    pub fn t0(&self) -> Instant {
        self.t0
    }

    /// When global attempt `g` is due. Computed from `g` each time so rounding never
    /// accumulates.
    pub fn at(&self, g: u64) -> Instant {
        self.t0 + Duration::from_secs_f64(g as f64 / self.rate)
    }

    /// How long the whole ramp of `total` attempts is scheduled to take.
    pub fn span(&self, total: u64) -> Duration {
        Duration::from_secs_f64(total.saturating_sub(1) as f64 / self.rate)
    }
}

/// Runs the ramp: for each index, waits until its instant and calls `start(g, due)`.
///
/// `start` must not block: it spawns the attempt. When the loop wakes late (the runtime was
/// busy), every attempt that is already due starts immediately and the schedule resumes on
/// its original instants.
pub async fn ramp(
    schedule: Schedule,
    indices: impl Iterator<Item = u64>,
    mut start: impl FnMut(u64, Instant),
) {
    for g in indices {
        let due = schedule.at(g);
        tokio::time::sleep_until(due).await;
        start(g, due);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_interleave_and_cover_everything() {
        let s = Slot { index: 1, count: 3 };
        assert_eq!(s.indices(10).collect::<Vec<_>>(), vec![1, 4, 7]);
        assert_eq!(s.share(10), 3);
        let total: u64 = (0..3).map(|i| Slot { index: i, count: 3 }.share(10)).sum();
        assert_eq!(total, 10);
        assert_eq!(Slot { index: 5, count: 6 }.share(3), 0);
        assert_eq!(Slot::SOLO.indices(4).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_start_on_their_absolute_instants() {
        let t0 = Instant::now();
        let schedule = Schedule::new(t0, 400.0);
        let mut seen = Vec::new();
        ramp(schedule, 0..200, |g, due| {
            seen.push((g, due, Instant::now()))
        })
        .await;
        assert_eq!(seen.len(), 200);
        for (g, due, now) in &seen {
            assert_eq!(*due, t0 + Duration::from_micros(g * 2500));
            // tokio's timer wheel has 1 ms granularity; an attempt is never early.
            assert!(
                *now >= *due && *now - *due < Duration::from_millis(1),
                "attempt {g}"
            );
        }
        assert_eq!(schedule.span(200), Duration::from_micros(199 * 2500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_start_catches_up_instead_of_drifting() {
        // The ramp loop begins 100 ms after t0, as if the generator had stalled.
        let t0 = Instant::now();
        tokio::time::advance(Duration::from_millis(100)).await;
        let schedule = Schedule::new(t0, 100.0);
        let mut starts = Vec::new();
        ramp(schedule, 0..20, |_, _| starts.push(Instant::now() - t0)).await;
        // Attempts 0..=10 were already due: they start at once, with lag.
        for s in &starts[..=10] {
            assert_eq!(*s, Duration::from_millis(100));
        }
        // Later attempts are back on their original instants, not shifted by the stall.
        for (g, s) in starts.iter().enumerate().skip(11) {
            let due = Duration::from_millis(10 * g as u64);
            assert!(
                *s >= due && *s - due < Duration::from_millis(1),
                "attempt {g} at {s:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn workers_add_up_to_the_global_schedule() {
        let t0 = Instant::now();
        let schedule = Schedule::new(t0, 1000.0);
        let mut all = Vec::new();
        for index in 0..4 {
            let slot = Slot { index, count: 4 };
            ramp(schedule, slot.indices(10), |g, due| all.push((g, due))).await;
        }
        all.sort();
        let expected: Vec<_> = (0..10).map(|g| (g, schedule.at(g))).collect();
        assert_eq!(all, expected);
    }
}
