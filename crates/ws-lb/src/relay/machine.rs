//! The lifecycle of one relayed connection, as a state machine without sockets or clocks.
//!
//! The driver (`super::relay`) tells [`Relay`] what happened — a socket is readable or
//! writable, a readiness wait failed, the LB starts draining, a deadline passed — and asks it
//! what to wait for next ([`Relay::interest`], [`Relay::next_deadline`]), what to do besides
//! moving bytes ([`Relay::poll_action`]) and whether it is over ([`Relay::end`]). Reads and
//! writes go through `std::io::Read`/`Write` (as in rustls), so the same code moves bytes
//! between two `TcpStream`s in production and between in-memory peers in the tests; every
//! method takes the current time instead of reading a clock.
//!
//! Bytes are not decoded or re-encoded: what is read from one side is written to the other
//! as it is, and a `FrameTracker` per direction follows frame boundaries so that the LB can
//! put a close frame of its own (1012) into the client's stream *between* two frames. A read
//! is written on at once; only what the destination does not take waits in a heap buffer,
//! and the source is not read again until that buffer is flushed, so backpressure travels to
//! the sender through TCP and an idle relay holds no buffer at all.
//!
//! States ([`State`]): `Open` → (`Draining` →) `CloseWanted` → `Closing` → `Done`, or
//! straight to `Done` when either side finishes the connection itself. Every state but
//! `Open` without pending bytes has a deadline that moves it on; the tests check that a
//! deadline, once passed, never stays the next one.

use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use ws_protocol::close;
use ws_protocol::frame;

use super::half::Half;

/// Bytes moved per read at most (the driver's per-thread read buffer).
pub(crate) const CHUNK: usize = net_io::READ_BUFFER;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// A close handshake completed (either side started it).
    Closed,
    /// The client went away without a close handshake.
    ClientGone,
    /// The shard went away; `notified` says whether the client got a 1012 close frame.
    ShardLost { notified: bool },
    /// The LB drained and sent the client 1012.
    Drained,
    /// The client took no byte of what the shard sent for `stall_timeout`: dropped.
    ClientStalled,
}

impl RelayEnd {
    /// One of each kind, in index order (for registering every `ws_lb_relay_ends_total`
    /// series at zero).
    pub const ALL: [RelayEnd; 5] = [
        RelayEnd::Closed,
        RelayEnd::ClientGone,
        RelayEnd::ShardLost { notified: true },
        RelayEnd::Drained,
        RelayEnd::ClientStalled,
    ];

    /// This end's position in [`Self::ALL`].
    pub fn index(self) -> usize {
        match self {
            RelayEnd::Closed => 0,
            RelayEnd::ClientGone => 1,
            RelayEnd::ShardLost { .. } => 2,
            RelayEnd::Drained => 3,
            RelayEnd::ClientStalled => 4,
        }
    }

    /// This end's `end` label value.
    pub fn label(self) -> &'static str {
        match self {
            RelayEnd::Closed => "closed",
            RelayEnd::ClientGone => "client_gone",
            RelayEnd::ShardLost { .. } => "shard_lost",
            RelayEnd::Drained => "drained",
            RelayEnd::ClientStalled => "client_stalled",
        }
    }
}

/// The relay's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// How long to wait for the client's close frame after the LB sent one, and how long
    /// the shard's last bytes may wait for the client once the shard has gone.
    pub close_timeout: Duration,
    /// A destination that accepts no byte of what is waiting for it for this long is given
    /// up on: a client that stopped reading is dropped (its shard has long since closed it
    /// as a slow consumer, but that close sits behind the data the client is not taking);
    /// a shard that stopped reading is treated as lost (1012 to the client).
    pub stall_timeout: Duration,
}

/// One of the two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Shard,
}

/// What the driver should wait for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interest {
    pub read_client: bool,
    pub read_shard: bool,
    pub write_client: bool,
    pub write_shard: bool,
    /// The LB's drain signal.
    pub drain: bool,
}

/// Something for the driver to do besides moving bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The LB queued a close frame of its own with `code` for the client (count it). With
    /// `tell_shard`, write [`shard_goodbye`] to the shard too, best effort, so that it frees
    /// the client's slot at once instead of when the relay ends.
    LbClose { code: u16, tell_shard: bool },
}

/// The close frame the LB sends a shard it abandons (masked: the LB is the shard's client).
pub fn shard_goodbye(mask: [u8; 4]) -> Bytes {
    frame::encode_masked_frame(
        frame::OP_CLOSE,
        &frame::close_payload(close::GOING_AWAY, "client leaving"),
        mask,
    )
}

/// A close frame of the LB's own for the client, and how the relay ends once it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LbClose {
    code: u16,
    reason: &'static str,
    end: RelayEnd,
}

