//! Opening a link: an HTTP/1.1 upgrade on the shard's port (`GET /mux`, `Upgrade:
//! odin-mux/1`), so a link needs no port, firewall rule or health check of its own.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The `Upgrade` token of a link.
pub const PROTOCOL: &str = "odin-mux/1";

/// The path a shard serves links on.
pub const PATH: &str = "/mux";

/// Longest response head accepted.
const MAX_HEAD: usize = 4096;

/// Why a link upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("link upgrade: {0}")]
    Io(#[from] io::Error),
    #[error("shard answered the link upgrade with HTTP {0}")]
    Status(u16),
    #[error("link upgrade: {0}")]
    Malformed(&'static str),
}

/// Upgrades a connected socket to a link. Returns the socket and any bytes the shard sent
/// after its 101 (frames). Bound it with a timeout.
pub async fn upgrade(mut sock: TcpStream, host: &str) -> Result<(TcpStream, Bytes), UpgradeError> {
    let _ = sock.set_nodelay(true);
    let req = format!(
        "GET {PATH} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: {PROTOCOL}\r\n\r\n"
    );
    sock.write_all(req.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(512);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end])
                .map_err(|_| UpgradeError::Malformed("head not UTF-8"))?;
            let mut lines = head.lines();
            let status = lines
                .next()
                .and_then(|l| l.strip_prefix("HTTP/1.1 "))
                .and_then(|l| l.get(..3))
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or(UpgradeError::Malformed("no HTTP/1.1 status line"))?;
            if status != 101 {
                return Err(UpgradeError::Status(status));
            }
            let upgraded = lines.any(|l| {
                l.split_once(':').is_some_and(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("upgrade") && v.trim() == PROTOCOL
                })
            });
            if !upgraded {
                return Err(UpgradeError::Malformed("101 without Upgrade: odin-mux/1"));
            }
            let rest = buf.split_off(end + 4).freeze();
            return Ok((sock, rest));
        }
        if buf.len() >= MAX_HEAD {
            return Err(UpgradeError::Malformed("response head too large"));
        }
        if sock.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "shard closed during the link upgrade",
            )
            .into());
        }
    }
}
