//! Non-blocking socket I/O for the per-connection loops of ws-lb's relay and ws-shard's
//! sessions. Both are sans-IO state machines that read from `std::io::Read` and write to
//! `std::io::Write` (as rustls does): [`Nonblocking`] is that view of a tokio `TcpStream`,
//! a call that would block returns `WouldBlock` and the driver waits for readiness again.
//!
//! Two costs dominate a relayed delivery besides the kernel's TCP work: zeroing a fresh read
//! buffer on every wake-up, and the extra `read` that returns `WouldBlock` before tokio
//! forgets a socket's readiness. [`with_buffer`] lends a per-thread buffer (zeroed once, at
//! thread start); [`read_drained`] treats a short read as having drained the socket and
//! clears tokio's readiness in the same call, saving that extra syscall. Clearing is safe:
//! tokio only forgets readiness that has not been renewed by a newer event, so data arriving
//! after our read wakes the task again. Writes do the same ([`write_drained`]): a write the
//! kernel took only part of found the send buffer full, so the `write` that would follow only
//! to get `EAGAIN` is skipped; the socket's next `EPOLLOUT` (the kernel sends one when space
//! frees up after a short write) wakes the writer again.
//!
//! [`Signal`] is the drain as those loops wait for it: registered once per connection,
//! then one atomic load per wake-up instead of two locks of process-wide mutexes.

mod signal;

pub use signal::{Signal, Waiter};

use std::cell::RefCell;
use std::io::{self, IoSlice, Read, Write};
use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Size of the per-thread read buffer.
pub const READ_BUFFER: usize = 32 * 1024;

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0; READ_BUFFER]);
}

/// Runs `f` with this thread's read buffer. `f` must not call `with_buffer` itself.
pub fn with_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    BUFFER.with(|b| match b.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        // Re-entered (a bug, but not worth a panic): use a temporary buffer.
        Err(_) => f(&mut vec![0; READ_BUFFER]),
    })
}

/// One non-blocking read into `buf`. `Ok(0)` is end of stream; `WouldBlock` means no data.
/// A read shorter than `buf` also clears the socket's read readiness.
pub fn read_drained(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let want = buf.len();
    drained(stream, Interest::READABLE, want, |mut sock| sock.read(buf))
}

/// One non-blocking vectored write of `bufs`. `WouldBlock` means the socket took nothing; a
/// write shorter than `bufs` returns its length and clears the socket's write readiness (the
/// send buffer is full), so the caller waits for writability instead of trying again at once.
pub fn write_drained(stream: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let want = bufs.iter().map(|b| b.len()).sum();
    drained(stream, Interest::WRITABLE, want, |mut sock| {
        sock.write_vectored(bufs)
    })
}

/// Runs one non-blocking `op` on the socket for `interest`. A result short of `want` bytes is
/// returned as it is and clears tokio's readiness for `interest` in the same call (the socket
/// was drained, or its send buffer filled), saving the syscall that would only find
/// `WouldBlock`.
fn drained(
    stream: &TcpStream,
    interest: Interest,
    want: usize,
    op: impl FnOnce(&socket2::Socket) -> io::Result<usize>,
) -> io::Result<usize> {
    let mut short = None;
    let r = stream.try_io(interest, || {
        let sock = socket2::SockRef::from(stream);
        let n = op(&sock)?;
        if n > 0 && n < want {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, short) {
        (_, Some(n)) => Ok(n),
        (r, None) => r,
    }
}

/// What a per-connection loop reads from and writes to: a socket (`TcpStream`), or one
/// stream of a multiplexed tier link (`tier-mux`). Readiness is polled in place (the waker
/// is kept by the transport, not in the caller's future); reads and writes never block and
/// return `WouldBlock` when not ready.
pub trait Transport {
    /// Ready when a read would not block (data, end of stream, or an error).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Ready when a write would not block (room, or an error).
    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// One non-blocking read. `Ok(0)` is end of stream.
    fn read_nonblocking(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// One non-blocking vectored write.
    fn write_nonblocking(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

impl Transport for TcpStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_write_ready(self, cx)
    }

    fn read_nonblocking(&self, buf: &mut [u8]) -> io::Result<usize> {
        read_drained(self, buf)
    }

    fn write_nonblocking(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        write_drained(self, bufs)
    }
}

/// A [`Transport`] as `std::io::Read + Write`, for one non-blocking call at a time: a
/// `TcpStream`'s reads go through [`read_drained`], its writes through [`write_drained`], and
/// either returns `WouldBlock` when the socket is not ready.
#[derive(Debug, Clone, Copy)]
pub struct Nonblocking<'a, T: ?Sized = TcpStream>(pub &'a T);

impl<T: Transport + ?Sized> Read for Nonblocking<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read_nonblocking(buf)
    }
}

impl<T: Transport + ?Sized> Write for Nonblocking<'_, T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_nonblocking(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.write_nonblocking(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn short_reads_clear_readiness_and_new_data_wakes_again() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        client.write_all(b"hello").await.unwrap();
        server.readable().await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(read_drained(&server, &mut buf).unwrap(), 5);
        // Readiness was cleared: nothing is pending, so readable() waits...
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), server.readable()).await;
        assert!(waited.is_err());
        // ...until new data arrives.
        client.write_all(b"again").await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(2), server.readable())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read_drained(&server, &mut buf).unwrap(), 5);
        drop(client);
        server.readable().await.unwrap();
        assert_eq!(read_drained(&server, &mut buf).unwrap(), 0);
        assert_eq!(with_buffer(|b| b.len()), READ_BUFFER);
    }

    #[tokio::test]
    async fn a_short_write_clears_readiness_and_freed_space_wakes_again() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        // Fill the connection (the peer reads nothing) until a write is short or refused.
        let short = loop {
            server.writable().await.unwrap();
            match write_drained(&server, &[IoSlice::new(&chunk)]) {
                Ok(n) if n < chunk.len() => break Some(n + sent),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(e) => panic!("{e}"),
            }
        };
        sent = short.unwrap_or(sent);
        // Readiness was cleared: writable() waits...
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), server.writable()).await;
        assert!(waited.is_err(), "writable at once after a full send buffer");
        // ...until the peer takes the bytes.
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < sent {
            client.readable().await.unwrap();
            match read_drained(&client, &mut buf) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), server.writable())
            .await
            .unwrap()
            .unwrap();
        assert!(write_drained(&server, &[IoSlice::new(b"more")]).unwrap() > 0);
    }

    #[tokio::test]
    async fn nonblocking_reads_and_writes_without_waiting() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 16];
        let e = Nonblocking(&server).read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        client.writable().await.unwrap();
        let n = Nonblocking(&client)
            .write_vectored(&[IoSlice::new(b"ab"), IoSlice::new(b"cd")])
            .unwrap();
        assert_eq!(n, 4);
        server.readable().await.unwrap();
        assert_eq!(Nonblocking(&server).read(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"abcd");
    }
}
