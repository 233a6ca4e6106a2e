//! One client WebSocket connection, from the first frame after the upgrade to the TCP close.
//!
//! The connection's lifecycle is the sans-IO [`machine::Session`]: framing, the JSON
//! protocol ([`pubsub`]), keepalive and the client's message rate ([`keepalive`]), the
//! output buffer ([`output`]), slow-consumer and drain closes. [`run`] is its driver: a
//! single task owns the socket and runs one `select!` over socket readable, socket writable
//! (only while output is pending), the connection's queue notification, the drain signal and
//! one timer. One task instead of a reader/writer pair halves the per-connection task state
//! and needs no channel between halves; every branch is cancellation-safe because reads and
//! writes are non-blocking calls made after readiness, never futures that could be dropped
//! halfway. Reads go into a per-thread buffer (`net_io`), so an idle connection holds no
//! read buffer at all.

mod auth;
mod keepalive;
mod machine;
mod output;
mod pubsub;

use std::sync::Arc;

use bytes::Bytes;
use net_io::{Nonblocking, Transport};
use rand::Rng;
use tokio::time::{sleep_until, Instant};

pub use self::auth::Admission;
pub use machine::{Interest, Session};

use crate::config::SessionConfig;
use crate::hub::Hub;
use crate::metrics::ShardMetrics;
use crate::slots::SlotGuard;

/// What the connection serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The JSON pub/sub protocol.
    PubSub,
    /// Echo every message back (conformance testing; `--echo`).
    Echo,
}

/// Everything a session shares with the other sessions of its shard.
#[derive(Debug)]
pub struct ShardContext {
    pub shard_id: u32,
    pub hub: Arc<Hub>,
    pub pubsub: SessionConfig,
    pub echo: SessionConfig,
    pub metrics: ShardMetrics,
    /// Fires when the shard starts draining (`net_core::Shutdown::drained`): health,
    /// admission and every session read it.
    pub drain: Arc<net_io::Signal>,
    /// Token verification (off when no key is configured: every channel is public).
    pub auth: Arc<::auth::Verifier>,
}

impl ShardContext {
    /// The settings of a session in `mode`.
    pub fn config(&self, mode: Mode) -> &SessionConfig {
        match mode {
            Mode::PubSub => &self.pubsub,
            Mode::Echo => &self.echo,
        }
    }

    /// A connection's moment within the drain window.
    fn drain_delay(&self, mode: Mode) -> std::time::Duration {
        let window = self.config(mode).drain_window;
        if window.is_zero() {
            window
        } else {
            rand::rng().random_range(std::time::Duration::ZERO..=window)
        }
    }
}

/// Runs the session until the connection is closed. `prefix` holds bytes the HTTP layer
/// read past the upgrade request; `admission` is what the upgrade's token (if any) said.
/// The slot is released when this returns.
pub async fn run<T: Transport>(
    stream: T,
    prefix: Bytes,
    ctx: Arc<ShardContext>,
    mode: Mode,
    admission: Admission,
    slot: SlotGuard,
) {
    let _slot = slot;
    let mut session = Session::with_admission(ctx.clone(), mode, admission, Instant::now());
    if !prefix.is_empty() {
        session.on_bytes(&mut prefix.to_vec(), Instant::now());
    }
    drop(prefix);
    let timer = sleep_until(session.next_deadline());
    tokio::pin!(timer);
    // Made once per connection: it registers this task's waker once, and each wake-up that
    // polls it reads one atomic. A `cancelled()` of the token took two locks of mutexes that
    // every session of the process shares on each poll, i.e. per delivery.
    let drain = ctx.drain.waiter();
    tokio::pin!(drain);
    while !session.is_done() {
        let deadline = session.next_deadline();
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        let want = session.interest();
        let queue = session.queue();
        tokio::select! {
            biased;
            // Readiness is polled in place (`poll_*_ready` keep their wakers in the socket's
            // registration) rather than through `writable()`/`readable()` futures, which
            // would add their waiter state to every connection's future.
            r = std::future::poll_fn(|cx| stream.poll_write_ready(cx)), if want.write => match r {
                Ok(()) => session.on_writable(&mut Nonblocking(&stream), Instant::now()),
                Err(_) => session.on_failed(),
            },
            r = std::future::poll_fn(|cx| stream.poll_read_ready(cx)), if want.read => match r {
                Ok(()) => net_io::with_buffer(|buf| {
                    session.on_readable(&mut Nonblocking(&stream), buf, Instant::now());
                }),
                Err(_) => session.on_failed(),
            },
            _ = async { match queue { Some(q) => q.notified().await, None => std::future::pending().await } }, if want.queue => {
                session.on_queue(Instant::now());
            }
            _ = &mut drain, if want.drain => session.on_drain(Instant::now(), ctx.drain_delay(mode)),
            _ = &mut timer => session.on_timer(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HubConfig;
    use crate::slots::Slots;
    use tokio::net::TcpStream;

    /// Every connection holds one of these futures; keep it from growing unnoticed (it was
    /// 1,200 bytes before the state machine, in a debug build; in release 1,120 before the
    /// history budget, 1,168 with authentication and `write_delay`, 880 with readiness polled
    /// in place).
    #[tokio::test]
    async fn the_session_future_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let ctx = Arc::new(ShardContext {
            shard_id: 0,
            hub: Hub::new(HubConfig::default(), 1, "e"),
            pubsub: SessionConfig::default(),
            echo: SessionConfig::default(),
            metrics: ShardMetrics::new(0),
            drain: Arc::default(),
            auth: Arc::new(::auth::Verifier::new(::auth::AuthConfig::default()).unwrap()),
        });
        let slot = Slots::new(1, None).try_acquire().unwrap();
        let f = run(
            stream,
            Bytes::new(),
            ctx,
            Mode::PubSub,
            Admission::Anonymous,
            slot,
        );
        let size = std::mem::size_of_val(&f);
        eprintln!("session future: {size} bytes");
        assert!(size <= 960, "session future is {size} bytes");
    }
}
