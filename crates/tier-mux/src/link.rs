//! A link: one TCP connection carrying many streams, each a client connection's bytes.
//!
//! One task per link ([`Link::run`]) reads frames and hands each to its stream, and writes
//! what the streams queued — every frame queued since its last write, in one `write` — so a
//! burst of deliveries to many clients of one shard costs the shard one system call instead of
//! one per client. Streams ([`MuxStream`]) are `net_io::Transport`s: the same per-connection
//! loops that drive a `TcpStream` drive them.
//!
//! Flow control is per stream ([`WINDOW`] bytes in flight each way, given back with `CREDIT`
//! as the receiver reads), so one slow client never stops the link: its stream's writer
//! waits, as on a full socket, and the shard's slow-consumer rules apply as they do to a
//! socket. Queued output of the whole link is bounded too ([`OUT_LIMIT`]): above it every
//! stream's write waits until the link's writer has caught up.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::frame::{
    parse_header, put_header, FrameError, Kind, Open, Refusal, Reply, HEADER_LEN, MAX_PAYLOAD,
    WINDOW,
};

/// Bytes queued on a link above which streams' writes wait for its writer.
pub const OUT_LIMIT: usize = 1 << 20;

/// Consumed bytes a receiver gathers before it gives them back with one `CREDIT`.
const CREDIT_STEP: u32 = WINDOW / 4;

/// Which end of the link this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// ws-lb: opens streams.
    Lb,
    /// A shard: accepts or refuses them.
    Shard,
}

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link closed")]
    Closed,
    #[error("link i/o: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

/// What a shard does with a stream the LB opened (it answers with [`MuxStream::accept`] or
/// [`MuxStream::refuse`]).
pub type OnOpen = Box<dyn Fn(MuxStream, Open) + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent state (plain fields).
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A handle to a link (cheap to clone).
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("role", &self.shared.role)
            .field("dead", &self.is_dead())
            .field("streams", &self.streams())
            .finish()
    }
}

struct Shared {
    role: Role,
    on_open: Option<OnOpen>,
    out: Mutex<Out>,
    writer: Notify,
    streams: Mutex<HashMap<u32, Arc<StreamState>, foldhash::fast::RandomState>>,
    dead: AtomicBool,
    /// No new stream will be opened: the link ends once its last stream has.
    retiring: AtomicBool,
    next_id: AtomicU32,
}

#[derive(Default)]
struct Out {
    buf: Vec<u8>,
    /// Streams whose write found the link over [`OUT_LIMIT`].
    waiting: Vec<Weak<StreamState>>,
}

impl Shared {
    /// Queues a frame; `false` if the link is dead.
    fn push(&self, kind: Kind, id: u32, payload: &[u8]) -> bool {
        if self.dead.load(Ordering::Acquire) {
            return false;
        }
        self.queue(
            lock(&self.out),
            kind,
            id,
            payload.len(),
            &[IoSlice::new(payload)],
        );
        true
    }

    /// Appends a frame whose payload is the first `len` bytes of `parts` to the locked
    /// output, and wakes the writer if it found nothing to write.
    fn queue(
        &self,
        mut o: MutexGuard<'_, Out>,
        kind: Kind,
        id: u32,
        len: usize,
        parts: &[IoSlice<'_>],
    ) {
        let was_empty = o.buf.is_empty();
        put_header(&mut o.buf, kind, id, len);
        let mut left = len;
        for b in parts {
            let take = left.min(b.len());
            o.buf.put_slice(&b[..take]);
            left -= take;
            if left == 0 {
                break;
            }
        }
        drop(o);
        if was_empty {
            self.writer.notify_one();
        }
    }

    fn stream(&self, id: u32) -> Option<Arc<StreamState>> {
        lock(&self.streams).get(&id).cloned()
    }

    fn remove(&self, state: &Arc<StreamState>) {
        let mut m = lock(&self.streams);
        if m.get(&state.id).is_some_and(|s| Arc::ptr_eq(s, state)) {
            m.remove(&state.id);
        }
        if m.is_empty() && self.retiring.load(Ordering::Acquire) {
            self.writer.notify_one();
        }
    }

    /// Retiring and nothing left to carry.
    fn retired(&self) -> bool {
        self.retiring.load(Ordering::Acquire)
            && lock(&self.streams).is_empty()
            && lock(&self.out).buf.is_empty()
    }

    /// The link is over: every stream reads what it has, then end of stream; writes fail.
    fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        let streams: Vec<_> = lock(&self.streams).drain().map(|(_, s)| s).collect();
        for s in streams {
            lock(&s.inner).closed = true;
            s.wake_both();
        }
        let waiting = std::mem::take(&mut lock(&self.out).waiting);
        for s in waiting.iter().filter_map(Weak::upgrade) {
            s.wake_both();
        }
        self.writer.notify_one();
    }
}