const SHARD_LOST: LbClose = LbClose {
    code: close::SERVICE_RESTART,
    reason: "shard connection lost, reconnect",
    end: RelayEnd::ShardLost { notified: true },
};

const DRAINED: LbClose = LbClose {
    code: close::SERVICE_RESTART,
    reason: "load balancer restarting, reconnect",
    end: RelayEnd::Drained,
};

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Relaying both ways.
    Open,
    /// Relaying both ways; the LB drains and closes this client at `at` (a random moment
    /// within the drain window, so clients do not all reconnect at once).
    Draining { at: Instant },
    /// The LB has a close frame of its own for the client (drain, shard lost) and puts it at
    /// the next frame boundary of the shard's stream; reads from the shard stop exactly there.
    CloseWanted(LbClose),
    /// The LB's close frame is queued for the client and the shard connection is abandoned
    /// (nothing more is read from or written to it); waiting for the client's close frame or
    /// EOF until `deadline`.
    Closing { deadline: Instant, end: RelayEnd },
    /// Over; the driver drops both sockets.
    Done(RelayEnd),
}

/// One relayed connection's state.
#[derive(Debug)]
pub struct Relay<'t> {
    /// Client → shard.
    up: Half,
    /// Shard → client.
    down: Half,
    state: State,
    /// Set once the shard has gone (EOF) while bytes for the client still wait: they get at
    /// most `close_timeout` to be taken, so a client that stopped reading cannot pin the
    /// connection.
    flush_deadline: Option<Instant>,
    action: Option<Action>,
    timers: &'t Timers,
}

impl<'t> Relay<'t> {
    /// A relay whose handshakes left `client_prefix` (bytes the client sent after its
    /// upgrade request) and `shard_prefix` (bytes the shard sent after its 101) to forward.
    pub fn new(
        client_prefix: &[u8],
        shard_prefix: &[u8],
        timers: &'t Timers,
        now: Instant,
    ) -> Self {
        let mut relay = Self {
            up: Half::default(),
            down: Half::default(),
            state: State::Open,
            flush_deadline: None,
            action: None,
            timers,
        };
        relay.up.tracker.observe(client_prefix);
        relay.up.inject(client_prefix, now);
        relay.down.tracker.observe(shard_prefix);
        relay.down.inject(shard_prefix, now);
        relay.advance(now);
        relay
    }

    /// How the relay ended, once it has.
    pub fn end(&self) -> Option<RelayEnd> {
        match self.state {
            State::Done(end) => Some(end),
            _ => None,
        }
    }

