//! Dialing: a TCP connect from a chosen source address, TLS for `wss://`, and the WebSocket
//! upgrade.
//!
//! The tool must be light enough for 100k connections across a few processes, so it skips
//! general HTTP machinery: the request and the response check are ws-protocol's client
//! handshake (the one ws-lb uses to dial shards), and the response head is read into a small
//! bounded buffer that is freed as soon as the 101 arrives. Bytes that follow the head (a
//! server may send a frame right after the 101) are handed back so the frame decoder sees
//! them.

use std::io;
use std::net::{IpAddr, SocketAddr};

use rand::Rng as _;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpSocket;
use tokio::time::Instant;
use ws_protocol::handshake::{self, HandshakeError, Response};

use crate::outcome::Failure;
use crate::stream::{Stream, Tls};

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
/// A `query_token` goes into the request as `token=` (added to the target's query);
/// `own_tls` is the client's own TLS configuration, if it keeps one (`Tls::own_config`).
pub async fn dial(
    target: &Target,
    query_token: Option<&str>,
    source: Option<IpAddr>,
    deadline: Instant,
    own_tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
) -> Result<Upgraded, Failure> {
    let socket = socket_for(target.addr, source).map_err(|e| Failure::from_io(&e))?;
    let stream = match tokio::time::timeout_at(deadline, socket.connect(target.addr)).await {
        Err(_) => return Err(Failure::ConnectTimeout),
        Ok(Err(e)) => return Err(Failure::from_io(&e)),
        Ok(Ok(s)) => s,
    };
    let secured = async {
        let stream = Stream::connect(stream, target.tls.as_ref(), own_tls)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => Failure::Tls,
                _ => Failure::from_io(&e),
            })?;
        upgrade(stream, target, query_token).await
    };
    match tokio::time::timeout_at(deadline, secured).await {
        Err(_) => Err(Failure::HandshakeTimeout),
        Ok(r) => r,
    }
}

async fn upgrade(
    mut stream: Stream,
    target: &Target,
    query_token: Option<&str>,
) -> Result<Upgraded, Failure> {
    let key = handshake::key_from_bytes(rand::rng().random());
    let path = match query_token {
        Some(t) => std::borrow::Cow::Owned(crate::token::with_query_token(&target.path, t)),
        None => std::borrow::Cow::Borrowed(target.path.as_str()),
    };
    let request = handshake::client_request(
        &path,
        &target.authority,
        &key,
        &[("User-Agent", "odin-loadtest")],
    );
    stream
        .write_all(&request)
        .await
        .map_err(|e| Failure::from_io(&e))?;
    drop(request);
    let mut buf = Vec::with_capacity(512);
    let head_len = loop {
        stream.readable().await.map_err(|e| Failure::from_io(&e))?;
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return Err(Failure::Eof),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Failure::from_io(&e)),
        }
        match handshake::parse_response(&buf, &key) {
            Ok(Response::Accepted { head_len }) => break head_len,
            Ok(Response::Partial) => {}
            Err(e) => return Err(failure(&e)),
        }
    };
    let leftover = buf.get(head_len..).map(<[u8]>::to_vec).unwrap_or_default();
    Ok(Upgraded { stream, leftover })
}

/// How a refused upgrade is counted.
fn failure(e: &HandshakeError) -> Failure {
    match e {
        HandshakeError::Status(code) => Failure::Http(*code),
        // A shard dialled directly while draining or starting: counted as the 503 it is.
        HandshakeError::NotReady(_) => Failure::Http(503),
        HandshakeError::TooLarge | HandshakeError::Malformed(_) | HandshakeError::BadAccept => {
            Failure::BadHandshake
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_by_status_or_as_bad_handshakes() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        let e = handshake::parse_response(busy, key).unwrap_err();
        assert_eq!(failure(&e), Failure::Http(503));
        let wrong = b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        let e = handshake::parse_response(wrong, key).unwrap_err();
        assert_eq!(failure(&e), Failure::BadHandshake);
        let e = handshake::parse_response(b"garbage\r\n\r\n", key).unwrap_err();
        assert_eq!(failure(&e), Failure::BadHandshake);
    }
}
