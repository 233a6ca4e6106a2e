//! Relaying one client's WebSocket to its shard, byte for byte.
//!
//! The relay does not decode or re-encode frames, so the shard stays the only WebSocket
//! endpoint the client talks to (conformance, masking checks, size limits all happen there).
//! Its lifecycle — when to forward, when to put a close frame of the LB's own (1012) into the
//! client's stream, when to give up on a peer — is the sans-IO [`machine::Relay`]; this module
//! is its driver: one `select!` over the two sockets' readiness, the drain signal and one
//! timer, feeding the machine what happened.
//!
//! Memory: reads go into a per-thread buffer (`net_io`), so an idle relayed connection
//! holds no buffer; a heap buffer exists only while a destination socket is full.

mod half;
mod machine;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use std::io::IoSlice;

use net_io::{Nonblocking, Signal, Transport};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};

pub use machine::RelayEnd;
use machine::{shard_goodbye, Action, Relay, Side, Timers};

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub timers: Timers,
    /// On drain, the 1012 goes out at a random moment within this window.
    pub drain_window: Duration,
    /// Fires when the LB starts draining.
    pub drain: Arc<Signal>,
}

impl RelayOptions {
    pub fn new(
        close_timeout: Duration,
        stall_timeout: Duration,
        drain_window: Duration,
        drain: Arc<Signal>,
    ) -> Self {
        Self {
            timers: Timers {
                close_timeout,
                stall_timeout,
            },
            drain_window,
            drain,
        }
    }

    /// This connection's moment within the drain window.
    fn drain_delay(&self) -> Duration {
        let window = self.drain_window.as_millis() as u64;
        let jitter = if window == 0 {
            0
        } else {
            rand::random::<u64>() % window
        };
        Duration::from_millis(jitter)
    }
}

/// What a relay needs from its owner: the settings, and where the close frames the LB sends
/// the client itself are counted.
pub trait RelayHost {
    fn options(&self) -> &RelayOptions;
    fn lb_close(&self, code: u16);
}

/// Runs the relay until the connection ends. `client_prefix` and `shard_prefix` are bytes
/// already read from each side during the handshakes; `on_lb_close` is told the code of
/// every close frame the LB sends the client itself. `host` is owned and handed back, so
/// that the caller can build this future outside an `async fn` of its own without another
/// handle to what it already holds (see `proxy::relayed`).
pub async fn relay<H: RelayHost, S: Transport>(
    client: TcpStream,
    client_prefix: Bytes,
    shard: S,
    shard_prefix: Bytes,
    host: H,
) -> (RelayEnd, H) {
    let end = {
        let opts = host.options();
        let mut machine = Relay::new(&client_prefix, &shard_prefix, &opts.timers, Instant::now());
        drop((client_prefix, shard_prefix));
        // Made once per connection: it registers this task's waker once, and each wake-up
        // that polls it reads one atomic (`net_io::Signal`). A `CancellationToken`'s
        // `cancelled()` took two process-wide locks per poll, i.e. per delivery.
        let drain = opts.drain.waiter();
        tokio::pin!(drain);
        loop {
            if let Some(Action::LbClose { code, tell_shard }) = machine.poll_action() {
                host.lb_close(code);
                if tell_shard {
                    let _ =
                        shard.write_nonblocking(&[IoSlice::new(&shard_goodbye(rand::random()))]);
                }
            }
            if let Some(end) = machine.end() {
                // Dropping the shard socket lets the shard free the client's slot.
                break end;
            }
            let want = machine.interest();
            let deadline = machine.next_deadline();
            let m = &mut machine;
            // Readiness is polled in place (`poll_*_ready` keep their wakers in the sockets'
            // registrations) rather than through `readable()`/`writable()` futures, whose waiter
            // state would sit in every relay's future: ~290 bytes of it per connection.
            tokio::select! {
                biased;
                _ = &mut drain, if want.drain => m.on_drain(Instant::now(), opts.drain_delay()),
                r = std::future::poll_fn(|cx| client.poll_write_ready(cx)), if want.write_client => match r {
                    Ok(()) => m.on_writable(Side::Client, &mut Nonblocking(&client), Instant::now()),
                    Err(_) => m.on_write_failed(Side::Client, Instant::now()),
                },
                r = std::future::poll_fn(|cx| shard.poll_write_ready(cx)), if want.write_shard => match r {
                    Ok(()) => m.on_writable(Side::Shard, &mut Nonblocking(&shard), Instant::now()),
                    Err(_) => m.on_write_failed(Side::Shard, Instant::now()),
                },
                r = std::future::poll_fn(|cx| client.poll_read_ready(cx)), if want.read_client => match r {
                    Ok(()) => net_io::with_buffer(|buf| {
                        m.on_readable(Side::Client, &mut Nonblocking(&client), &mut Nonblocking(&shard), buf, Instant::now());
                    }),
                    Err(_) => m.on_read_failed(Side::Client, Instant::now()),
                },
                r = std::future::poll_fn(|cx| shard.poll_read_ready(cx)), if want.read_shard => match r {
                    Ok(()) => net_io::with_buffer(|buf| {
                        m.on_readable(Side::Shard, &mut Nonblocking(&shard), &mut Nonblocking(&client), buf, Instant::now());
                    }),
                    Err(_) => m.on_read_failed(Side::Shard, Instant::now()),
                },
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => m.on_timer(Instant::now()),
            }
        }
    };
    (end, host)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pointer-sized, as ws-lb's host (`Arc<Lb>`) is.
    impl RelayHost for std::sync::Arc<RelayOptions> {
        fn options(&self) -> &RelayOptions {
            self
        }
        fn lb_close(&self, _code: u16) {}
    }

    /// Every relayed connection holds one of these futures; keep it from growing unnoticed
    /// (it was 1,400 bytes before the state machine, in a debug build; 1,368 in release with
    /// `readable()`/`writable()` futures, 792 with readiness polled in place).
    #[tokio::test]
    async fn the_relay_future_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        let opts = std::sync::Arc::new(RelayOptions::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
            Duration::from_secs(1),
            Arc::new(Signal::default()),
        ));
        // As ws-lb runs it: the shard side is an `Upstream` (a socket or a tier-link stream).
        let f = relay(
            a,
            Bytes::new(),
            crate::backend::Upstream::Tcp(b),
            Bytes::new(),
            opts,
        );
        let size = std::mem::size_of_val(&f);
        eprintln!("relay future: {size} bytes");
        assert!(size <= 900, "relay future is {size} bytes");
    }
}