struct StreamState {
    id: u32,
    inner: Mutex<Inner>,
    /// The task waiting to read (or for the answer to `OPEN`).
    read_waker: AtomicWaker,
    /// The task waiting to write.
    write_waker: AtomicWaker,
}

impl StreamState {
    /// Closed, or an event both a reader and a writer must see.
    fn wake_both(&self) {
        self.read_waker.wake();
        self.write_waker.wake();
    }
}

struct Inner {
    /// Received, not yet read.
    inbound: BytesMut,
    /// `DATA` bytes the peer may still send.
    recv_left: u32,
    /// Read since the last `CREDIT` sent.
    consumed: u32,
    /// `DATA` bytes this side may still send.
    credit: u32,
    /// The peer closed the stream (or the link died): reads end after `inbound`, writes fail.
    closed: bool,
    /// On the LB: the shard's answer to `OPEN`, until taken.
    reply: Option<Reply>,
    /// Registered in `Out::waiting`.
    waiting_room: bool,
}

impl StreamState {
    fn new(id: u32) -> Arc<Self> {
        Arc::new(Self {
            id,
            inner: Mutex::new(Inner {
                inbound: BytesMut::new(),
                recv_left: WINDOW,
                consumed: 0,
                credit: WINDOW,
                closed: false,
                reply: None,
                waiting_room: false,
            }),
            read_waker: AtomicWaker::new(),
            write_waker: AtomicWaker::new(),
        })
    }
}

impl Link {
    /// The LB's end of a link: it opens streams ([`Link::open`]). Nothing moves until
    /// [`Link::run`] is given the socket.
    pub fn lb() -> Self {
        Self::new(Role::Lb, None)
    }

    /// A shard's end of a link: `on_open` is given every stream the LB opens.
    pub fn shard(on_open: OnOpen) -> Self {
        Self::new(Role::Shard, Some(on_open))
    }

    fn new(role: Role, on_open: Option<OnOpen>) -> Self {
        Self {
            shared: Arc::new(Shared {
                role,
                on_open,
                out: Mutex::new(Out::default()),
                writer: Notify::new(),
                streams: Mutex::new(HashMap::default()),
                dead: AtomicBool::new(false),
                retiring: AtomicBool::new(false),
                next_id: AtomicU32::new(1),
            }),
        }
    }

    /// Moves frames over `sock` (after the upgrade; `prefix` is what was read past it) until
    /// the socket fails, the peer closes it or breaks the protocol. Then every stream ends.
    pub async fn run(&self, sock: TcpStream, prefix: Bytes) -> LinkError {
        let _ = sock.set_nodelay(true);
        detect_dead_peer(&sock);
        let (r, w) = sock.into_split();
        let end = tokio::select! {
            e = self.read_loop(r, prefix) => e,
            e = self.write_loop(w) => e,
        };
        self.shared.kill();
        end
    }

