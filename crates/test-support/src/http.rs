//! HTTP for tests, on hyper-util's client: one request per connection ([`call`], [`get`]),
//! or many on one keep-alive connection ([`KeepAlive`]) for fast publishing.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A response: status and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client keeping at most `idle` connections open between requests.
fn client(idle: usize) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(idle)
        .build_http()
}

async fn send(
    client: &HttpClient,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<Reply> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if body.is_some() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))?;
    let fut = async {
        let resp = client.request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok(Reply {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .context("http timeout")?
}

/// One request on a fresh connection.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<Reply> {
    send(&client(0), addr, method, path, body).await
}

/// `GET path`.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Reply> {
    call(addr, "GET", path, None).await
}

/// A keep-alive connection for many requests.
#[derive(Debug)]
pub struct KeepAlive {
    client: HttpClient,
    addr: SocketAddr,
}

impl KeepAlive {
    /// A client for `addr` that keeps its connection between requests.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        Ok(Self {
            client: client(1),
            addr,
        })
    }

    /// Sends a request and reads its reply.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<Reply> {
        send(&self.client, self.addr, method, path, body).await
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
