//! A session's output: whole frames waiting to be written, the first perhaps partly.
//!
//! Frames are `Bytes` shared with the hub (a published message is encoded once for every
//! subscriber), so queuing one costs a reference count, and everything waiting is written
//! with one vectored write, bounded per call in frames ([`WRITE_BATCH`]) and bytes
//! ([`WRITE_BYTES`]): one system call carries as many deliveries as are waiting, instead of
//! one call per frame. A write the socket takes only part of ends the attempt (the send
//! buffer is full; the driver waits for writability). The buffer is given back once a burst
//! has drained, so an idle connection keeps no large ring.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::Bytes;

/// Most frames per vectored write call.
pub(crate) const WRITE_BATCH: usize = 64;

/// Most bytes per write call (the first frame goes whole whatever its size): enough to carry
/// a burst in one call, small enough that one connection's backlog does not hold a worker
/// thread copying for long.
pub(crate) const WRITE_BYTES: usize = 64 * 1024;

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

    /// Writes until everything is written (`Ok(true)`) or `dst` would block or took only
    /// part of a write (`Ok(false)`). Each call to `dst` carries up to [`WRITE_BATCH`] frames
    /// and [`WRITE_BYTES`] bytes; a second call is made only when the first was taken whole
    /// and more is waiting.
    pub(crate) fn write_to(&mut self, dst: &mut impl Write) -> io::Result<bool> {
        while !self.frames.is_empty() {
            let mut iov = [IoSlice::new(&[]); WRITE_BATCH];
            let mut n = 0;
            let mut offered = 0;
            for (i, f) in self.frames.iter().take(WRITE_BATCH).enumerate() {
                let bytes = if i == 0 {
                    f.get(self.offset..).unwrap_or_default()
                } else {
                    &f[..]
                };
                if i > 0 && offered + bytes.len() > WRITE_BYTES {
                    break;
                }
                if let Some(slot) = iov.get_mut(i) {
                    *slot = IoSlice::new(bytes);
                    n = i + 1;
                    offered += bytes.len();
                }
            }
            let written = match dst.write_vectored(iov.get(..n).unwrap_or_default()) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            self.advance(written);
            if written < offered {
                // The send buffer is full: trying again now would only return `WouldBlock`.
                return Ok(false);
            }
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

    /// Counts the calls and what each carried.
    #[derive(Default)]
    struct Calls {
        calls: Vec<(usize, usize)>,
    }

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let n = bufs.iter().map(|b| b.len()).sum();
            self.calls.push((bufs.len(), n));
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn everything_waiting_goes_in_one_call_bounded_in_frames_and_bytes() {
        let mut out = Output::default();
        out.extend((0..10).map(|_| Bytes::from_static(b"0123456789")));
        let mut w = Calls::default();
        assert!(out.write_to(&mut w).unwrap());
        assert_eq!(w.calls, vec![(10, 100)], "ten frames, one call");

        out.extend((0..WRITE_BATCH + 1).map(|_| Bytes::from_static(b"x")));
        let mut w = Calls::default();
        assert!(out.write_to(&mut w).unwrap());
        assert_eq!(w.calls, vec![(WRITE_BATCH, WRITE_BATCH), (1, 1)]);

        let big = Bytes::from(vec![7u8; WRITE_BYTES / 2 + 1]);
        out.extend([
            big.clone(),
            big.clone(),
            Bytes::from(vec![1u8; 2 * WRITE_BYTES]),
        ]);
        let mut w = Calls::default();
        assert!(out.write_to(&mut w).unwrap());
        let sizes: Vec<_> = w.calls.iter().map(|c| c.1).collect();
        // A frame beyond the byte bound waits for the next call; one larger than the bound
        // still goes whole.
        assert_eq!(sizes, vec![big.len(), big.len(), 2 * WRITE_BYTES]);
    }

    #[test]
    fn a_short_write_ends_the_attempt() {
        let mut out = Output::default();
        out.extend((0..3).map(|_| Bytes::from_static(b"abcd")));
        // Takes 5 bytes, and would take more if asked again at once (a socket's buffer that
        // freed up in between): not asked.
        struct Once(usize, usize);
        impl Write for Once {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.write_vectored(&[IoSlice::new(buf)])
            }
            fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                self.1 += 1;
                let n: usize = bufs.iter().map(|b| b.len()).sum();
                Ok(n.min(self.0))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = Once(5, 0);
        assert!(!out.write_to(&mut w).unwrap());
        assert_eq!(w.1, 1);
        assert_eq!(out.len(), 2);
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
