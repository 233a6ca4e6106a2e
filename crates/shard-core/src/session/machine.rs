//! One client connection's lifecycle, as a state machine without sockets or clocks.
//!
//! The driver (`super::run`) tells [`Session`] what happened — bytes arrived, the socket is
//! writable, the connection's queue has deliveries, the shard drains, a deadline passed, the
//! socket failed — and asks it what to wait for ([`Session::interest`],
//! [`Session::next_deadline`]) and whether it is over ([`Session::is_done`]). Reads and
//! writes go through `std::io::Read`/`Write`, so the tests drive it with in-memory peers;
//! every method takes the current time instead of reading a clock.
//!
//! States ([`Phase`]): `Open` → (`Draining` →) `Closing` → `Done`, or straight to `Done`
//! when the socket fails or the client leaves. While closing, the close deadline is the only
//! timer: the others act only on an open connection, so one of them in the past would fire
//! again and again without changing anything (a busy loop per slow consumer, fixed twice
//! before this was a state machine; the tests now check that no deadline, once handled, is
//! the next one again).
//!
//! Writes: everything waiting for the connection goes out in one vectored write per
//! wake-up (bounded per call, see `output`): a writable socket first takes what the hub
//! queued since the last look, so deliveries that arrived while a write was in progress
//! share the next one. With `write_delay` (off by default), deliveries for an open
//! connection with nothing pending wait that long for more before they are taken
//! (`Phase::Open`'s `flush_at`; kept in the phase so that it costs no memory per connection,
//! and a draining connection writes at once); with it off a lone delivery is written at
//! once.
//!
//! Close behaviour (codes in `ws_protocol::close`): a client close is echoed and the
//! connection ends once the echo is written; a protocol violation sends its code and ends
//! once that is written; a drain (1012), a slow consumer (4000) or a dead peer (1001) sends
//! the code and waits up to `close_timeout` for the client's close frame.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use ws_protocol::close;
use ws_protocol::frame::{self, Decoder, Flow, Limits, Message, Role};

use super::auth::{Admission, SessionAuth};
use super::keepalive::{Due, Keepalive, TokenBucket};
use super::output::{Output, WRITE_BATCH};
use super::pubsub::{Overflowed, PubSub, Stop};
use super::{Mode, ShardContext};
use crate::config::SessionConfig;
use crate::queue::ConnQueue;

/// Socket reads per readiness wake-up before yielding to other branches.
const READ_BUDGET: usize = 4;

/// What the driver should wait for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
    /// The connection's queue of deliveries (pub/sub only).
    pub queue: bool,
    /// The shard's drain signal.
    pub drain: bool,
}

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Serving requests and deliveries. With `write_delay`: when the deliveries waiting in
    /// the queue are taken (the queue is not watched until then).
    Open { flush_at: Option<Instant> },
    /// Serving; at `at` (this connection's moment in the drain window) it closes with 1012.
    Draining { at: Instant },
    /// Our close frame is queued or sent. Nothing is delivered any more and only the peer's
    /// close frame is looked for. Over once the output is written and either `peer_done`
    /// (the peer's close arrived, or we hang up after ours: a protocol violation) or the
    /// peer's EOF; at `deadline` regardless.
    Closing { deadline: Instant, peer_done: bool },
    /// Over: the driver drops the socket, and with it the slot.
    Done,
}

/// One client connection: the frame decoder, and the rest of the state it feeds messages to.
#[derive(Debug)]
pub struct Session {
    decoder: Decoder,
    conn: Conn,
}

#[derive(Debug)]
struct Conn {
    ctx: Arc<ShardContext>,
    mode: Mode,
    phase: Phase,
    /// The client's side of the connection has ended (EOF).
    eof: bool,
    out: Output,
    keepalive: Keepalive,
    rate: TokenBucket,
    /// Pub/sub mode only.
    pubsub: Option<PubSub>,
    auth: SessionAuth,
}

impl Session {
    /// A session without a token (public channels only, until an `auth` message).
    pub fn new(ctx: Arc<ShardContext>, mode: Mode, now: Instant) -> Self {
        Self::with_admission(ctx, mode, Admission::Anonymous, now)
    }

