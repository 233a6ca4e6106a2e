//! A session's output: whole frames waiting to be written, the first perhaps partly.
//!
//! Frames are `Bytes` shared with the hub (a published message is encoded once for every
//! subscriber), so queuing one costs a reference count, and they are written with one
//! vectored write per batch. The buffer is given back once a burst has drained, so an idle
//! connection keeps no large ring.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::Bytes;

/// Frames written per vectored write call.
pub(crate) const WRITE_BATCH: usize = 64;

#[derive(Debug, Default)]
pub(crate) struct Output {
    frames: VecDeque<Bytes>,
    /// Bytes of `frames.front()` already written.
    offset: usize,
}

impl Output {
    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames waiting, the partly written one included.
    pub(crate) fn len(&self) -> usize {
        self.frames.len()
    }

    pub(crate) fn push(&mut self, frame: Bytes) {
        self.frames.push_back(frame);
    }

    pub(crate) fn extend(&mut self, frames: impl IntoIterator<Item = Bytes>) {
        self.frames.extend(frames);
    }

    /// The queue to move frames into (`ConnQueue::drain_into`).
    pub(crate) fn frames_mut(&mut self) -> &mut VecDeque<Bytes> {
        &mut self.frames
    }

    /// Drops every frame not yet started; a partly written frame stays, since cutting it
    /// would corrupt the stream.
    pub(crate) fn drop_unstarted(&mut self) {
        self.frames.truncate(usize::from(self.offset > 0));
    }

    /// Drops everything (the peer is given up on).
    pub(crate) fn clear(&mut self) {
        self.frames.clear();
        self.offset = 0;
    }

    /// Writes until everything is written (`Ok(true)`) or `dst` would block (`Ok(false)`).
    pub(crate) fn write_to(&mut self, dst: &mut impl Write) -> io::Result<bool> {
        while !self.frames.is_empty() {
            let mut iov = [IoSlice::new(&[]); WRITE_BATCH];
            let mut n = 0;
            for (i, f) in self.frames.iter().take(WRITE_BATCH).enumerate() {
                let bytes = if i == 0 {
                    f.get(self.offset..).unwrap_or_default()
                } else {
                    &f[..]
                };
                if let Some(slot) = iov.get_mut(i) {
                    *slot = IoSlice::new(bytes);
                    n = i + 1;
                }
            }
            let written = match dst.write_vectored(iov.get(..n).unwrap_or_default()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            self.advance(written);
        }
        if self.frames.capacity() > 4 * WRITE_BATCH {
            self.frames = VecDeque::new();
        }
        Ok(true)
    }

    fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let Some(front) = self.frames.front() else {
                return;
            };
            let left = front.len() - self.offset;
            if written >= left {
                written -= left;
                self.frames.pop_front();
                self.offset = 0;
            } else {
                self.offset += written;
                written = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes at most `room` bytes, then would block.
    struct Window {
        room: usize,
        got: Vec<u8>,
    }

    impl Write for Window {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.room - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
            }
            self.room -= n;
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_resume_where_they_stopped_and_never_cut_a_started_frame() {
        let mut out = Output::default();
        for f in ["abc", "defg", "hi"] {
            out.push(Bytes::from(f));
        }
        let mut w = Window {
            room: 5,
            got: Vec::new(),
        };
        assert!(!out.write_to(&mut w).unwrap());
        assert_eq!(w.got, b"abcde");
        out.drop_unstarted();
        assert_eq!(out.len(), 1, "the started frame stays");
        w.room = 100;
        assert!(out.write_to(&mut w).unwrap());
        assert_eq!(w.got, b"abcdefg");
        assert!(out.is_empty());
    }

    #[test]
    fn a_drained_burst_gives_its_buffer_back() {
        let mut out = Output::default();
        out.extend((0..1000).map(|_| Bytes::from_static(b"x")));
        let mut w = Window {
            room: 10_000,
            got: Vec::new(),
        };
        assert!(out.write_to(&mut w).unwrap());
        assert_eq!(out.frames.capacity(), 0);
    }
}
