//! One client WebSocket connection, from the first frame after the upgrade to the TCP close.
//!
//! A single task owns the socket and runs one `select!` loop over: socket readable, socket
//! writable (only while output is pending), the outbound queue's notification, the drain
//! signal, and one timer (keepalive, drain moment, close deadline). One task instead of a
//! reader/writer pair halves the per-connection task state and needs no channel between
//! halves; every branch is cancellation-safe because reads and writes are non-blocking
//! `try_read`/`try_write_vectored` calls made after readiness, never futures that could be
//! dropped halfway. Reads go into a per-thread buffer (`net_core::io`), so an idle
//! connection holds no read buffer at all.
//!
//! Close behaviour (codes in `ws_protocol::close`): a client close is echoed and the TCP
//! connection closed; a protocol violation sends its code and closes at once; a drain
//! (1012), a slow consumer (4000) or a dead peer (1001) sends the code and waits up to
//! `close_timeout` for the client's close frame.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::Bytes;
use rand::Rng;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use ws_protocol::frame::{self, Decoder, Flow, Limits, Message, Role};
use ws_protocol::{close, ChannelName, ClientMessage, ErrorCode, ServerMessage};

use crate::config::SessionConfig;
use crate::hub::{Hub, Subscriber};
use crate::metrics::{self as m, ShardMetrics};
use crate::queue::ConnQueue;
use crate::slots::SlotGuard;

/// Frames written per vectored write call.
const WRITE_BATCH: usize = 64;
/// Socket reads per readiness wake-up before yielding to other branches.
const READ_BUDGET: usize = 4;

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
    /// Cancelled when the shard starts draining.
    pub drain: CancellationToken,
}

/// Unsubscribes every channel when the session ends, whatever ends it (including a panic).
#[derive(Debug)]
struct Subscriptions {
    hub: Arc<Hub>,
    id: u64,
    channels: Vec<ChannelName>,
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        for c in self.channels.drain(..) {
            self.hub.unsubscribe(&c, self.id);
        }
    }
}

#[derive(Debug)]
struct State {
    ctx: Arc<ShardContext>,
    cfg: SessionConfig,
    mode: Mode,
    queue: Arc<ConnQueue>,
    subs: Subscriptions,
    out: VecDeque<Bytes>,
    /// Bytes of `out.front()` already written.
    out_offset: usize,
    close_received: bool,
    /// Close the TCP connection as soon as the output is flushed (protocol violations).
    finish_after_flush: bool,
    /// Set when our close frame is queued (`start_close`): from then on the only timer, and
    /// what `close_sent()` reads.
    close_deadline: Option<Instant>,
    read_done: bool,
    last_inbound: Instant,
    ping_sent: bool,
    drain_at: Option<Instant>,
    tokens: f64,
    refilled: Instant,
}

