//! Message sources: where published messages come from.
//!
//! A source turns its input into [`Publication`](crate::hub::Publication)s — positioned,
//! with the frame encoded once — and hands them to the [`Hub`](crate::hub::Hub). The hub
//! does not know which source it serves: the embedded bus numbers each channel itself, the
//! Kafka source (the `kafka-source` crate) uses record offsets, and both go through
//! `Hub::publish`.

pub mod bus;
pub mod demo;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use ws_protocol::SourceHealth;

use crate::hub::Hub;

/// A source failed in a way it cannot recover from by itself.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Invalid(#[from] crate::config::ConfigError),
    #[error("source configuration: {0}")]
    Config(String),
    #[error("source failed: {0}")]
    Fatal(String),
}

/// Live state of the process's source, read by `/health` and metrics.
#[derive(Debug)]
pub struct SourceStatus {
    kind: &'static str,
    connected: AtomicBool,
    /// Whether the source has read what it set out to read at start (history warm-up).
    ready: AtomicBool,
    /// Wakes [`SourceStatus::wait_ready`] when `ready` turns true.
    became_ready: tokio::sync::Notify,
    lag: AtomicU64,
    has_lag: bool,
}

impl SourceStatus {
    /// A status for a source of `kind`; `has_lag` says whether lag is meaningful.
    pub fn new(kind: &'static str, has_lag: bool) -> Arc<Self> {
        Arc::new(Self {
            kind,
            connected: AtomicBool::new(!has_lag),
            ready: AtomicBool::new(true),
            became_ready: tokio::sync::Notify::new(),
            lag: AtomicU64::new(0),
            has_lag,
        })
    }

    /// Records whether the source currently receives messages.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Relaxed);
    }

    /// Records whether the start-up warm-up is over. A source that re-reads recent input at
    /// start to fill the history (Kafka with `back:<n>`) sets `false` first, then `true`
    /// once it has read up to where the input ended at start: until then a client resuming
    /// with `since` could be told `recovered: false` for what is about to be re-read, so the
    /// shard reports itself `starting` and load balancers place no client on it.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
        if ready {
            self.became_ready.notify_waiters();
        }
    }

    /// Waits until the warm-up is over, at most `limit`; whether it is.
    pub async fn wait_ready(&self, limit: std::time::Duration) -> bool {
        if self.ready() {
            return true;
        }
        let notified = self.became_ready.notified();
        tokio::pin!(notified);
        // Registered before the second look: a `set_ready(true)` between the two still wakes it.
        notified.as_mut().enable();
        if self.ready() {
            return true;
        }
        let _ = tokio::time::timeout(limit, notified).await;
        self.ready()
    }

    /// Whether the start-up warm-up is over (always, for a source without one).
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Records the total lag behind the input.
    pub fn set_lag(&self, lag: u64) {
        self.lag.store(lag, Ordering::Relaxed);
    }

    /// Whether the source is connected.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// The health-report view.
    pub fn health(&self) -> SourceHealth {
        SourceHealth {
            kind: self.kind.to_owned(),
            connected: self.connected(),
            lag: self.has_lag.then(|| self.lag.load(Ordering::Relaxed)),
        }
    }
}

/// A source of publications for one process.
pub trait MessageSource: Send + 'static {
    /// The status this source keeps up to date.
    fn status(&self) -> Arc<SourceStatus>;

    /// Feeds `hub` until `shutdown` is cancelled or the source fails for good.
    fn run(
        self,
        hub: Arc<Hub>,
        shutdown: CancellationToken,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn wait_ready_ends_with_the_warm_up_or_at_its_limit() {
        let s = SourceStatus::new("kafka", true);
        assert!(
            s.wait_ready(Duration::from_secs(1)).await,
            "ready from the start"
        );
        s.set_ready(false);
        let started = tokio::time::Instant::now();
        assert!(!s.wait_ready(Duration::from_secs(1)).await);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(1),
            "waited the limit"
        );
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.wait_ready(Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let at = tokio::time::Instant::now();
        s.set_ready(true);
        assert!(waiter.await.unwrap(), "woken by the end of the warm-up");
        assert_eq!(at.elapsed(), Duration::ZERO, "at once, not at the limit");
    }
}
