//! Shared measurements of one run: atomic counters, keyed failure counts and HDR histograms.
//!
//! Every connection task writes here; the sampler reads a [`Snapshot`] once per second and
//! the report is built from the final state. Hot paths are a relaxed atomic add or one
//! short, uncontended lock: delivery latencies go to one of several histogram shards chosen
//! by connection so that fan-out bursts on two cores do not serialize on one mutex.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::outcome::{Disconnect, Failure};

/// Significant digits of every histogram (0.1 % value resolution).
const SIGFIG: u8 = 3;
/// Highest latency any histogram records, in microseconds (one hour); larger values clamp.
pub const MAX_US: u64 = 3_600_000_000;
/// Number of delivery-latency shards.
const DELIVERY_SHARDS: usize = 16;

/// A histogram of microseconds (or counts) from 1 to [`MAX_US`].
#[allow(clippy::expect_used)]
pub fn new_histogram() -> Histogram<u64> {
    // Constant bounds that satisfy hdrhistogram's rules (low >= 1, high >= 2 * low,
    // sigfig <= 5), so construction cannot fail.
    Histogram::new_with_bounds(1, MAX_US, SIGFIG).expect("constant histogram bounds are valid")
}

/// Locks a mutex, ignoring poisoning: a panicked recorder leaves counts that are still valid.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Wall-clock microseconds since the Unix epoch: the unit of the `ts_us` publish stamp.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: String) {
    *lock(map).entry(key).or_default() += 1;
}

/// The counters of a run (see the README's JSON schema for each meaning).
#[derive(Debug, Default)]
pub struct Counters {
    pub attempted: AtomicU64,
    pub established: AtomicU64,
    pub failed: AtomicU64,
    pub active: AtomicI64,
    pub disconnects: AtomicU64,
    pub reconnect_attempts: AtomicU64,
    pub reconnects: AtomicU64,
    pub recovered_false: AtomicU64,
    pub deliveries: AtomicU64,
    pub gaps: AtomicU64,
    pub gap_messages: AtomicU64,
    pub duplicates: AtomicU64,
    pub epoch_changes: AtomicU64,
    pub server_errors: AtomicU64,
    pub undecodable: AtomicU64,
    pub pings_answered: AtomicU64,
    pub tls_full: AtomicU64,
    pub tls_resumed: AtomicU64,
}

/// All measurements of one process's run.
#[derive(Debug)]
pub struct Stats {
    t0: Instant,
    pub c: Counters,
    failures: Mutex<BTreeMap<String, u64>>,
    disconnects: Mutex<BTreeMap<String, u64>>,
    reconnect_failures: Mutex<BTreeMap<String, u64>>,
    /// Whole-run handshake latency and the one for the current timeline second.
    handshake: Mutex<(Histogram<u64>, Histogram<u64>)>,
    lag: Mutex<Histogram<u64>>,
    /// Delivery latency of the current timeline second, sharded by connection: each message
    /// is recorded once, here; `take_interval_delivery_p99` folds the second into
    /// `delivery_run` once per second.
    delivery: Vec<Mutex<Histogram<u64>>>,
    /// Delivery latency of every second already taken.
    delivery_run: Mutex<Histogram<u64>>,
    messages_per_conn: Mutex<Histogram<u64>>,
    per_channel: Vec<AtomicU64>,
    /// Offsets from t0 of the first and last attempt start, in microseconds.
    first_start_us: AtomicU64,
    last_start_us: AtomicU64,
}

/// A point-in-time view for the progress line and the timeline.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    pub elapsed: Duration,
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    pub active: i64,
    pub deliveries: u64,
    /// Handshake p99 over the whole run so far, microseconds.
    pub handshake_p99_us: u64,
}

/// The histograms at the end of a run.
#[derive(Debug, Clone)]
pub struct Histograms {
    pub handshake: Histogram<u64>,
    pub delivery: Histogram<u64>,
    pub lag: Histogram<u64>,
    pub messages_per_conn: Histogram<u64>,
}

impl Histograms {
    /// Four empty histograms.
    pub fn empty() -> Self {
        Self {
            handshake: new_histogram(),
            delivery: new_histogram(),
            lag: new_histogram(),
            messages_per_conn: new_histogram(),
        }
    }