    /// Whether the link has ended (a dead link opens no stream).
    pub fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::Acquire)
    }

    /// Opens no more streams; the link ends (its socket closed) once its streams have.
    pub fn retire(&self) {
        self.shared.retiring.store(true, Ordering::Release);
        self.shared.writer.notify_one();
    }

    /// Streams open on the link.
    pub fn streams(&self) -> usize {
        lock(&self.shared.streams).len()
    }

    /// Opens a stream (the LB's side): the shard answers with `ACCEPT` or `REFUSE`
    /// ([`MuxStream::reply`]).
    pub fn open(&self, req: &Open) -> io::Result<MuxStream> {
        let payload = req
            .encode()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "OPEN fields too long"))?;
        let state = {
            let mut m = lock(&self.shared.streams);
            if self.is_dead() || self.shared.retiring.load(Ordering::Acquire) {
                return Err(io::ErrorKind::NotConnected.into());
            }
            // Ids are not reused until the counter wraps, so a late frame of an ended stream
            // never reaches a new one.
            let id = loop {
                let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
                if id != 0 && !m.contains_key(&id) {
                    break id;
                }
            };
            let state = StreamState::new(id);
            m.insert(id, state.clone());
            state
        };
        if !self.shared.push(Kind::Open, state.id, &payload) {
            self.shared.remove(&state);
            return Err(io::ErrorKind::NotConnected.into());
        }
        Ok(MuxStream {
            state,
            link: self.shared.clone(),
        })
    }

    async fn read_loop(&self, mut r: OwnedReadHalf, prefix: Bytes) -> LinkError {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.extend_from_slice(&prefix);
        loop {
            loop {
                let h = match parse_header(&buf) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(e) => return e.into(),
                };
                if buf.len() < HEADER_LEN + h.len {
                    buf.reserve(HEADER_LEN + h.len - buf.len());
                    break;
                }
                buf.advance(HEADER_LEN);
                let payload = buf.split_to(h.len);
                if let Err(e) = self.dispatch(h.kind, h.stream, &payload) {
                    return e;
                }
            }
            if buf.capacity() - buf.len() < 16 * 1024 {
                buf.reserve(64 * 1024);
            }
            match r.read_buf(&mut buf).await {
                Ok(0) => return LinkError::Closed,
                Ok(_) => {}
                Err(e) => return e.into(),
            }
        }
    }

    fn dispatch(&self, kind: Kind, id: u32, p: &[u8]) -> Result<(), LinkError> {
        let sh = &self.shared;
        match (kind, sh.role) {
            (Kind::Open, Role::Shard) => {
                let open = Open::decode(p).ok_or(LinkError::Protocol("malformed OPEN"))?;
                let state = StreamState::new(id);
                {
                    let mut m = lock(&sh.streams);
                    if id == 0 || m.contains_key(&id) {
                        return Err(LinkError::Protocol("OPEN of a stream id in use"));
                    }
                    m.insert(id, state.clone());
                }
                let stream = MuxStream {
                    state,
                    link: sh.clone(),
                };
                if let Some(f) = &sh.on_open {
                    f(stream, open);
                }
            }
            (Kind::Accept | Kind::Refuse, Role::Lb) => {
                let reply = if kind == Kind::Accept {
                    Reply::Accepted
                } else {
                    Reply::Refused(
                        Refusal::decode(p).ok_or(LinkError::Protocol("malformed REFUSE"))?,
                    )
                };
                if let Some(s) = sh.stream(id) {
                    {
                        let mut i = lock(&s.inner);
                        if i.reply.is_some() {
                            return Err(LinkError::Protocol("second answer to one OPEN"));
                        }
                        if kind == Kind::Refuse {
                            i.closed = true;
                        }
                        i.reply = Some(reply);
                    }
                    if kind == Kind::Refuse {
                        sh.remove(&s);
                    }
                    s.wake_both();
                }
            }
            (Kind::Data, _) => {
                if let Some(s) = sh.stream(id) {
                    {
                        let mut i = lock(&s.inner);
                        let len = p.len() as u32;
                        if len > i.recv_left {
                            return Err(LinkError::Protocol("DATA beyond the stream's window"));
                        }
                        i.recv_left -= len;
                        i.inbound.extend_from_slice(p);
                    }
                    s.read_waker.wake();
                }
            }
            (Kind::Credit, _) => {
                let c: [u8; 4] = p
                    .try_into()
                    .map_err(|_| LinkError::Protocol("malformed CREDIT"))?;
                let c = u32::from_be_bytes(c);
                if let Some(s) = sh.stream(id) {
                    {
                        let mut i = lock(&s.inner);
                        i.credit = i.credit.saturating_add(c);
                        if i.credit > WINDOW {
                            return Err(LinkError::Protocol("CREDIT beyond the window"));
                        }
                    }
                    s.write_waker.wake();
                }
            }
            (Kind::Close, _) => {
                let closed = lock(&sh.streams).remove(&id);
                if let Some(s) = closed {
                    lock(&s.inner).closed = true;
                    s.wake_both();
                }
            }
            _ => {
                return Err(LinkError::Protocol(
                    "frame kind not expected from this side",
                ))
            }
        }
        Ok(())
    }

    async fn write_loop(&self, mut w: OwnedWriteHalf) -> LinkError {
        let sh = &self.shared;
        let mut chunk: Vec<u8> = Vec::new();
        loop {
            let waiting = {
                let mut o = lock(&sh.out);
                std::mem::swap(&mut o.buf, &mut chunk);
                std::mem::take(&mut o.waiting)
            };
            for s in waiting.iter().filter_map(Weak::upgrade) {
                lock(&s.inner).waiting_room = false;
                s.write_waker.wake();
            }
            if chunk.is_empty() {
                if sh.dead.load(Ordering::Acquire) || sh.retired() {
                    return LinkError::Closed;
                }
                sh.writer.notified().await;
                // Woken by the first frame queued: let the tasks that are ready now (the rest
                // of a fan-out burst, woken together) queue theirs first, so that the burst
                // leaves in one write rather than one per frame.
                tokio::task::yield_now().await;
                continue;
            }
            if let Err(e) = w.write_all(&chunk).await {
                return e.into();
            }
            chunk.clear();
            if chunk.capacity() > 4 * OUT_LIMIT {
                chunk = Vec::new();
            }
        }
    }
}

