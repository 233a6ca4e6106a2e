//! Opening a link: an HTTP/1.1 upgrade on the shard's port (`GET /mux`, `Upgrade:
//! odin-mux/1`), so a link needs no port, firewall rule or health check of its own.

use std::io;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The `Upgrade` token of a link.
pub const PROTOCOL: &str = "odin-mux/1";

/// The path a shard serves links on.
pub const PATH: &str = "/mux";

/// Longest response head accepted.
const MAX_HEAD: usize = 4096;

/// Connects to a shard and upgrades the connection to a link. Returns the socket and any
/// bytes the shard sent after its 101 (frames). Bound it with a timeout.
pub async fn dial(addr: SocketAddr, host: &str) -> io::Result<(TcpStream, Bytes)> {
    let mut sock = TcpStream::connect(addr).await?;
    let _ = sock.set_nodelay(true);
    let req = format!(
        "GET {PATH} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: {PROTOCOL}\r\n\r\n"
    );
    sock.write_all(req.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(512);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).unwrap_or("");
            let status = head.lines().next().unwrap_or("");
            let upgraded = status.starts_with("HTTP/1.1 101")
                && head.lines().any(|l| {
                    l.split_once(':').is_some_and(|(k, v)| {
                        k.trim().eq_ignore_ascii_case("upgrade") && v.trim() == PROTOCOL
                    })
                });
            if !upgraded {
                return Err(io::Error::other(format!(
                    "shard refused the link upgrade: {status:?}"
                )));
            }
            let rest = buf.split_off(end + 4).freeze();
            return Ok((sock, rest));
        }
        if buf.len() >= MAX_HEAD {
            return Err(io::Error::other("link upgrade response head too large"));
        }
        if sock.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "shard closed during the link upgrade",
            ));
        }
    }
}
