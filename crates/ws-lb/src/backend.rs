//! A shard as the LB dials it: parsed once from its `ws://host:port/path` URL, then
//! connected per client with a bounded TCP connect and WebSocket handshake whose failures
//! are classified for the retry policy and the breaker.

use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use lb_core::AttemptError;
use net_io::Transport;
use tier_mux::upgrade::UpgradeError;
use tier_mux::{Link, MuxStream, Open, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use ws_protocol::handshake::{self, HandshakeError, Response, MAX_RESPONSE_HEAD};

use crate::health::reported;

/// A backend URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backend url {url:?}: {problem}")]
pub struct BadBackend {
    pub url: String,
    pub problem: String,
}

/// One shard endpoint.
#[derive(Debug, Clone)]
pub struct Backend {
    pub url: String,
    pub addr: SocketAddr,
    host_header: String,
    path: String,
    /// The tier link to this shard (`--tier-mux`), made on first use.
    link: Arc<LinkSlot>,
}

/// A client's connection to its shard: a socket of its own, or a stream of the LB's tier
/// link to that shard (`--tier-mux`).
#[derive(Debug)]
pub enum Upstream {
    Tcp(TcpStream),
    Mux(MuxStream),
}

impl Transport for Upstream {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            Upstream::Tcp(s) => Transport::poll_read_ready(s, cx),
            Upstream::Mux(s) => s.poll_read_ready(cx),
        }
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            Upstream::Tcp(s) => Transport::poll_write_ready(s, cx),
            Upstream::Mux(s) => s.poll_write_ready(cx),
        }
    }

    fn read_nonblocking(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Upstream::Tcp(s) => s.read_nonblocking(buf),
            Upstream::Mux(s) => s.read_nonblocking(buf),
        }
    }

    fn write_nonblocking(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Upstream::Tcp(s) => s.write_nonblocking(bufs),
            Upstream::Mux(s) => s.write_nonblocking(bufs),
        }
    }
}

/// The tier link to one shard: connected by the first client that needs it, replaced when
/// it dies, retired (ended once its streams have) when the shard leaves the membership.
#[derive(Debug, Default)]
struct LinkSlot {
    link: std::sync::Mutex<Option<Link>>,
    /// Held while connecting, so that a burst of clients makes one link, not one each.
    connecting: tokio::sync::Mutex<()>,
}

impl LinkSlot {
    fn current(&self) -> Option<Link> {
        let l = self
            .link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        l.as_ref().filter(|l| !l.is_dead()).cloned()
    }

    async fn get(
        &self,
        addr: SocketAddr,
        host: &str,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Link, AttemptError> {
        if let Some(l) = self.current() {
            return Ok(l);
        }
        let Ok(_connecting) = timeout_at(deadline, self.connecting.lock()).await else {
            return Err(AttemptError::ConnectTimeout(budget));
        };
        if let Some(l) = self.current() {
            return Ok(l);
        }
        // Classified as a client's own connection to the shard is: the TCP connect, then
        // the upgrade (its status, or a timeout of the handshake).
        let sock = connect(addr, deadline, budget).await?;
        let (sock, prefix) =
            match timeout_at(deadline, tier_mux::upgrade::upgrade(sock, host)).await {
                Err(_) => return Err(AttemptError::HandshakeTimeout(budget)),
                Ok(Err(UpgradeError::Status(s))) => return Err(AttemptError::HttpStatus(s)),
                Ok(Err(UpgradeError::Io(e))) => {
                    return Err(AttemptError::ConnectionLost(e.to_string()))
                }
                Ok(Err(e)) => return Err(AttemptError::Protocol(e.to_string())),
                Ok(Ok(parts)) => parts,
            };
        let link = Link::lb();
        let running = link.clone();
        let host = host.to_owned();
        tokio::spawn(async move {
            let end = running.run(sock, prefix).await;
            tracing::info!(shard = %host, reason = %end, "tier link ended");
        });
        *self
            .link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(link.clone());
        Ok(link)
    }
}

impl Drop for LinkSlot {
    fn drop(&mut self) {
        if let Some(l) = self.current() {
            l.retire();
        }
    }
}

impl Backend {
    /// Parses and resolves `ws://host:port/path` (resolved once, at startup).
    pub fn parse(url: &str) -> Result<Self, BadBackend> {
        let bad = |problem: &str| BadBackend {
            url: url.to_owned(),
            problem: problem.to_owned(),
        };
        let uri: http::Uri = url.parse().map_err(|_| bad("not a valid URL"))?;
        match uri.scheme_str() {
            Some("ws") => {}
            Some("wss") => {
                return Err(bad(
                    "wss is not supported between LB and shards (use ws on the private network)",
                ))
            }
            _ => return Err(bad("scheme must be ws://")),
        }
        let host = uri.host().ok_or_else(|| bad("missing host"))?;
        let port = uri.port_u16().unwrap_or(80);
        let addr = (host.trim_start_matches('[').trim_end_matches(']'), port)
            .to_socket_addrs()
            .map_err(|e| bad(&format!("cannot resolve host: {e}")))?
            .next()
            .ok_or_else(|| bad("host resolves to no address"))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let host_header = uri
            .authority()
            .map_or_else(|| host.to_owned(), |a| a.as_str().to_owned());
        Ok(Self {
            url: url.to_owned(),
            addr,
            host_header,
            path,
            link: Arc::default(),
        })
    }

    /// `http://host:port/health` of the shard.
    pub fn health_uri(&self) -> String {
        format!("http://{}/health", self.host_header)
    }