/// A peer that vanished (its host gone, no reset) would otherwise hold every stream of the
/// link until TCP gives up, minutes later. Keepalive probes after [`KEEPALIVE_IDLE`] of
/// silence, and a bound on unacknowledged data ([`USER_TIMEOUT`]), end the link instead:
/// its clients get 1012 and reconnect to another shard.
fn detect_dead_peer(sock: &TcpStream) {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_IDLE / 2)
            .with_retries(3),
    );
    let _ = s.set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// Silence on a link before keepalive probes start (then one every half of it, three).
pub const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest data on a link may stay unacknowledged before the link is given up.
pub const USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One stream of a link: a client connection, read and written like a socket.
pub struct MuxStream {
    state: Arc<StreamState>,
    link: Arc<Shared>,
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxStream")
            .field("id", &self.state.id)
            .finish()
    }
}

impl MuxStream {
    /// The stream's id on its link.
    pub fn id(&self) -> u32 {
        self.state.id
    }

    /// The LB's side: waits for the shard's answer to `OPEN`. `Err` if the link ended first.
    pub async fn reply(&self) -> io::Result<Reply> {
        std::future::poll_fn(|cx| {
            self.state.read_waker.register(cx.waker());
            let mut i = lock(&self.state.inner);
            if let Some(r) = i.reply.take() {
                return Poll::Ready(Ok(r));
            }
            if i.closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "link ended before the shard answered",
                )));
            }
            Poll::Pending
        })
        .await
    }

    /// The shard's side: the stream is a WebSocket connection from now on.
    pub fn accept(&self) -> bool {
        self.link.push(Kind::Accept, self.state.id, &[])
    }

    /// The shard's side: refuses the stream (what its HTTP upgrade would have answered).
    pub fn refuse(self, r: &Refusal) {
        lock(&self.state.inner).closed = true;
        self.link.remove(&self.state);
        self.link.push(Kind::Refuse, self.state.id, &r.encode());
    }

    /// Streams open on this stream's link (this one included).
    pub fn link_streams(&self) -> usize {
        lock(&self.link.streams).len()
    }

    /// Whether the peer closed the stream or the link ended.
    pub fn is_closed(&self) -> bool {
        lock(&self.state.inner).closed
    }

    /// Whether the link's output has room; if not, the stream is registered to be woken
    /// when the writer has taken it.
    fn room(&self, o: &mut Out, i: &mut Inner) -> bool {
        if o.buf.len() < OUT_LIMIT {
            return true;
        }
        if !i.waiting_room {
            i.waiting_room = true;
            o.waiting.push(Arc::downgrade(&self.state));
        }
        false
    }
}

impl net_io::Transport for MuxStream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.state.read_waker.register(cx.waker());
        let i = lock(&self.state.inner);
        if !i.inbound.is_empty() || i.closed {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.state.write_waker.register(cx.waker());
        let mut i = lock(&self.state.inner);
        if i.closed || (i.credit > 0 && self.room(&mut lock(&self.link.out), &mut i)) {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn read_nonblocking(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut i = lock(&self.state.inner);
        if i.inbound.is_empty() {
            return if i.closed {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(i.inbound.len());
        buf[..n].copy_from_slice(&i.inbound[..n]);
        i.inbound.advance(n);
        if i.inbound.is_empty() && i.inbound.capacity() > 4096 {
            // An idle stream keeps no buffer.
            i.inbound = BytesMut::new();
        }
        i.consumed += n as u32;
        let give = (i.consumed >= CREDIT_STEP && !i.closed).then(|| {
            let c = std::mem::take(&mut i.consumed);
            i.recv_left += c;
            c
        });
        drop(i);
        if let Some(c) = give {
            self.link
                .push(Kind::Credit, self.state.id, &c.to_be_bytes());
        }
        Ok(n)
    }

    fn write_nonblocking(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut i = lock(&self.state.inner);
        if i.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        let n = total.min(i.credit as usize).min(MAX_PAYLOAD);
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut o = lock(&self.link.out);
        if !self.room(&mut o, &mut i) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if self.link.dead.load(Ordering::Acquire) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.link.queue(o, Kind::Data, self.state.id, n, bufs);
        i.credit -= n as u32;
        Ok(n)
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let was_open = !std::mem::replace(&mut lock(&self.state.inner).closed, true);
        self.link.remove(&self.state);
        if was_open {
            self.link.push(Kind::Close, self.state.id, &[]);
        }
    }
}
