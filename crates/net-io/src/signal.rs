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
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn waiters_complete_once_fired_whenever_made_or_first_polled() {
        let signal = Signal::default();
        // Registered (polled once) before the signal fires.
        let registered = signal.waiter();
        tokio::pin!(registered);
        let first = std::future::poll_fn(|cx| Poll::Ready(registered.as_mut().poll(cx))).await;
        assert!(first.is_pending());
        // Made before, first polled after.
        let made_before = signal.waiter();
        assert!(!signal.is_fired());
        signal.fire();
        assert!(signal.is_fired());
        tokio::time::timeout(Duration::from_secs(5), registered)
            .await
            .expect("a registered waiter completes");
        tokio::time::timeout(Duration::from_secs(5), made_before)
            .await
            .expect("a waiter made before fire completes");
        tokio::time::timeout(Duration::from_secs(5), signal.waiter())
            .await
            .expect("a waiter made after fire completes");
    }

    /// Records whether it was woken.
    struct Flag(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A waiter first polled with another waker (as by another task) registers again when
    /// polled with this one: `fire` must wake the waker it was last polled with.
    #[test]
    fn a_waiter_polled_with_another_waker_registers_again() {
        let signal = Signal::default();
        let mut waiter = std::pin::pin!(signal.waiter());
        let mut elsewhere = Context::from_waker(Waker::noop());
        assert!(waiter.as_mut().poll(&mut elsewhere).is_pending());
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let here = Waker::from(flag.clone());
        assert!(waiter
            .as_mut()
            .poll(&mut Context::from_waker(&here))
            .is_pending());
        // Polled again with the same waker: nothing changes, still pending.
        assert!(waiter
            .as_mut()
            .poll(&mut Context::from_waker(&here))
            .is_pending());
        assert!(!flag.0.load(Ordering::SeqCst));
        signal.fire();
        assert!(
            flag.0.load(Ordering::SeqCst),
            "fire did not wake the last waker"
        );
        assert!(waiter
            .as_mut()
            .poll(&mut Context::from_waker(&here))
            .is_ready());
    }

    #[tokio::test]
    async fn a_waiter_polled_in_a_loop_stays_pending_until_fired_then_wakes() {
        let signal = Arc::new(Signal::default());
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
}
