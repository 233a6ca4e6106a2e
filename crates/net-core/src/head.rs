//! A WebSocket fast path on the raw socket: read one HTTP/1.1 request head, and if it is a
//! well-formed upgrade for the WebSocket path, hand its few fields to the caller, which
//! answers `101` itself. Everything else — other paths, other methods, bad or incomplete
//! upgrades, oversized heads — goes to hyper with every byte read so far ([`Rewind`]), so
//! hyper's answers (404, 405, 426, 400, 431, keep-alive) stay the only ones.
//!
//! Why: hyper's per-connection HTTP machinery (a connection task, the service, the upgrade
//! hand-over through a oneshot and a boxed IO, a second task for the relay) costs more CPU
//! per connection than the rest of a proxied handshake's user-space work together. A
//! WebSocket client sends one request and then frames; this path reads that request with
//! `httparse` (which hyper itself uses) and keeps the connection in one task.

use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use crate::HttpLimits;

/// Header fields looked at on the fast path; a head with more goes to hyper (which applies
/// `max_headers` itself).
const FAST_MAX_HEADERS: usize = 64;
/// First read buffer; grows up to `max_header_bytes`.
const INITIAL_BUFFER: usize = 1024;

/// What the first request on a connection turned out to be.
#[derive(Debug)]
pub enum Head {
    /// A well-formed WebSocket upgrade for the fast path's path.
    Upgrade(UpgradeHead),
    /// Anything else: serve the connection with hyper, starting with these bytes.
    Other(BytesMut),
    /// Closed, timed out (header read timeout) or stopped before a whole head arrived.
    Gone,
}

/// A well-formed upgrade request: the head's bytes and where its fields are, plus whatever
/// the client sent after the head (frames it did not wait to send).
#[derive(Debug)]
pub struct UpgradeHead {
    buf: Bytes,
    fields: Fields,
    rest: Bytes,
}

impl UpgradeHead {
    /// What the client sent after the head; drops the head.
    pub fn into_rest(self) -> Bytes {
        self.rest
    }
    fn field(&self, r: &Range<usize>) -> &str {
        // Every range was checked to be UTF-8 when the head was parsed.
        self.buf
            .get(r.clone())
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or_default()
    }
    /// The query string, without `?`.
    pub fn query(&self) -> Option<&str> {
        self.field(&self.fields.target)
            .split_once('?')
            .map(|(_, q)| q)
    }
    /// `Sec-WebSocket-Key`.
    pub fn key(&self) -> &str {
        self.field(&self.fields.key)
    }
    /// The first `Origin` header.
    pub fn origin(&self) -> Option<&str> {
        self.fields.origin.as_ref().map(|r| self.field(r))
    }
    /// The first `X-Forwarded-For` header.
    pub fn forwarded_for(&self) -> Option<&str> {
        self.fields.forwarded_for.as_ref().map(|r| self.field(r))
    }
    /// The `101 Switching Protocols` response to this request.
    pub fn switching_protocols(&self) -> Vec<u8> {
        let accept = ws_protocol::handshake::accept_key(self.key());
        let mut r = Vec::with_capacity(128);
        r.extend_from_slice(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-accept: ",
        );
        r.extend_from_slice(accept.as_bytes());
        r.extend_from_slice(b"\r\n\r\n");
        r
    }
}

/// Reads the first request head from `stream` within `limits.header_read_timeout`.
pub async fn read_head(
    stream: &mut TcpStream,
    limits: &HttpLimits,
    ws_path: &str,
    stop: &CancellationToken,
) -> Head {
    let deadline = Instant::now() + limits.header_read_timeout;
    let max_bytes = limits.max_header_bytes.max(8192);
    let mut buf = BytesMut::with_capacity(INITIAL_BUFFER);
    loop {
        let read = tokio::select! {
            _ = stop.cancelled() => return Head::Gone,
            r = timeout_at(deadline, stream.read_buf(&mut buf)) => r,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Head::Gone,
            Ok(Ok(_)) => {}
        }
        match parse(&buf, limits.max_headers, ws_path) {
            Parse::Partial if buf.len() < max_bytes => {
                if buf.capacity() == buf.len() {
                    buf.reserve(buf.len().min(max_bytes - buf.len()));
                }
            }
            Parse::Partial | Parse::Other => return Head::Other(buf),
            Parse::Upgrade(f) => {
                // Copied out (usually nothing): the head's buffer is freed once the 101 is
                // written, not held for the connection's life through a shared slice.
                let rest = Bytes::copy_from_slice(buf.get(f.head_len..).unwrap_or_default());
                buf.truncate(f.head_len);
                return Head::Upgrade(UpgradeHead {
                    buf: buf.freeze(),
                    fields: f,
                    rest,
                });
            }
        }
    }
}

#[derive(Debug)]
struct Fields {
    head_len: usize,
    target: Range<usize>,
    key: Range<usize>,
    origin: Option<Range<usize>>,
    forwarded_for: Option<Range<usize>>,
}

enum Parse {
    Partial,
    Other,
    Upgrade(Fields),
}

/// Where `part` (a slice of `whole`) sits in `whole`.
fn range_in(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize);
    start..start + part.len()
}