    /// Connects and completes the WebSocket handshake within `budget`. Returns the socket
    /// and any bytes the shard sent right after its 101. `token` (already verified, and
    /// header-safe) goes to the shard as `Authorization: Bearer`.
    pub async fn dial(
        &self,
        budget: Duration,
        client_ip: IpAddr,
        token: Option<&str>,
        mux: bool,
    ) -> Result<(Upstream, Bytes), AttemptError> {
        let deadline = Instant::now() + budget;
        if mux {
            return self.open(deadline, budget, token).await;
        }
        let stream = connect(self.addr, deadline, budget).await?;
        let _ = stream.set_nodelay(true);
        match timeout_at(deadline, self.handshake(stream, client_ip, token)).await {
            Err(_) => Err(AttemptError::HandshakeTimeout(budget)),
            Ok(r) => r.map(|(s, prefix)| (Upstream::Tcp(s), prefix)),
        }
    }

    /// A stream on the tier link (connected first if there is none): `OPEN`, then the
    /// shard's answer, classified as its HTTP answer would be.
    async fn open(
        &self,
        deadline: Instant,
        budget: Duration,
        token: Option<&str>,
    ) -> Result<(Upstream, Bytes), AttemptError> {
        let link = self
            .link
            .get(self.addr, &self.host_header, deadline, budget)
            .await?;
        let open = Open {
            path: self.path.clone(),
            token: token.map(str::to_owned),
        };
        let stream = link
            .open(&open)
            .map_err(|e| AttemptError::ConnectionLost(format!("tier link: {e}")))?;
        match timeout_at(deadline, stream.reply()).await {
            // Dropping the stream tells the shard (CLOSE): a late accept frees its slot.
            Err(_) => Err(AttemptError::HandshakeTimeout(budget)),
            Ok(Err(e)) => Err(AttemptError::ConnectionLost(format!("tier link: {e}"))),
            Ok(Ok(Reply::Accepted)) => Ok((Upstream::Mux(stream), Bytes::new())),
            Ok(Ok(Reply::Refused(r))) => Err(match r.shard_status {
                Some(status) => AttemptError::NotReady(reported(status)),
                None => AttemptError::HttpStatus(r.status),
            }),
        }
    }

    async fn handshake(
        &self,
        mut stream: TcpStream,
        client_ip: IpAddr,
        token: Option<&str>,
    ) -> Result<(TcpStream, Bytes), AttemptError> {
        let key = handshake::key_from_bytes(rand::random());
        let ip = client_ip.to_string();
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("X-Forwarded-For", ip.as_str())];
        if let Some(b) = &bearer {
            headers.push(("Authorization", b.as_str()));
        }
        let request = handshake::client_request(&self.path, &self.host_header, &key, &headers);
        stream
            .write_all(&request)
            .await
            .map_err(|e| AttemptError::ConnectionLost(e.to_string()))?;
        let mut buf = BytesMut::with_capacity(512);
        loop {
            if buf.len() >= MAX_RESPONSE_HEAD {
                return Err(AttemptError::Protocol("response head too large".into()));
            }
            let n = stream
                .read_buf(&mut buf)
                .await
                .map_err(|e| AttemptError::ConnectionLost(e.to_string()))?;
            if n == 0 {
                return Err(AttemptError::ConnectionLost(
                    "shard closed during handshake".into(),
                ));
            }
            match handshake::parse_response(&buf, &key) {
                Ok(Response::Partial) => continue,
                Ok(Response::Accepted { head_len }) => {
                    // Copied out so the handshake buffer is freed with this function.
                    let rest = Bytes::copy_from_slice(buf.get(head_len..).unwrap_or_default());
                    return Ok((stream, rest));
                }
                Err(HandshakeError::Status(s)) => return Err(AttemptError::HttpStatus(s)),
                Err(HandshakeError::NotReady(status)) => {
                    return Err(AttemptError::NotReady(reported(status)))
                }
                Err(e) => return Err(AttemptError::Protocol(e.to_string())),
            }
        }
    }
}

/// The TCP connect to a shard within `deadline`, its failure classified for the retry
/// policy and the breaker (a client's own connection and a tier link alike).
async fn connect(
    addr: SocketAddr,
    deadline: Instant,
    budget: Duration,
) -> Result<TcpStream, AttemptError> {
    match timeout_at(deadline, TcpStream::connect(addr)).await {
        Err(_) => Err(AttemptError::ConnectTimeout(budget)),
        Ok(Err(e)) if local_exhaustion(&e) => Err(AttemptError::LocalResources(e.to_string())),
        Ok(Err(e)) => Err(AttemptError::ConnectRefused(e.to_string())),
        Ok(Ok(s)) => Ok(s),
    }
}

/// Errors of `socket()`/`connect()` that mean this process or host ran out of something
/// (descriptors: EMFILE 24, ENFILE 23; buffers: ENOBUFS 105; local ports: EADDRNOTAVAIL 99).
fn local_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24 | 99 | 105))
        || e.kind() == std::io::ErrorKind::OutOfMemory
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_rejects_bad_ones() {
        let b = Backend::parse("ws://127.0.0.1:3002/ws").unwrap();
        assert_eq!(b.addr, "127.0.0.1:3002".parse().unwrap());
        assert_eq!(b.health_uri(), "http://127.0.0.1:3002/health");
        assert_eq!(b.path, "/ws");
        assert!(Backend::parse("wss://127.0.0.1:3002/ws")
            .unwrap_err()
            .problem
            .contains("wss"));
        assert!(Backend::parse("http://127.0.0.1:3002/ws").is_err());
        assert!(Backend::parse("not a url").is_err());
        let echo = Backend::parse("ws://localhost:3005/echo?x=1").unwrap();
        assert_eq!(echo.path, "/echo?x=1");
    }
}