    /// A session whose upgrade carried a token (or one that failed: then the session
    /// starts by closing with 4001).
    pub fn with_admission(
        ctx: Arc<ShardContext>,
        mode: Mode,
        admission: Admission,
        now: Instant,
    ) -> Self {
        let cfg = *ctx.config(mode);
        let auth = SessionAuth::new(ctx.auth.clone(), &admission, now);
        let pubsub = (mode == Mode::PubSub)
            .then(|| PubSub::new(ctx.hub.clone(), ctx.shard_id, cfg.outbound_queue));
        let mut s = Self {
            decoder: Decoder::new(Role::Server, Limits::new(cfg.max_message_size)),
            conn: Conn {
                mode,
                phase: Phase::Open { flush_at: None },
                eof: false,
                out: Output::default(),
                keepalive: Keepalive::new(now),
                rate: TokenBucket::new(cfg.rate_burst, now),
                pubsub,
                auth,
                ctx,
            },
        };
        if let Admission::Refused(failure) = admission {
            s.conn.ctx.metrics.auth_failure(failure);
            s.conn.fail(close::UNAUTHORIZED, failure.reason(), now);
        }
        s
    }

    /// The connection's queue of deliveries, for the driver to wait on (pub/sub only).
    pub fn queue(&self) -> Option<&ConnQueue> {
        self.conn.pubsub.as_ref().map(PubSub::queue)
    }

    /// Whether the connection is over.
    pub fn is_done(&self) -> bool {
        self.conn.phase == Phase::Done
    }

    /// What to wait for next.
    pub fn interest(&self) -> Interest {
        let c = &self.conn;
        if self.is_done() {
            return Interest::default();
        }
        Interest {
            read: !c.eof,
            write: !c.out.is_empty(),
            queue: c.serving() && c.pubsub.is_some() && c.flush_at().is_none(),
            drain: matches!(c.phase, Phase::Open { .. }),
        }
    }

    /// When [`Self::on_timer`] must be called next. A deadline that has passed and been
    /// handled is never returned again.
    pub fn next_deadline(&self) -> Instant {
        let c = &self.conn;
        let cfg = c.cfg();
        let keepalive = c.keepalive.deadline(cfg.ping_interval, cfg.idle_timeout);
        let expiry = c.auth.expires_at().unwrap_or(keepalive);
        match c.phase {
            Phase::Open { flush_at } => keepalive.min(expiry).min(flush_at.unwrap_or(keepalive)),
            Phase::Done => keepalive,
            Phase::Draining { at } => keepalive.min(at).min(expiry),
            Phase::Closing { deadline, .. } => deadline,
        }
    }

    /// Bytes from the client: the upgrade request's leftovers, or a read.
    pub fn on_bytes(&mut self, data: &mut [u8], now: Instant) {
        self.decode(data, now);
        self.conn.advance();
    }

    fn decode(&mut self, data: &mut [u8], now: Instant) {
        let c = &mut self.conn;
        if c.is_peer_done() || c.phase == Phase::Done {
            return;
        }
        if let Err(v) = self.decoder.feed(data, &mut |msg| c.on_message(msg, now)) {
            c.fail(v.close_code, v.reason, now);
        }
    }