/// Runs the session until the connection is closed. `prefix` holds bytes the HTTP layer
/// read past the upgrade request. The slot is released when this returns.
pub async fn run(
    stream: TcpStream,
    prefix: Bytes,
    ctx: Arc<ShardContext>,
    mode: Mode,
    slot: SlotGuard,
) {
    let _slot = slot;
    let cfg = match mode {
        Mode::PubSub => ctx.pubsub,
        Mode::Echo => ctx.echo,
    };
    let now = Instant::now();
    let id = ctx.hub.next_subscriber_id();
    let mut decoder = Decoder::new(Role::Server, Limits::new(cfg.max_message_size));
    let mut st = State {
        queue: Arc::new(ConnQueue::new(cfg.outbound_queue)),
        subs: Subscriptions {
            hub: ctx.hub.clone(),
            id,
            channels: Vec::new(),
        },
        ctx,
        cfg,
        mode,
        out: VecDeque::new(),
        out_offset: 0,
        close_received: false,
        finish_after_flush: false,
        close_deadline: None,
        read_done: false,
        last_inbound: now,
        ping_sent: false,
        drain_at: None,
        tokens: f64::from(cfg.rate_burst),
        refilled: now,
    };
    if !prefix.is_empty() {
        let mut bytes = prefix.to_vec();
        st.process(&mut decoder, &mut bytes);
    }
    drop(prefix);
    let timer = sleep_until(st.next_deadline());
    tokio::pin!(timer);
    loop {
        if st.finished() {
            break;
        }
        let deadline = st.next_deadline();
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        let want_write = !st.out.is_empty();
        let listen_queue = st.mode == Mode::PubSub && !st.close_sent();
        let drain_armed = st.drain_at.is_none() && !st.close_sent();
        let result: io::Result<()> = tokio::select! {
            biased;
            r = stream.writable(), if want_write => match r {
                Ok(()) => st.flush(&stream),
                Err(e) => Err(e),
            },
            r = stream.readable(), if !st.read_done => match r {
                Ok(()) => st.on_readable(&stream, &mut decoder),
                Err(e) => Err(e),
            },
            _ = st.queue.notified(), if listen_queue => {
                st.on_queue();
                Ok(())
            },
            _ = st.ctx.drain.cancelled(), if drain_armed => {
                st.on_drain();
                Ok(())
            },
            _ = &mut timer => {
                st.on_timer();
                Ok(())
            },
        };
        if result.is_err() {
            // Reset, broken pipe: nothing more can be said to this peer.
            break;
        }
    }
    st.queue.close();
}

impl State {
    /// Whether our close frame is queued or sent (only `start_close` sets the deadline).
    fn close_sent(&self) -> bool {
        self.close_deadline.is_some()
    }

    fn finished(&self) -> bool {
        if self.close_sent()
            && self.out.is_empty()
            && (self.close_received || self.finish_after_flush)
        {
            return true;
        }
        // The peer went away without a close handshake.
        self.read_done && (self.out.is_empty() || !self.close_sent())
    }

    fn next_deadline(&self) -> Instant {
        // Closing: only the close handshake's deadline is left. The other timers act only on
        // an open connection, so one of them in the past would fire again and again without
        // changing anything (a busy loop until the close deadline).
        if let Some(at) = self.close_deadline {
            return at;
        }
        let mut d = self.last_inbound + self.cfg.idle_timeout;
        if !self.ping_sent {
            d = d.min(self.last_inbound + self.cfg.ping_interval);
        }
        if let Some(at) = self.drain_at {
            d = d.min(at);
        }
        d
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if let Some(deadline) = self.close_deadline {
            // Closing: the close deadline is the only timer left (see next_deadline).
            if now >= deadline {
                // The peer never answered our close: give up on the handshake.
                self.out.clear();
                self.out_offset = 0;
                self.finish_after_flush = true;
                self.read_done = true;
            }
            return;
        }
        if self.drain_at.is_some_and(|d| now >= d) {
            self.start_close(close::SERVICE_RESTART, "service restart, reconnect");
            return;
        }
        let idle = now.saturating_duration_since(self.last_inbound);
        if idle >= self.cfg.idle_timeout {
            self.start_close(close::GOING_AWAY, "keepalive timeout");
        } else if idle >= self.cfg.ping_interval && !self.ping_sent {
            self.ping_sent = true;
            self.out.push_back(frame::encode_frame(frame::OP_PING, b""));
        }
    }

    fn on_drain(&mut self) {
        let window = self.cfg.drain_window;
        let delay = if window.is_zero() {
            window
        } else {
            rand::rng().random_range(std::time::Duration::ZERO..=window)
        };
        self.drain_at = Some(Instant::now() + delay);
    }

    fn on_queue(&mut self) {
        if self.out.len() >= WRITE_BATCH {
            // Output is backed up; leave frames in the queue so its bound applies, but
            // still notice an overflow now.
            if self.queue.is_overflowed() {
                self.slow_consumer();
            }
            return;
        }
        if self.queue.drain_into(&mut self.out) {
            self.slow_consumer();
        }
    }

