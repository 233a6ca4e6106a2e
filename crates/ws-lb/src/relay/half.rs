//! One direction of a relay: bytes read from a source on their way to a destination.
//!
//! A read is written on at once; only what the destination does not take waits in
//! `pending`, and the source is not read again until that is flushed, so backpressure
//! travels to the sender through TCP and an idle direction holds no buffer. A
//! [`FrameTracker`] follows the frame boundaries of what passed.

use std::io::{self, Read, Write};
use std::time::Duration;

use tokio::time::Instant;
use ws_protocol::frame::FrameTracker;

/// Reads per readiness wake-up before letting the other direction run.
const BUDGET: usize = 8;

/// One direction: bytes read from a source, on their way to a destination.
#[derive(Debug, Default)]
pub(super) struct Half {
    /// Bytes read but not yet taken by the destination.
    pub(super) pending: Vec<u8>,
    offset: usize,
    /// While bytes are pending: since when the destination has taken none of them (moved
    /// on every write that makes progress); it stalls at this plus `stall_timeout`.
    waiting_since: Option<Instant>,
    pub(super) tracker: FrameTracker,
    /// The source reached EOF or failed.
    pub(super) eof: bool,
}

impl Half {
    pub(super) fn has_pending(&self) -> bool {
        self.offset < self.pending.len()
    }

    /// Reads from `src` and writes to `dst` (or discards when `forward` is false) until the
    /// source would block, the budget is spent, or `dst` is full. With `to_boundary`, reads
    /// stop exactly at the end of the current frame, so that a frame of the LB's own can
    /// follow it.
    pub(super) fn pump(
        &mut self,
        buf: &mut [u8],
        src: &mut impl Read,
        dst: &mut impl Write,
        forward: bool,
        to_boundary: bool,
        now: Instant,
    ) {
        let chunk = buf.len();
        for _ in 0..BUDGET {
            if self.has_pending() || self.eof {
                return;
            }
            let limit = if to_boundary {
                match self.tracker.bytes_to_boundary() {
                    Some(0) => return,
                    Some(n) => usize::try_from(n).unwrap_or(chunk).min(chunk),
                    // Inside a header: take it byte by byte (at most 14).
                    None => 1,
                }
            } else {
                chunk
            };
            let n = match src.read(buf.get_mut(..limit).unwrap_or_default()) {
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
            match dst.write(data) {
                Ok(w) if w == n => {}
                Ok(w) => self.stash(data.get(w..).unwrap_or_default(), now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stash(data, now),
                // The destination failed; its own read side will report it.
                Err(_) => return,
            }
            if n < limit {
                return;
            }
        }
    }

    fn stash(&mut self, rest: &[u8], now: Instant) {
        self.pending.clear();
        self.pending.extend_from_slice(rest);
        self.offset = 0;
        self.arm_stall(now);
    }

    /// Forgets what was waiting for a destination that failed.
    pub(super) fn drop_pending(&mut self) {
        self.pending = Vec::new();
        self.offset = 0;
        self.waiting_since = None;
    }

    /// Starts the stall clock when bytes begin to wait (a running clock is left alone).
    fn arm_stall(&mut self, now: Instant) {
        if self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
    }

    /// When the destination will have taken nothing of what waits for it for `timeout`
    /// (None when nothing waits).
    pub(super) fn stall_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.waiting_since.map(|t| t + timeout)
    }

    /// Queues bytes of the LB's own (a close frame, the handshake's leftovers) after what is
    /// pending.
    pub(super) fn inject(&mut self, bytes: &[u8], now: Instant) {
        if !self.has_pending() {
            self.pending.clear();
            self.offset = 0;
        }
        self.pending.extend_from_slice(bytes);
        if self.has_pending() {
            self.arm_stall(now);
        }
    }

    /// Writes what is pending to `dst` until it is all taken or `dst` would block.
    pub(super) fn flush(&mut self, dst: &mut impl Write, now: Instant) -> io::Result<()> {
        let start = self.offset;
        while self.has_pending() {
            let rest = self.pending.get(self.offset..).unwrap_or_default();
            match dst.write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.offset += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.offset > start {
                        // The destination took some bytes: the stall clock restarts.
                        self.waiting_since = Some(now);
                    }
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        // Give the buffer back once drained: it was only needed while the peer was slow.
        self.drop_pending();
        Ok(())
    }
}