    /// The next thing to do besides moving bytes, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.action.take()
    }

    /// Whether the shard connection is still in use (not yet abandoned for the LB's close).
    fn shard_in_use(&self) -> bool {
        matches!(
            self.state,
            State::Open | State::Draining { .. } | State::CloseWanted(_)
        )
    }

    /// What to wait for next.
    pub fn interest(&self) -> Interest {
        if self.end().is_some() {
            return Interest::default();
        }
        let shard = self.shard_in_use();
        Interest {
            read_client: !self.up.has_pending() && !self.up.eof,
            read_shard: shard && !self.down.has_pending() && !self.down.eof,
            write_client: self.down.has_pending(),
            write_shard: shard && self.up.has_pending(),
            drain: self.state == State::Open,
        }
    }

    /// When [`Self::on_timer`] must be called next (None: no timer is needed). A deadline
    /// that has passed and been handled is never returned again.
    pub fn next_deadline(&self) -> Option<Instant> {
        let state = match self.state {
            State::Draining { at } => Some(at),
            State::Closing { deadline, .. } => Some(deadline),
            State::Open | State::CloseWanted(_) | State::Done(_) => None,
        };
        if self.end().is_some() {
            return None;
        }
        let stall = self.timers.stall_timeout;
        let up_stall = self
            .up
            .stall_deadline(stall)
            .filter(|_| self.shard_in_use());
        [
            state,
            self.flush_deadline,
            self.down.stall_deadline(stall),
            up_stall,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// `side` is readable: reads from it and forwards to the other side, using `buf` as the
    /// read buffer (at most [`CHUNK`] bytes are read at a time).
    pub fn on_readable(
        &mut self,
        side: Side,
        src: &mut impl Read,
        dst: &mut impl Write,
        buf: &mut [u8],
        now: Instant,
    ) {
        let len = buf.len().min(CHUNK);
        let buf = &mut buf[..len];
        match side {
            Side::Client => {
                // Once the shard is abandoned the client's bytes are only watched for its
                // close frame.
                let forward = self.shard_in_use();
                self.up.pump(buf, src, dst, forward, false, now);
            }
            Side::Shard => {
                let to_boundary = matches!(self.state, State::CloseWanted(_));
                self.down.pump(buf, src, dst, true, to_boundary, now);
            }
        }
        self.advance(now);
    }

    /// `side` is writable: flushes what waits for it.
    pub fn on_writable(&mut self, side: Side, dst: &mut impl Write, now: Instant) {
        let result = match side {
            Side::Client => self.down.flush(dst, now),
            Side::Shard => self.up.flush(dst, now),
        };
        match result {
            Ok(()) => self.advance(now),
            Err(_) => self.on_write_failed(side, now),
        }
    }

    /// Waiting for `side` to become readable failed: as its EOF.
    pub fn on_read_failed(&mut self, side: Side, now: Instant) {
        match side {
            Side::Client => self.up.eof = true,
            Side::Shard => self.down.eof = true,
        }
        self.advance(now);
    }

    /// Writing to `side` (or waiting until it is writable) failed.
    pub fn on_write_failed(&mut self, side: Side, now: Instant) {
        match side {
            // Nothing more can be delivered to the client.
            Side::Client => self.finish(self.end_or(RelayEnd::ClientGone)),
            Side::Shard => {
                self.shard_gone();
                self.advance(now);
            }
        }
    }

    /// The shard can no longer be read from or written to: handled like its EOF.
    fn shard_gone(&mut self) {
        self.up.drop_pending();
        self.down.eof = true;
    }

    /// The LB starts draining; this connection is closed `delay` from now.
    pub fn on_drain(&mut self, now: Instant, delay: Duration) {
        if self.state == State::Open {
            self.state = State::Draining { at: now + delay };
        }
        self.advance(now);
    }

    /// Deadlines up to `now` have passed.
    pub fn on_timer(&mut self, now: Instant) {
        let passed = |d: Option<Instant>| d.is_some_and(|d| now >= d);
        let stall = self.timers.stall_timeout;
        if passed(self.flush_deadline) {
            // The client never took what the shard last sent (a slow consumer's close).
            self.finish(self.end_or(RelayEnd::ClientGone));
            return;
        }
        if passed(self.down.stall_deadline(stall)) {
            self.finish(RelayEnd::ClientStalled);
            return;
        }
        if self.shard_in_use() && passed(self.up.stall_deadline(stall)) {
            // The shard stopped taking the client's bytes: handled as a lost shard.
            self.shard_gone();
        }
        match self.state {
            State::Closing { deadline, end } if now >= deadline => {
                self.finish(end);
                return;
            }
            State::Draining { at } if now >= at => self.state = State::CloseWanted(DRAINED),
            _ => {}
        }
        self.advance(now);
    }

    /// How the relay ends if it ends now for a reason that is not its own: the close the LB
    /// already sent, if any, else `otherwise`.
    fn end_or(&self, otherwise: RelayEnd) -> RelayEnd {
        match self.state {
            State::Closing { end, .. } => end,
            _ => otherwise,
        }
    }

    fn finish(&mut self, end: RelayEnd) {
        self.state = State::Done(end);
    }

    /// Moves the state on from what the two halves now show.
    fn advance(&mut self, now: Instant) {
        if self.shard_in_use() {
            if self.down.eof && !self.down.has_pending() {
                if self.down.tracker.close_seen() {
                    // The shard closed cleanly and the client has all of it.
                    self.finish(RelayEnd::Closed);
                    return;
                }
                if !matches!(self.state, State::CloseWanted(_)) {
                    self.state = State::CloseWanted(SHARD_LOST);
                }
            }
            if self.up.eof {
                // The client is gone: dropping the shard socket lets the shard free the slot.
                self.finish(if self.up.tracker.close_seen() {
                    RelayEnd::Closed
                } else {
                    RelayEnd::ClientGone
                });
                return;
            }
            if let State::CloseWanted(lb) = self.state {
                if self.down.tracker.at_boundary() {
                    self.down
                        .inject(&frame::encode_close(lb.code, lb.reason), now);
                    let tell_shard =
                        !self.down.eof && self.up.tracker.at_boundary() && !self.up.has_pending();
                    self.action = Some(Action::LbClose {
                        code: lb.code,
                        tell_shard,
                    });
                    self.state = State::Closing {
                        deadline: now + self.timers.close_timeout,
                        end: lb.end,
                    };
                } else if self.down.eof {
                    // Mid-frame and the rest will never come: nothing valid can be sent.
                    self.finish(RelayEnd::ShardLost { notified: false });
                    return;
                }
            }
        }
        if let State::Closing { end, .. } = self.state {
            let client_done = self.up.eof || self.up.tracker.close_seen();
            if client_done && !self.down.has_pending() {
                self.finish(end);
                return;
            }
        }
        if self.down.eof && self.down.has_pending() && self.flush_deadline.is_none() {
            self.flush_deadline = Some(now + self.timers.close_timeout);
        }
    }
}

#[cfg(test)]
mod tests;