/// Whether a comma-separated header value holds `token` (case-insensitive), as
/// fastwebsockets' `is_upgrade_request` checks it.
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&c| c == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn parse(buf: &[u8], max_headers: usize, ws_path: &str) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; FAST_MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Other,
    };
    let (Some("GET"), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parse::Other;
    };
    if target.split_once('?').map_or(target, |(p, _)| p) != ws_path
        || req.headers.len() > max_headers
    {
        return Parse::Other;
    }
    let (mut upgrade, mut connection, mut version) = (false, false, None);
    let (mut key, mut origin, mut forwarded_for) = (None, None, None);
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= has_token(h.value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            if version.is_some() {
                return Parse::Other;
            }
            version = Some(h.value == b"13");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if key.is_some() {
                return Parse::Other;
            }
            key = Some(h.value);
        } else if name.eq_ignore_ascii_case("origin") {
            origin = origin.or(Some(h.value));
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for = forwarded_for.or(Some(h.value));
        } else if name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            return Parse::Other;
        }
    }
    let key_ok = key.is_some_and(crate::upgrade::key_is_valid);
    let utf8 = |v: Option<&[u8]>| v.is_none_or(|v| std::str::from_utf8(v).is_ok());
    if !(upgrade
        && connection
        && version == Some(true)
        && key_ok
        && utf8(origin)
        && utf8(forwarded_for))
    {
        return Parse::Other;
    }
    let Some(key) = key else { return Parse::Other };
    Parse::Upgrade(Fields {
        head_len,
        target: range_in(buf, target.as_bytes()),
        key: range_in(buf, key),
        origin: origin.map(|o| range_in(buf, o)),
        forwarded_for: forwarded_for.map(|f| range_in(buf, f)),
    })
}

/// A socket whose first reads return bytes already read from it.
#[derive(Debug)]
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
    /// The socket and what of the prefix was not read yet.
    pub fn into_parts(self) -> (T, Bytes) {
        (self.inner, self.prefix)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            if let Some(chunk) = self.prefix.get(..n) {
                out.put_slice(chunk);
            }
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /ws?token=a.b.c HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://app.example\r\nX-Forwarded-For: 1.2.3.4, 5.6.7.8\r\n\r\n";

    fn fields(req: &str) -> Option<Fields> {
        match parse(req.as_bytes(), 64, "/ws") {
            Parse::Upgrade(f) => Some(f),
            _ => None,
        }
    }

    #[test]
    fn a_well_formed_upgrade_takes_the_fast_path_with_its_fields() {
        let f = fields(GOOD).expect("fast path");
        assert_eq!(f.head_len, GOOD.len());
        assert_eq!(&GOOD[f.target.clone()], "/ws?token=a.b.c");
        assert_eq!(&GOOD[f.key.clone()], "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(&GOOD[f.origin.unwrap()], "https://app.example");
        assert_eq!(&GOOD[f.forwarded_for.unwrap()], "1.2.3.4, 5.6.7.8");
    }

    #[test]
    fn everything_else_goes_to_hyper_or_waits_for_more() {
        let other = |r: &str| matches!(parse(r.as_bytes(), 64, "/ws"), Parse::Other);
        assert!(matches!(
            parse(&GOOD.as_bytes()[..40], 64, "/ws"),
            Parse::Partial
        ));
        assert!(other(&GOOD.replacen("GET", "POST", 1)));
        assert!(other(&GOOD.replace("/ws?", "/health?")));
        assert!(other(&GOOD.replace("/ws?", "/wsx?")));
        assert!(other(&GOOD.replace("HTTP/1.1", "HTTP/1.0")));
        assert!(other(&GOOD.replace("Upgrade: websocket\r\n", "")));
        assert!(other(&GOOD.replace("keep-alive, Upgrade", "keep-alive")));
        assert!(other(&GOOD.replace("Version: 13", "Version: 8")));
        assert!(other(&GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")));
        assert!(other(
            &GOOD.replace("Host: x\r\n", "Host: x\r\nContent-Length: 5\r\n")
        ));
        assert!(other(&GOOD.replace(
            "Host: x\r\n",
            "Host: x\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        )));
        assert!(other("GET /ws HTTP/1.1\r\nHo st: x\r\n\r\n"));
        // More fields than `max_headers` allows: hyper answers 431.
        assert!(matches!(parse(GOOD.as_bytes(), 4, "/ws"), Parse::Other));
        let many: String = (0..70).map(|i| format!("X-H{i}: v\r\n")).collect();
        assert!(other(
            &GOOD.replace("Host: x\r\n", &format!("Host: x\r\n{many}"))
        ));
    }

    #[test]
    fn the_101_carries_the_rfc_accept_key() {
        let f = fields(GOOD).unwrap();
        let head = UpgradeHead {
            buf: Bytes::from_static(GOOD.as_bytes()),
            fields: f,
            rest: Bytes::new(),
        };
        assert_eq!(head.query(), Some("token=a.b.c"));
        let r = String::from_utf8(head.switching_protocols()).unwrap();
        // RFC 6455 §1.3's example key and answer.
        assert!(r.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(r.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"));
    }

    #[tokio::test]
    async fn rewind_replays_its_prefix_then_reads_the_socket() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b" world")
            .await
            .unwrap();
        drop(a);
        let mut r = Rewind::new(Bytes::from_static(b"hello"), b);
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