    /// Adds another run's histograms to these.
    pub fn add(&mut self, other: &Histograms) -> anyhow::Result<()> {
        let err = |e| anyhow::anyhow!("adding histograms: {e:?}");
        self.handshake.add(&other.handshake).map_err(err)?;
        self.delivery.add(&other.delivery).map_err(err)?;
        self.lag.add(&other.lag).map_err(err)?;
        self.messages_per_conn
            .add(&other.messages_per_conn)
            .map_err(err)?;
        Ok(())
    }
}

impl Stats {
    /// Empty measurements for a run whose schedule starts at `t0` and whose connections
    /// subscribe among `channels` channels.
    pub fn new(t0: Instant, channels: usize) -> Self {
        Self {
            t0,
            c: Counters::default(),
            failures: Mutex::default(),
            disconnects: Mutex::default(),
            reconnect_failures: Mutex::default(),
            handshake: Mutex::new((new_histogram(), new_histogram())),
            lag: Mutex::new(new_histogram()),
            delivery: (0..DELIVERY_SHARDS)
                .map(|_| Mutex::new(new_histogram()))
                .collect(),
            delivery_run: Mutex::new(new_histogram()),
            messages_per_conn: Mutex::new(new_histogram()),
            per_channel: (0..channels).map(|_| AtomicU64::new(0)).collect(),
            first_start_us: AtomicU64::new(u64::MAX),
            last_start_us: AtomicU64::new(0),
        }
    }

    /// An attempt due at `due` really started now: counts it and records the schedule lag.
    pub fn attempt_started(&self, due: Instant) {
        let now = Instant::now();
        self.c.attempted.fetch_add(1, Relaxed);
        let _ = lock(&self.lag).record(micros(now.saturating_duration_since(due)).max(1));
        let offset = micros(now.saturating_duration_since(self.t0));
        self.first_start_us.fetch_min(offset, Relaxed);
        self.last_start_us.fetch_max(offset, Relaxed);
    }

    /// The upgrade completed `latency` after the connect started.
    pub fn handshake_done(&self, latency: Duration) {
        let us = micros(latency).clamp(1, MAX_US);
        let mut h = lock(&self.handshake);
        let _ = h.0.record(us);
        let _ = h.1.record(us);
    }

    /// A `wss://` connection upgraded after a full TLS handshake or a resumed one.
    pub fn tls_handshake(&self, resumed: bool) {
        let counter = if resumed {
            &self.c.tls_resumed
        } else {
            &self.c.tls_full
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn established(&self) {
        self.c.established.fetch_add(1, Relaxed);
        self.c.active.fetch_add(1, Relaxed);
    }

    pub fn failed(&self, f: &Failure) {
        self.c.failed.fetch_add(1, Relaxed);
        bump(&self.failures, f.key());
    }

    /// An established connection ended without us closing it.
    pub fn disconnected(&self, d: &Disconnect) {
        self.c.active.fetch_sub(1, Relaxed);
        self.c.disconnects.fetch_add(1, Relaxed);
        bump(&self.disconnects, d.key());
    }

    /// We closed an established connection at the end of the run.
    pub fn closed_by_us(&self) {
        self.c.active.fetch_sub(1, Relaxed);
    }

    pub fn reconnected(&self) {
        self.c.reconnects.fetch_add(1, Relaxed);
        self.c.active.fetch_add(1, Relaxed);
    }

    pub fn reconnect_failed(&self, f: &Failure) {
        bump(&self.reconnect_failures, f.key());
    }

    /// A `message` arrived on channel number `channel` of connection `conn`; `latency_us`
    /// is set when its data carried a `ts_us` stamp.
    pub fn delivery(&self, conn: u64, channel: Option<usize>, latency_us: Option<u64>) {
        self.c.deliveries.fetch_add(1, Relaxed);
        if let Some(counter) = channel.and_then(|i| self.per_channel.get(i)) {
            counter.fetch_add(1, Relaxed);
        }
        if let Some(us) = latency_us {
            let shard = usize::try_from(conn).unwrap_or(0) % DELIVERY_SHARDS;
            if let Some(h) = self.delivery.get(shard) {
                let _ = lock(h).record(us.clamp(1, MAX_US));
            }
        }
    }

    /// An established connection's task ended after receiving `messages` in total.
    pub fn connection_done(&self, messages: u64) {
        let _ = lock(&self.messages_per_conn).record(messages.min(MAX_US));
    }

    /// Counters and whole-run p99 now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            elapsed: Instant::now().saturating_duration_since(self.t0),
            attempted: self.c.attempted.load(Relaxed),
            established: self.c.established.load(Relaxed),
            failed: self.c.failed.load(Relaxed),
            active: self.c.active.load(Relaxed),
            deliveries: self.c.deliveries.load(Relaxed),
            handshake_p99_us: lock(&self.handshake).0.value_at_quantile(0.99),
        }
    }