    /// The socket is readable: reads into `buf` (a few times at most) and handles what came.
    pub fn on_readable(&mut self, src: &mut impl Read, buf: &mut [u8], now: Instant) {
        for _ in 0..READ_BUDGET {
            if self.conn.eof {
                break;
            }
            match src.read(buf) {
                Ok(0) => self.conn.eof = true,
                Ok(n) => {
                    self.conn.keepalive.on_inbound(now);
                    if let Some(data) = buf.get_mut(..n) {
                        self.decode(data, now);
                    }
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // Reset: nothing more can be said to this peer.
                Err(_) => return self.on_failed(),
            }
        }
        self.conn.advance();
    }

    /// The socket is writable: takes the deliveries queued since the last look (they share
    /// this write) and writes what is waiting.
    pub fn on_writable(&mut self, dst: &mut impl Write, now: Instant) {
        let c = &mut self.conn;
        c.take_queued(now);
        if c.out.write_to(dst).is_err() {
            return self.on_failed();
        }
        c.advance();
    }

    /// The socket failed (reset, broken pipe): the connection is over.
    pub fn on_failed(&mut self) {
        self.conn.phase = Phase::Done;
    }

    /// The hub queued deliveries (or the queue overflowed).
    pub fn on_queue(&mut self, now: Instant) {
        let c = &mut self.conn;
        let delay = c.cfg().write_delay;
        if c.out.is_empty() && !delay.is_zero() && matches!(c.phase, Phase::Open { .. }) {
            // Nothing is being written: let more deliveries join these for `write_delay`.
            // An overflow is still noticed now.
            if c.queue_overflowed() {
                c.slow_consumer(now);
            } else if c.flush_at().is_none() && !c.queue_is_empty() {
                // (An empty queue: a wake-up left over from deliveries already taken.)
                c.phase = Phase::Open {
                    flush_at: Some(now + delay),
                };
            }
        } else {
            c.take_queued(now);
        }
        c.advance();
    }

    /// The shard starts draining; this connection closes `delay` from now.
    pub fn on_drain(&mut self, now: Instant, delay: Duration) {
        let c = &mut self.conn;
        if let Phase::Open { flush_at } = c.phase {
            c.phase = Phase::Draining { at: now + delay };
            if flush_at.is_some() {
                // A draining connection writes at once.
                c.take_queued(now);
            }
        }
    }

    /// Deadlines up to `now` have passed.
    pub fn on_timer(&mut self, now: Instant) {
        let c = &mut self.conn;
        match c.phase {
            Phase::Closing { deadline, .. } => {
                if now >= deadline {
                    // The peer never answered our close: give up on the handshake.
                    c.out.clear();
                    c.phase = Phase::Done;
                }
                return;
            }
            Phase::Draining { at } if now >= at => {
                c.start_close(close::SERVICE_RESTART, "service restart, reconnect", now);
                return;
            }
            Phase::Done => return,
            Phase::Open { .. } | Phase::Draining { .. } => {}
        }
        if c.flush_at().is_some_and(|at| now >= at) {
            // Cleared whether or not the output can take the deliveries now (if it cannot,
            // the next writable socket takes them): a handled deadline never stays the next.
            c.phase = Phase::Open { flush_at: None };
            c.take_queued(now);
        }
        if c.auth.expires_at().is_some_and(|at| now >= at) {
            c.start_close(close::TOKEN_EXPIRED, "token expired", now);
            return;
        }
        let cfg = *c.cfg();
        match c
            .keepalive
            .on_timer(now, cfg.ping_interval, cfg.idle_timeout)
        {
            Due::Dead => c.start_close(close::GOING_AWAY, "keepalive timeout", now),
            Due::Ping => c.out.push(frame::encode_frame(frame::OP_PING, b"")),
            Due::Nothing => {}
        }
        c.advance();
    }
}

impl Conn {
    fn cfg(&self) -> &SessionConfig {
        self.ctx.config(self.mode)
    }

    /// Open or draining: requests are answered and deliveries go out.
    fn serving(&self) -> bool {
        matches!(self.phase, Phase::Open { .. } | Phase::Draining { .. })
    }

    fn is_peer_done(&self) -> bool {
        matches!(
            self.phase,
            Phase::Closing {
                peer_done: true,
                ..
            }
        )
    }

    /// Ends the connection when nothing is left to do.
    fn advance(&mut self) {
        let done = match self.phase {
            Phase::Closing { peer_done, .. } => self.out.is_empty() && (peer_done || self.eof),
            // The peer went away without a close handshake.
            Phase::Open { .. } | Phase::Draining { .. } => self.eof,
            Phase::Done => true,
        };
        if done {
            self.phase = Phase::Done;
        }
    }

    fn queue_is_empty(&self) -> bool {
        self.pubsub.as_ref().is_none_or(|p| p.queue().is_empty())
    }

    fn queue_overflowed(&self) -> bool {
        self.pubsub
            .as_ref()
            .is_some_and(|p| p.queue().is_overflowed())
    }

    /// Moves the hub's deliveries to the output unless it is backed up (a slow reader): then
    /// they stay in the queue so that its bound applies, and only an overflow is noticed.
    fn take_queued(&mut self, now: Instant) {
        if !self.serving() {
            return;
        }
        if self.out.len() >= WRITE_BATCH {
            if self.queue_overflowed() {
                self.slow_consumer(now);
            }
        } else {
            self.deliver(now);
        }
    }

