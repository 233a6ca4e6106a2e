//! A deliberately small HTTP/1.1 client for tests: one request per connection, or several on
//! one keep-alive connection ([`KeepAlive`]) for fast publishing.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

fn request(method: &str, path: &str, body: Option<&str>, keep_alive: bool) -> String {
    let conn = if keep_alive { "keep-alive" } else { "close" };
    match body {
        Some(b) => format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: {conn}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ),
        None => format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: {conn}\r\n\r\n"),
    }
}

async fn read_reply(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<Reply> {
    loop {
        if let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .context("no status")?
                .parse()?;
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .map(|v| v.parse::<usize>())
                .transpose()?;
            let Some(len) = len else {
                bail!("response without content-length: {head}");
            };
            let total = head_end + 4 + len;
            while buf.len() < total {
                let mut chunk = [0u8; 8192];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    bail!("eof in body");
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[head_end + 4..total]).to_string();
            buf.drain(..total);
            return Ok(Reply { status, body });
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("eof before response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One request on a fresh connection.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<Reply> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(request(method, path, body, false).as_bytes())
            .await?;
        let mut buf = Vec::new();
        read_reply(&mut s, &mut buf).await
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .context("http timeout")?
}

/// `GET path`.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Reply> {
    call(addr, "GET", path, None).await
}

/// A keep-alive connection for many requests.
#[derive(Debug)]
pub struct KeepAlive {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            stream: TcpStream::connect(addr).await?,
            buf: Vec::new(),
        })
    }

    /// Sends a request and reads its reply.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<Reply> {
        self.stream
            .write_all(request(method, path, body, true).as_bytes())
            .await?;
        tokio::time::timeout(
            Duration::from_secs(10),
            read_reply(&mut self.stream, &mut self.buf),
        )
        .await
        .context("http timeout")?
    }

    /// `POST /publish` of `data` (a JSON value) on `channel`; returns the assigned seq.
    pub async fn publish(&mut self, channel: &str, data: &str) -> anyhow::Result<u64> {
        let body = format!(r#"{{"channel":"{channel}","data":{data}}}"#);
        let r = self.call("POST", "/publish", Some(&body)).await?;
        if r.status != 202 {
            bail!("publish failed: {} {}", r.status, r.body);
        }
        let v: serde_json::Value = serde_json::from_str(&r.body)?;
        v["seq"].as_u64().context("no seq")
    }
}

/// Reads a metric's value (sum over label sets matching `labels`, e.g. `shard_id="0"`) from
/// a Prometheus text page.
pub fn metric(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `GET /health` on `addr` until it answers 200 or `limit` passes (a server process
/// started by a test coming up).
pub async fn wait_healthy(addr: SocketAddr, limit: Duration) -> bool {
    wait_until(limit, || async {
        get(addr, "/health").await.is_ok_and(|r| r.status == 200)
    })
    .await
}