    /// The handshake p99 of the interval since the previous call (None when no handshake
    /// completed in it), resetting the interval histogram.
    pub fn take_interval_p99(&self) -> Option<u64> {
        let mut h = lock(&self.handshake);
        let p99 = (!h.1.is_empty()).then(|| h.1.value_at_quantile(0.99));
        h.1.reset();
        p99
    }

    /// The delivery p99 of the interval since the previous call (None when no timestamped
    /// message arrived in it), resetting the interval histograms.
    pub fn take_interval_delivery_p99(&self) -> Option<u64> {
        let mut second = new_histogram();
        for shard in &self.delivery {
            let mut h = lock(shard);
            let _ = second.add(&*h);
            h.reset();
        }
        let _ = lock(&self.delivery_run).add(&second);
        (!second.is_empty()).then(|| second.value_at_quantile(0.99))
    }

    /// Offsets from t0 of the first and last attempt start, if any attempt started.
    pub fn attempt_window(&self) -> Option<(Duration, Duration)> {
        let first = self.first_start_us.load(Relaxed);
        (first != u64::MAX).then(|| {
            let last = self.last_start_us.load(Relaxed);
            (Duration::from_micros(first), Duration::from_micros(last))
        })
    }

    pub fn failures(&self) -> BTreeMap<String, u64> {
        lock(&self.failures).clone()
    }

    pub fn disconnect_causes(&self) -> BTreeMap<String, u64> {
        lock(&self.disconnects).clone()
    }

    pub fn reconnect_failures(&self) -> BTreeMap<String, u64> {
        lock(&self.reconnect_failures).clone()
    }

    /// Messages received per channel, by channel number.
    pub fn per_channel(&self) -> Vec<u64> {
        self.per_channel.iter().map(|c| c.load(Relaxed)).collect()
    }

    /// Copies of the histograms, the delivery shards merged into one.
    pub fn histograms(&self) -> Histograms {
        // Every second taken so far plus the one in progress (left in place).
        let mut delivery = lock(&self.delivery_run).clone();
        for shard in &self.delivery {
            let _ = delivery.add(&*lock(shard));
        }
        Histograms {
            handshake: lock(&self.handshake).0.clone(),
            delivery,
            lag: lock(&self.lag).clone(),
            messages_per_conn: lock(&self.messages_per_conn).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn records_lag_and_interval_percentiles() {
        let t0 = Instant::now();
        let s = Stats::new(t0, 2);
        tokio::time::advance(Duration::from_millis(3)).await;
        s.attempt_started(t0);
        s.attempt_started(t0 + Duration::from_millis(3));
        assert_eq!(s.c.attempted.load(Relaxed), 2);
        let h = s.histograms();
        assert!(
            h.lag.max() >= 2_990 && h.lag.max() <= 3_010,
            "{}",
            h.lag.max()
        );
        assert_eq!(
            s.attempt_window(),
            Some((Duration::from_millis(3), Duration::from_millis(3)))
        );
        s.handshake_done(Duration::from_micros(1500));
        assert!(s
            .take_interval_p99()
            .is_some_and(|p| (1499..=1501).contains(&p)));
        assert_eq!(s.take_interval_p99(), None, "the interval resets");
        assert_eq!(
            s.histograms().handshake.len(),
            1,
            "the whole-run histogram does not"
        );
        s.delivery(7, Some(1), Some(250));
        s.delivery(8, Some(9), None);
        assert_eq!(s.per_channel(), vec![0, 1]);
        assert_eq!(s.histograms().delivery.len(), 1);
        assert_eq!(s.c.deliveries.load(Relaxed), 2);
        // Connections 7 and 9 land in different delivery shards; the interval merges them.
        s.delivery(9, Some(1), Some(4_000));
        assert!(s
            .take_interval_delivery_p99()
            .is_some_and(|p| (3_990..=4_010).contains(&p)));
        assert_eq!(s.take_interval_delivery_p99(), None, "the interval resets");
        assert_eq!(
            s.histograms().delivery.len(),
            2,
            "the whole-run one does not"
        );
        // A connection that received nothing counts as zero, not as one.
        s.connection_done(0);
        s.connection_done(7);
        let per_conn = s.histograms().messages_per_conn;
        assert_eq!((per_conn.min(), per_conn.max(), per_conn.len()), (0, 7, 2));
    }
}