    fn slow_consumer(&mut self) {
        if self.close_sent() {
            return;
        }
        self.ctx.metrics.slow_consumers.increment(1);
        // Keep a partly written frame (cutting it would corrupt the stream), drop the rest.
        let keep = usize::from(self.out_offset > 0);
        self.out.truncate(keep);
        self.start_close(
            close::SLOW_CONSUMER,
            "slow consumer: outbound queue overflowed",
        );
    }

    fn start_close(&mut self, code: u16, reason: &str) {
        if self.close_sent() {
            return;
        }
        self.queue.close();
        self.out.push_back(frame::encode_close(code, reason));
        self.ctx.metrics.close_sent(code);
        self.close_deadline = Some(Instant::now() + self.cfg.close_timeout);
    }

    fn fail(&mut self, code: u16, reason: &str) {
        self.start_close(code, reason);
        self.finish_after_flush = true;
    }

    fn flush(&mut self, stream: &TcpStream) -> io::Result<()> {
        while !self.out.is_empty() {
            let mut iov = [IoSlice::new(&[]); WRITE_BATCH];
            let mut n = 0;
            for (i, f) in self.out.iter().take(WRITE_BATCH).enumerate() {
                let bytes = if i == 0 {
                    f.get(self.out_offset..).unwrap_or_default()
                } else {
                    &f[..]
                };
                if let Some(slot) = iov.get_mut(i) {
                    *slot = IoSlice::new(bytes);
                    n = i + 1;
                }
            }
            let written = match stream.try_write_vectored(iov.get(..n).unwrap_or_default()) {
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            self.advance(written);
        }
        if self.out.capacity() > 4 * WRITE_BATCH {
            self.out = VecDeque::new();
        }
        if !self.close_sent() && self.mode == Mode::PubSub && self.queue.drain_into(&mut self.out) {
            self.slow_consumer();
        }
        Ok(())
    }

    fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let Some(front) = self.out.front() else {
                return;
            };
            let left = front.len() - self.out_offset;
            if written >= left {
                written -= left;
                self.out.pop_front();
                self.out_offset = 0;
            } else {
                self.out_offset += written;
                written = 0;
            }
        }
    }

    fn on_readable(&mut self, stream: &TcpStream, decoder: &mut Decoder) -> io::Result<()> {
        net_core::io::with_buffer(|buf| self.read_into(buf, stream, decoder))
    }

    fn read_into(
        &mut self,
        buf: &mut [u8],
        stream: &TcpStream,
        decoder: &mut Decoder,
    ) -> io::Result<()> {
        for _ in 0..READ_BUDGET {
            if self.read_done {
                break;
            }
            match net_core::io::read_drained(stream, buf) {
                Ok(0) => {
                    self.read_done = true;
                }
                Ok(n) => {
                    self.last_inbound = Instant::now();
                    self.ping_sent = false;
                    if let Some(data) = buf.get_mut(..n) {
                        self.process(decoder, data);
                    }
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn process(&mut self, decoder: &mut Decoder, data: &mut [u8]) {
        if self.close_received || self.finish_after_flush {
            return;
        }
        let result = decoder.feed(data, &mut |msg| self.on_message(msg));
        if let Err(v) = result {
            self.fail(v.close_code, v.reason);
        }
    }

    fn take_token(&mut self) -> bool {
        if self.cfg.rate_per_sec == 0 {
            return true;
        }
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * f64::from(self.cfg.rate_per_sec))
            .min(f64::from(self.cfg.rate_burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn on_message(&mut self, msg: Message<'_>) -> Flow {
        if let Message::Close(c) = msg {
            self.close_received = true;
            if !self.close_sent() {
                // The echo of the peer's close is bounded by the close deadline too: a peer
                // that closes and then stops reading must not keep the slot.
                self.start_close(c.map_or(close::NORMAL, |(code, _)| code), "");
            }
            return Flow::Stop;
        }
        if self.close_sent() {
            // Closing: data and pings are ignored while we wait for the peer's close.
            return Flow::Continue;
        }
        if matches!(msg, Message::Pong(_)) {
            return Flow::Continue;
        }
        if !self.take_token() {
            self.fail(close::POLICY_VIOLATION, "message rate limit exceeded");
            return Flow::Stop;
        }
        match (msg, self.mode) {
            (Message::Ping(p), _) => self.out.push_back(frame::encode_frame(frame::OP_PONG, p)),
            (Message::Text(t), Mode::Echo) => self
                .out
                .push_back(frame::encode_frame(frame::OP_TEXT, t.as_bytes())),
            (Message::Binary(b), Mode::Echo) => {
                self.out.push_back(frame::encode_frame(frame::OP_BINARY, b))
            }
            (Message::Text(t), Mode::PubSub) => self.on_request(t.as_bytes()),
            (Message::Binary(_), Mode::PubSub) => self.error(
                ErrorCode::BinaryNotSupported,
                "send JSON text frames".into(),
                None,
            ),
            _ => {}
        }
        Flow::Continue
    }

    fn reply(&mut self, msg: &ServerMessage) {
        self.out.push_back(frame::encode_frame(
            frame::OP_TEXT,
            msg.to_json().as_bytes(),
        ));
    }

    fn error(&mut self, code: ErrorCode, message: String, channel: Option<String>) {
        metrics::counter!(m::ERROR_REPLIES, "code" => code.as_str()).increment(1);
        self.reply(&ServerMessage::Error {
            code,
            message,
            channel,
        });
    }

    fn on_request(&mut self, text: &[u8]) {
        match ClientMessage::decode(text) {
            Err(e) => self.error(e.code, e.message, None),
            Ok(ClientMessage::Ping { id }) => self.reply(&ServerMessage::Pong { id }),
            Ok(ClientMessage::Subscribe { channels, since }) => {
                for name in channels {
                    let channel = match ChannelName::new(&name) {
                        Ok(c) => c,
                        Err(e) => {
                            self.error(ErrorCode::InvalidChannel, e.to_string(), Some(name));
                            continue;
                        }
                    };
                    if self.subs.channels.contains(&channel) {
                        self.error(
                            ErrorCode::AlreadySubscribed,
                            "already subscribed".into(),
                            Some(name),
                        );
                        continue;
                    }
                    if self.subs.channels.len() >= self.cfg.max_subscriptions {
                        let msg = format!(
                            "at most {} subscriptions per connection",
                            self.cfg.max_subscriptions
                        );
                        self.error(ErrorCode::TooManySubscriptions, msg, Some(name));
                        continue;
                    }
                    let position = since.get(&name);
                    let sub = Subscriber {
                        id: self.subs.id,
                        shard: self.ctx.shard_id,
                        queue: self.queue.clone(),
                    };
                    let r = self.ctx.hub.subscribe(&channel, position, sub);
                    self.subs.channels.push(channel);
                    if position.is_some() {
                        let label = if r.recovered { "true" } else { "false" };
                        metrics::counter!(m::RECOVERIES, "recovered" => label).increment(1);
                    }
                    self.reply(&ServerMessage::Subscribed {
                        channel: name,
                        epoch: r.epoch.to_string(),
                        seq: r.seq,
                        recovered: r.recovered,
                    });
                    self.out.extend(r.replay);
                }
            }
            Ok(ClientMessage::Unsubscribe { channels }) => {
                for name in channels {
                    let pos = self.subs.channels.iter().position(|c| c.as_str() == name);
                    let Some(pos) = pos else {
                        self.error(
                            ErrorCode::NotSubscribed,
                            "not subscribed".into(),
                            Some(name),
                        );
                        continue;
                    };
                    let channel = self.subs.channels.swap_remove(pos);
                    self.ctx.hub.unsubscribe(&channel, self.subs.id);
                    // Everything queued before the unsubscribe goes out before the reply,
                    // nothing of the channel after it.
                    if self.queue.drain_into(&mut self.out) {
                        self.slow_consumer();
                        return;
                    }
                    self.reply(&ServerMessage::Unsubscribed { channel: name });
                }
            }
        }
    }
}
