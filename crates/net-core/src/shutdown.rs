//! Shutdown signals. The first SIGTERM or SIGINT starts a drain (stop taking clients, close
//! existing ones with 1012 spread over the drain window); a second signal, or the grace
//! deadline, stops at once.

use std::sync::Arc;
use std::time::Duration;

use net_io::Signal;
use tokio_util::sync::CancellationToken;

/// The two phases of shutdown.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Cancelled to start draining (by [`Shutdown::start_drain`], which fires `drained` with it).
    pub drain: CancellationToken,
    /// The same drain as per-connection loops and per-request checks read it: one atomic load
    /// (a token's `is_cancelled`/`cancelled()` take process-wide mutexes on every call or poll).
    /// Fired by [`Shutdown::start_drain`] right after `drain` is cancelled.
    pub drained: Arc<Signal>,
    /// Cancelled to stop immediately.
    pub hard: CancellationToken,
}

impl Shutdown {
    /// Fresh, un-cancelled tokens.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a drain, and a hard stop after `grace` if the drain has not finished by then.
    pub fn start_drain(&self, grace: Duration) {
        if self.drain.is_cancelled() {
            return;
        }
        self.drain.cancel();
        self.drained.fire();
        let hard = self.hard.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(grace) => {
                    tracing::warn!(?grace, "grace period over; stopping now");
                    hard.cancel();
                }
                _ = hard.cancelled() => {}
            }
        });
    }

    /// Installs SIGTERM/SIGINT handlers driving this shutdown.
    pub fn install_signal_handlers(&self, grace: Duration) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            let this = self.clone();
            tokio::spawn(async move {
                let mut seen = 0;
                loop {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    seen += 1;
                    if seen == 1 {
                        tracing::info!("signal received: draining (send again to stop at once)");
                        this.start_drain(grace);
                    } else {
                        tracing::warn!("second signal: stopping at once");
                        this.hard.cancel();
                        return;
                    }
                }
            });
        }
        Ok(())
    }
}