    /// When an open connection's delayed deliveries are due (`write_delay`).
    fn flush_at(&self) -> Option<Instant> {
        match self.phase {
            Phase::Open { flush_at } => flush_at,
            _ => None,
        }
    }

    /// Moves the hub's deliveries to the output.
    fn deliver(&mut self, now: Instant) {
        if let Phase::Open { flush_at } = &mut self.phase {
            *flush_at = None;
        }
        let overflowed = self
            .pubsub
            .as_ref()
            .is_some_and(|p| p.deliver(&mut self.out) == Err(Overflowed));
        if overflowed {
            self.slow_consumer(now);
        }
    }

    fn slow_consumer(&mut self, now: Instant) {
        if !self.serving() {
            return;
        }
        self.ctx.metrics.slow_consumers.increment(1);
        self.out.drop_unstarted();
        self.start_close(
            close::SLOW_CONSUMER,
            "slow consumer: outbound queue overflowed",
            now,
        );
    }

    /// Queues our close frame and starts waiting for the peer's (once).
    fn start_close(&mut self, code: u16, reason: &str, now: Instant) {
        if !self.serving() {
            return;
        }
        if let Some(p) = &self.pubsub {
            p.queue().close();
        }
        self.out.push(frame::encode_close(code, reason));
        self.ctx.metrics.close_sent(code);
        self.phase = Phase::Closing {
            deadline: now + self.cfg().close_timeout,
            peer_done: false,
        };
    }

    /// Closes with `code` and hangs up once the close frame is written.
    fn fail(&mut self, code: u16, reason: &str, now: Instant) {
        self.start_close(code, reason, now);
        self.peer_done();
    }

    fn peer_done(&mut self) {
        if let Phase::Closing { peer_done, .. } = &mut self.phase {
            *peer_done = true;
        }
    }

    fn on_message(&mut self, msg: Message<'_>, now: Instant) -> Flow {
        if let Message::Close(c) = msg {
            // The echo of the peer's close is bounded by the close deadline too: a peer that
            // closes and then stops reading must not keep the slot.
            self.start_close(c.map_or(close::NORMAL, |(code, _)| code), "", now);
            self.peer_done();
            return Flow::Stop;
        }
        if !self.serving() {
            // Closing: data and pings are ignored while we wait for the peer's close.
            return Flow::Continue;
        }
        if matches!(msg, Message::Pong(_)) {
            return Flow::Continue;
        }
        let cfg = *self.cfg();
        if !self.rate.take(now, cfg.rate_per_sec, cfg.rate_burst) {
            self.fail(close::POLICY_VIOLATION, "message rate limit exceeded", now);
            return Flow::Stop;
        }
        match (msg, &mut self.pubsub) {
            (Message::Ping(p), _) => self.out.push(frame::encode_frame(frame::OP_PONG, p)),
            (Message::Text(t), None) => self
                .out
                .push(frame::encode_frame(frame::OP_TEXT, t.as_bytes())),
            (Message::Binary(b), None) => {
                self.out.push(frame::encode_frame(frame::OP_BINARY, b));
            }
            (Message::Text(t), Some(p)) => {
                let metrics = &self.ctx.metrics;
                let r = p.on_request(
                    t.as_bytes(),
                    &mut self.out,
                    cfg.max_subscriptions,
                    metrics,
                    &mut self.auth,
                    now,
                );
                match r {
                    Ok(()) => {}
                    Err(Stop::Overflowed) => self.slow_consumer(now),
                    Err(Stop::Unauthorized(failure)) => {
                        metrics.auth_failure(failure);
                        self.fail(close::UNAUTHORIZED, failure.reason(), now);
                        return Flow::Stop;
                    }
                }
            }
            (Message::Binary(_), Some(_)) => {
                super::pubsub::binary_not_supported(&mut self.out, &self.ctx.metrics);
            }
            (Message::Close(_) | Message::Pong(_), _) => {}
        }
        Flow::Continue
    }
}

#[cfg(test)]
mod tests;
