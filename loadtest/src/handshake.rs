//! Dialing: a TCP connect from a chosen source address, TLS for `wss://`, and a hand-written
//! HTTP/1.1 upgrade.
//!
//! The tool must be light enough for 100k connections across a few processes, so it skips
//! general HTTP machinery: one `GET` with a random `Sec-WebSocket-Key`, a response head read
//! into a small bounded buffer that is freed as soon as the 101 arrives, and the RFC 6455
//! accept check. Bytes that follow the head (a server may send a frame right after the 101)
//! are handed back so the frame decoder sees them.

use std::io;
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use rand::Rng as _;
use sha1::{Digest as _, Sha1};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpSocket;
use tokio::time::Instant;

use crate::outcome::Failure;
use crate::stream::{Stream, Tls};

/// The GUID a server appends to the key before hashing (RFC 6455 §1.3).
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest response head accepted; real servers send a few hundred bytes.
const MAX_HEAD: usize = 8192;

/// Where and how to dial: resolved once per run.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// The Host header value.
    pub authority: String,
    /// Request path and query.
    pub path: String,
    /// TLS settings for `wss://`; `None` for `ws://`.
    pub tls: Option<Tls>,
}

/// A connection whose upgrade succeeded.
#[derive(Debug)]
pub struct Upgraded {
    pub stream: Stream,
    /// Bytes received after the response head: the start of the frame stream.
    pub leftover: Vec<u8>,
}

/// The `Sec-WebSocket-Accept` value a server must answer to `key`.
pub fn accept_for(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Opens a non-blocking TCP socket, bound to `source` (port chosen by the kernel) when given.
///
/// Binding before connect is what lets one machine exceed the ~28k ephemeral ports of a
/// single (source, destination) pair: each source address in 127.0.0.0/8 brings its own.
fn socket_for(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    // Frames are small and latency is what we measure; never let Nagle hold them back.
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    Ok(TcpSocket::from_std_stream(std::net::TcpStream::from(
        socket,
    )))
}

/// Connects, runs the TLS handshake (`wss://`) and upgrades, all before `deadline`. Time
/// spent in TCP connect counts as `connect_timeout`, time after it as `handshake_timeout`.
pub async fn dial(
    target: &Target,
    source: Option<IpAddr>,
    deadline: Instant,
) -> Result<Upgraded, Failure> {
    let socket = socket_for(target.addr, source).map_err(|e| Failure::from_io(&e))?;
    let stream = match tokio::time::timeout_at(deadline, socket.connect(target.addr)).await {
        Err(_) => return Err(Failure::ConnectTimeout),
        Ok(Err(e)) => return Err(Failure::from_io(&e)),
        Ok(Ok(s)) => s,
    };
    let secured = async {
        let stream = Stream::connect(stream, target.tls.as_ref())
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => Failure::Tls,
                _ => Failure::from_io(&e),
            })?;
        upgrade(stream, target).await
    };
    match tokio::time::timeout_at(deadline, secured).await {
        Err(_) => Err(Failure::HandshakeTimeout),
        Ok(r) => r,
    }
}

async fn upgrade(mut stream: Stream, target: &Target) -> Result<Upgraded, Failure> {
    let key_bytes: [u8; 16] = rand::rng().random();
    let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: odin-loadtest\r\n\r\n",
        target.path, target.authority
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| Failure::from_io(&e))?;
    drop(request);
    let mut buf = Vec::with_capacity(512);
    let head_end = loop {
        stream.readable().await.map_err(|e| Failure::from_io(&e))?;
        let searched = buf.len().saturating_sub(3);
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return Err(Failure::Eof),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Failure::from_io(&e)),
        }
        if let Some(pos) = find_head_end(&buf, searched) {
            break pos;
        }
        if buf.len() >= MAX_HEAD {
            return Err(Failure::BadHandshake);
        }
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().min(MAX_HEAD - buf.len()));
        }
    };
    let head = buf.get(..head_end).unwrap_or_default();
    check_response(head, &accept_for(&key))?;
    let leftover = buf
        .get(head_end + 4..)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    Ok(Upgraded { stream, leftover })
}

/// Position of the `\r\n\r\n` that ends an HTTP head, searching from `from`.
pub fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + from)
}

/// Checks a response head (without the final blank line) against the upgrade rules.
pub fn check_response(head: &[u8], expected_accept: &str) -> Result<(), Failure> {
    let text = std::str::from_utf8(head).map_err(|_| Failure::BadHandshake)?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| {
            let mut parts = l.split(' ');
            let version = parts.next()?;
            version.starts_with("HTTP/1.").then_some(())?;
            parts.next()?.parse::<u16>().ok()
        })
        .ok_or(Failure::BadHandshake)?;
    if status != 101 {
        return Err(Failure::Http(status));
    }
    let (mut upgrade, mut connection, mut accept) = (false, false, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection = value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = value == expected_accept;
        }
    }
    if upgrade && connection && accept {
        Ok(())
    } else {
        Err(Failure::BadHandshake)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_the_rfc_example() {
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn checks_responses() {
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\n\
                  Connection: keep-alive, Upgrade\r\nSec-WebSocket-Accept: abc=";
        assert_eq!(check_response(ok.as_bytes(), "abc="), Ok(()));
        assert_eq!(
            check_response(ok.as_bytes(), "xyz="),
            Err(Failure::BadHandshake)
        );
        let busy = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0";
        assert_eq!(
            check_response(busy.as_bytes(), "abc="),
            Err(Failure::Http(503))
        );
        assert_eq!(
            check_response(b"garbage", "abc="),
            Err(Failure::BadHandshake)
        );
        let no_upgrade = "HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: abc=";
        assert_eq!(
            check_response(no_upgrade.as_bytes(), "abc="),
            Err(Failure::BadHandshake)
        );
    }

    #[test]
    fn finds_the_end_of_a_head() {
        let b = b"HTTP/1.1 101 x\r\nA: b\r\n\r\n\x81\x02hi";
        assert_eq!(find_head_end(b, 0), Some(20));
        assert_eq!(find_head_end(b, 30), None);
        assert_eq!(find_head_end(b"\r\n\r", 0), None);
    }
}
