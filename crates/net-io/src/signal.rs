//! A one-shot signal (a drain) that every connection of a process waits for, cheap to check on
//! every wake-up.
//!
//! A `tokio_util` `CancellationToken`'s `cancelled()` takes the token's mutex on every poll
//! (to read the flag) and tokio's `Notified` inside it takes the `Notify`'s (to refresh its
//! waker): two locks of mutexes that every connection of the process shares, on every wake-up
//! that polls it — in ws-lb's relay and ws-shard's session, every delivery. Here a connection's
//! [`Waiter`] registers its task's waker once, and each later poll reads one atomic that is
//! written once, when the signal fires; the waker is registered again only if the waiter finds
//! itself polled by another task.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// Fires once; [`Waiter`]s complete from then on.
#[derive(Debug, Default)]
pub struct Signal {
    fired: AtomicBool,
    notify: Notify,
}

impl Signal {
    /// A signal that fires once `trigger` completes (a task on the current runtime waits for
    /// it; e.g. `token.clone().cancelled_owned()`). Must be called inside a tokio runtime.
    pub fn fired_by(trigger: impl Future<Output = ()> + Send + 'static) -> Arc<Self> {
        let signal = Arc::new(Self::default());
        let fire = signal.clone();
        tokio::spawn(async move {
            trigger.await;
            fire.fire();
        });
        signal
    }

    /// Fires: every waiter, made before or after, completes.
    pub fn fire(&self) {
        // Set before the waiters wake, so that each one finds it when polled.
        self.fired.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Whether the signal has fired (one atomic load).
    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// A future that completes once the signal fires. Made before the signal fires, it is
    /// woken by it even if not yet polled (`Notify::notify_waiters` semantics).
    pub fn waiter(&self) -> Waiter<'_> {
        Waiter {
            signal: self,
            notified: self.notify.notified(),
            waker: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Signal::waiter`].
    #[derive(Debug)]
    pub struct Waiter<'a> {
        signal: &'a Signal,
        #[pin]
        notified: Notified<'a>,
        // The waker the `Notified` holds (None until the first poll registers it).
        waker: Option<Waker>,
    }
}

impl Future for Waiter<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.signal.is_fired() {
            return Poll::Ready(());
        }
        if this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            // Registered with this task's waker: `fire` wakes it; nothing to lock.
            return Poll::Pending;
        }
        // First poll, or polled by another task: (re-)register under the `Notify`'s lock.
        if this.notified.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        *this.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_complete_once_fired_whenever_made() {
        let signal = Arc::new(Signal::default());
        // Polled (registered) before the signal fires, by a task of its own.
        let early = tokio::spawn({
            let s = signal.clone();
            async move { s.waiter().await }
        });
        // Made before, first polled after.
        let made_before = signal.waiter();
        // Give the task time to register; the test holds either way (a waiter that first
        // polls after `fire` finds the flag).
        tokio::task::yield_now().await;
        assert!(!signal.is_fired());
        signal.fire();
        assert!(signal.is_fired());
        tokio::time::timeout(Duration::from_secs(5), early)
            .await
            .expect("a registered waiter is woken")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), made_before)
            .await
            .expect("a waiter made before fire completes");
        // Made after.
        tokio::time::timeout(Duration::from_secs(5), signal.waiter())
            .await
            .expect("a waiter made after fire completes");
    }

    #[tokio::test]
    async fn a_waiter_polled_in_a_loop_stays_pending_until_fired_then_wakes() {
        let signal = Signal::fired_by(std::future::pending());
        let waiter = signal.waiter();
        tokio::pin!(waiter);
        // Many polls by the same task without a fire: pending each time.
        for _ in 0..100 {
            let polled = std::future::poll_fn(|cx| Poll::Ready(waiter.as_mut().poll(cx))).await;
            assert!(polled.is_pending());
        }
        let s = signal.clone();
        tokio::spawn(async move { s.fire() });
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by fire");
    }

    #[tokio::test]
    async fn fired_by_fires_when_its_trigger_completes() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let signal = Signal::fired_by(async move {
            let _ = rx.await;
        });
        assert!(!signal.is_fired());
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), signal.waiter())
            .await
            .expect("fired once the trigger completed");
        assert!(signal.is_fired());
    }
}
