//! Relaying one client's WebSocket to its shard, byte for byte, while tracking frame
//! boundaries in both directions.
//!
//! The relay does not decode or re-encode frames: bytes read from one socket are written to
//! the other as they are, so the shard stays the only WebSocket endpoint the client talks
//! to (conformance, masking checks, size limits all happen there). What the relay adds is a
//! [`FrameTracker`] per direction, so that when the shard disappears or the LB drains, it can
//! put a close frame of its own (1012) into the client's stream *between* two frames.
//!
//! Memory: reads go into a per-thread buffer (`net_core::io`), so an idle relayed connection
//! holds no buffer; a heap buffer exists only while a destination
//! socket is full, and it holds at most one read's worth of bytes because the source is not
//! read again until it is flushed (backpressure travels to the sender through TCP).

use std::io;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use ws_protocol::close;
use ws_protocol::frame::{self, FrameTracker};

/// Bytes moved per read, into the thread's buffer (net_core::io), not a per-connection one.
const CHUNK: usize = net_core::io::READ_BUFFER;
/// Reads per readiness wake-up before letting the other direction run.
const BUDGET: usize = 8;

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
    /// One of each kind (for registering every `ws_lb_relay_ends_total` series at zero).
    pub const KINDS: [RelayEnd; 5] = [
        RelayEnd::Closed,
        RelayEnd::ClientGone,
        RelayEnd::ShardLost { notified: true },
        RelayEnd::Drained,
        RelayEnd::ClientStalled,
    ];

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

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// How long to wait for the client's close frame after the LB sent one.
    pub close_timeout: Duration,
    /// On drain, the 1012 goes out at a random moment within this window.
    pub drain_window: Duration,
    /// A destination that accepts no byte of what is waiting for it for this long is given
    /// up on: a client that stopped reading is dropped (its shard has long since closed it
    /// as a slow consumer, but that close sits behind the data the client is not taking);
    /// a shard that stopped reading is treated as lost (1012 to the client).
    pub stall_timeout: Duration,
    /// Cancelled when the LB starts draining.
    pub drain: CancellationToken,
}

#[derive(Debug)]
struct Half {
    /// Bytes read but not yet written to the destination.
    pending: Vec<u8>,
    offset: usize,
    /// While bytes are pending: since when the destination has taken none of them (moved
    /// on every write that makes progress); it stalls at this plus `stall_timeout`.
    waiting_since: Option<Instant>,
    tracker: FrameTracker,
    /// The source reached EOF or failed.
    eof: bool,
}

impl Half {
    fn new() -> Self {
        Self {
            pending: Vec::new(),
            offset: 0,
            waiting_since: None,
            tracker: FrameTracker::default(),
            eof: false,
        }
    }

    fn has_pending(&self) -> bool {
        self.offset < self.pending.len()
    }

    /// Reads from `src` and writes to `dst` (or discards when `forward` is false) until the
    /// source would block, the budget is spent, or `dst` is full.
    ///
    /// With `to_boundary`, reads stop exactly at the end of the current frame, so that a frame
    /// of the LB's own can follow it.
    fn pump(&mut self, src: &TcpStream, dst: &TcpStream, forward: bool, to_boundary: bool) {
        net_core::io::with_buffer(|buf| self.pump_with(buf, src, dst, forward, to_boundary));
    }

    fn pump_with(
        &mut self,
        buf: &mut [u8],
        src: &TcpStream,
        dst: &TcpStream,
        forward: bool,
        to_boundary: bool,
    ) {
        for _ in 0..BUDGET {
            if self.has_pending() || self.eof {
                return;
            }
            let limit = if to_boundary {
                match self.tracker.bytes_to_boundary() {
                    Some(0) => return,
                    Some(n) => usize::try_from(n).unwrap_or(CHUNK).min(CHUNK),
                    // Inside a header: take it byte by byte (at most 14).
                    None => 1,
                }
            } else {
                CHUNK
            };
            let n = match net_core::io::read_drained(src, buf.get_mut(..limit).unwrap_or_default())
            {
                Ok(0) => {
                    self.eof = true;
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.eof = true;
                    return;
                }
            };
            let data = buf.get(..n).unwrap_or_default();
            self.tracker.observe(data);
            if !forward {
                continue;
            }
            match dst.try_write(data) {
                Ok(w) if w == n => {}
                Ok(w) => self.stash(data.get(w..).unwrap_or_default()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stash(data),
                // The destination failed; its own read side will report it.
                Err(_) => return,
            }
            if n < limit {
                return;
            }
        }
    }

    fn stash(&mut self, rest: &[u8]) {
        self.pending.clear();
        self.pending.extend_from_slice(rest);
        self.offset = 0;
        self.arm_stall();
    }

    /// Forgets what was waiting for a destination that failed.
    fn drop_pending(&mut self) {
        self.pending = Vec::new();
        self.offset = 0;
        self.waiting_since = None;
    }

    /// Starts the stall clock when bytes begin to wait (a running clock is left alone).
    fn arm_stall(&mut self) {
        if self.waiting_since.is_none() {
            self.waiting_since = Some(Instant::now());
        }
    }

    /// When the destination will have taken nothing of what waits for it for `timeout`
    /// (None when nothing waits).
    fn stall_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.waiting_since.map(|t| t + timeout)
    }

    /// Queues bytes of the LB's own (a close frame) after what is pending.
    fn inject(&mut self, bytes: &[u8]) {
        if !self.has_pending() {
            self.pending.clear();
            self.offset = 0;
        }
        self.pending.extend_from_slice(bytes);
        if self.has_pending() {
            self.arm_stall();
        }
    }

    fn flush(&mut self, dst: &TcpStream) -> io::Result<()> {
        let start = self.offset;
        while self.has_pending() {
            let rest = self.pending.get(self.offset..).unwrap_or_default();
            match dst.try_write(rest) {
                Ok(n) => self.offset += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.offset > start {
                        // The destination took some bytes: the stall clock restarts.
                        self.waiting_since = Some(Instant::now());
                    }
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        // Give the buffer back once drained: it was only needed while the peer was slow.
        self.pending = Vec::new();
        self.offset = 0;
        self.waiting_since = None;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Relaying both ways.
    Open,
    /// The LB sent the client a close frame; waiting for the client's close or EOF.
    Closing { deadline: Instant },
}

/// Runs the relay until the connection ends. `client_prefix` and `shard_prefix` are bytes
/// already read from each side during the handshakes.
pub async fn relay(
    client: TcpStream,
    client_prefix: Bytes,
    shard: TcpStream,
    shard_prefix: Bytes,
    opts: &RelayOptions,
    on_lb_close: &(dyn Fn(u16) + Sync),
) -> RelayEnd {
    let mut up = Half::new();
    let mut down = Half::new();
    up.tracker.observe(&client_prefix);
    up.inject(&client_prefix);
    down.tracker.observe(&shard_prefix);
    down.inject(&shard_prefix);
    drop((client_prefix, shard_prefix));
    let mut phase = Phase::Open;
    let mut end: Option<RelayEnd> = None;
    let mut want_close: Option<(u16, &'static str, RelayEnd)> = None;
    let mut drain_at: Option<Instant> = None;
    let mut shard_open = true;
    // Once the shard has gone, what is left for the client (its close frame) is flushed for
    // at most `close_timeout`: a client that stopped reading must not pin the connection.
    let mut flush_deadline: Option<Instant> = None;
    let far = Instant::now() + Duration::from_secs(86_400 * 365);

    loop {
        // Decide what the state of both halves means before waiting again.
        if phase == Phase::Open {
            if down.eof && !down.has_pending() {
                if down.tracker.close_seen() {
                    return end.unwrap_or(RelayEnd::Closed);
                }
                want_close.get_or_insert((
                    close::SERVICE_RESTART,
                    "shard connection lost, reconnect",
                    RelayEnd::ShardLost { notified: true },
                ));
            }
            if up.eof {
                // The client is gone: dropping the shard socket lets the shard free the slot.
                return if up.tracker.close_seen() {
                    RelayEnd::Closed
                } else {
                    RelayEnd::ClientGone
                };
            }
            if let Some((code, reason, outcome)) = want_close {
                if down.tracker.at_boundary() {
                    down.inject(&frame::encode_close(code, reason));
                    on_lb_close(code);
                    end = Some(outcome);
                    phase = Phase::Closing {
                        deadline: Instant::now() + opts.close_timeout,
                    };
                    if shard_open && !down.eof && up.tracker.at_boundary() && !up.has_pending() {
                        // Tell the shard too, so it frees the slot at once; best effort.
                        let bye = frame::encode_masked_frame(
                            frame::OP_CLOSE,
                            &frame::close_payload(close::GOING_AWAY, "client leaving"),
                            rand::random(),
                        );
                        let _ = shard.try_write(&bye);
                    }
                    shard_open = false;
                } else if down.eof {
                    // Mid-frame and the rest will never come: nothing valid can be sent.
                    return RelayEnd::ShardLost { notified: false };
                }
            }
        }
        if let Phase::Closing { .. } = phase {
            let client_done = up.eof || up.tracker.close_seen();
            if client_done && !down.has_pending() {
                return end.unwrap_or(RelayEnd::Closed);
            }
        }
        if down.eof && down.has_pending() && flush_deadline.is_none() {
            flush_deadline = Some(Instant::now() + opts.close_timeout);
        }
        let closing = matches!(phase, Phase::Closing { .. });
        // In a block, so that none of these stays in the task's state across the await
        // (every relayed connection pays for each byte of it).
        let (timer_at, timer_armed) = {
            let timer_at = match phase {
                Phase::Closing { deadline } => deadline,
                Phase::Open => drain_at.unwrap_or(far),
            };
            let timer_at = flush_deadline.map_or(timer_at, |d| d.min(timer_at));
            let up_stall = up.stall_deadline(opts.stall_timeout).filter(|_| shard_open);
            let stall_at = down
                .stall_deadline(opts.stall_timeout)
                .into_iter()
                .chain(up_stall)
                .min();
            let armed = closing
                || flush_deadline.is_some()
                || stall_at.is_some()
                || (drain_at.is_some() && want_close.is_none());
            (stall_at.map_or(timer_at, |d| d.min(timer_at)), armed)
        };
        let to_boundary = want_close.is_some();
        tokio::select! {
            biased;
            _ = opts.drain.cancelled(), if drain_at.is_none() && !closing && want_close.is_none() => {
                let window = opts.drain_window.as_millis() as u64;
                let jitter = if window == 0 { 0 } else { rand::random::<u64>() % window };
                drain_at = Some(Instant::now() + Duration::from_millis(jitter));
            }
            r = client.writable(), if down.has_pending() => {
                if r.is_err() || down.flush(&client).is_err() {
                    return end.unwrap_or(RelayEnd::ClientGone);
                }
            }
            r = shard.writable(), if up.has_pending() && shard_open => {
                if r.is_err() || up.flush(&shard).is_err() {
                    up.drop_pending();
                    down.eof = true;
                }
            }
            r = client.readable(), if !up.has_pending() && !up.eof => {
                if r.is_err() { up.eof = true; } else { up.pump(&client, &shard, !closing && shard_open, false); }
            }
            r = shard.readable(), if !down.has_pending() && !down.eof && shard_open && !closing => {
                if r.is_err() { down.eof = true; } else { down.pump(&shard, &client, true, to_boundary); }
            }
            _ = sleep_until(timer_at), if timer_armed => {
                let now = Instant::now();
                if flush_deadline.is_some_and(|d| now >= d) {
                    // The client never took what the shard last sent (a slow consumer's close).
                    return end.unwrap_or(RelayEnd::ClientGone);
                }
                if down.stall_deadline(opts.stall_timeout).is_some_and(|d| now >= d) {
                    return RelayEnd::ClientStalled;
                }
                if shard_open && up.stall_deadline(opts.stall_timeout).is_some_and(|d| now >= d) {
                    // The shard stopped taking the client's bytes: handled as a lost shard.
                    up.drop_pending();
                    down.eof = true;
                }
                match phase {
                    Phase::Closing { deadline } if now >= deadline => return end.unwrap_or(RelayEnd::Closed),
                    Phase::Open if drain_at.is_some_and(|d| now >= d) => {
                        want_close.get_or_insert((close::SERVICE_RESTART, "load balancer restarting, reconnect", RelayEnd::Drained));
                    }
                    _ => {}
                }
            }
        }
    }
}
