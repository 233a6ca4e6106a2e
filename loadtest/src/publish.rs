//! The publisher: `POST {"channel","data":{"ts_us","n"}}` at a scheduled rate over a few
//! keep-alive HTTP/1.1 connections (hyper's client, one connection per lane).
//!
//! Message `k` is due at `t0 + k / rate` (the same absolute schedule as the ramp) and goes
//! out on lane `k % connections`; a lane whose previous request is slow falls behind and that
//! shows as publish lag, never as a silently lower rate. `ts_us` is stamped when the request
//! is actually written, so delivery latency measured by the receivers covers the server path
//! only, not the publisher's own lag.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::PublishConfig;
use crate::progress::Progress;
use crate::report::{Percentiles, ScheduleReport};
use crate::schedule::{Schedule, Slot};
use crate::stats::{lock, new_histogram, unix_us};

/// Per-request deadline; a bus that takes longer is counted as `timeout`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the publisher did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PublishReport {
    pub url: String,
    pub target_rate: f64,
    pub achieved_rate: f64,
    pub duration_s: f64,
    pub attempted: u64,
    /// Requests answered with a 2xx status.
    pub accepted: u64,
    /// Responses by HTTP status.
    pub statuses: BTreeMap<String, u64>,
    /// Requests without a response, by cause (`connect`, `io`, `timeout`, `bad_response`).
    pub errors: BTreeMap<String, u64>,
    /// How late each request started relative to its scheduled instant.
    pub lag_us: Percentiles,
    /// Request written to response read.
    pub latency_us: Percentiles,
}

#[derive(Debug)]
struct Shared {
    addr: SocketAddr,
    /// Request path and query.
    path: String,
    /// The Host header value.
    authority: String,
    channels: Vec<String>,
    pad: String,
    t0: Instant,
    acc: Mutex<Acc>,
}

#[derive(Debug)]
struct Acc {
    attempted: u64,
    accepted: u64,
    statuses: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    lag: Histogram<u64>,
    latency: Histogram<u64>,
    first_s: f64,
    last_s: f64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Publishes for `cfg.duration` at `cfg.rate` and reports.
pub async fn publish(cfg: &PublishConfig, progress: &Progress) -> anyhow::Result<PublishReport> {
    let addr = cfg.url.resolve().await?;
    let total = (cfg.duration.as_secs_f64() * cfg.rate).floor() as u64;
    let t0 = Instant::now();
    let shared = Arc::new(Shared {
        addr,
        path: cfg.url.path.clone(),
        authority: cfg.url.authority.clone(),
        channels: cfg.channels.clone(),
        pad: "x".repeat(cfg.pad_bytes),
        t0,
        acc: Mutex::new(Acc {
            attempted: 0,
            accepted: 0,
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            lag: new_histogram(),
            latency: new_histogram(),
            first_s: f64::MAX,
            last_s: 0.0,
        }),
    });
    let schedule = Schedule::new(t0, cfg.rate);
    let lanes = u32::try_from(cfg.connections.max(1)).unwrap_or(1);
    let mut tasks = JoinSet::new();
    for index in 0..lanes {
        let slot = Slot {
            index,
            count: lanes,
        };
        tasks.spawn(lane(shared.clone(), schedule, slot, total));
    }
    let mut tick = tokio::time::interval_at(t0 + Duration::from_secs(1), Duration::from_secs(1));
    loop {
        tokio::select! {
            joined = tasks.join_next() => if joined.is_none() { break },
            _ = tick.tick() => {
                let a = lock(&shared.acc);
                progress.text(&format!(
                    "[{:>6.1}s] published {} accepted {} errors {}",
                    t0.elapsed().as_secs_f64(), a.attempted, a.accepted,
                    a.errors.values().sum::<u64>(),
                ));
            }
        }
    }
    let a = lock(&shared.acc);
    let window = (a.attempted > 0).then_some((a.first_s, a.last_s));
    let sched = ScheduleReport::new(cfg.rate, a.attempted, window, &a.lag);
    Ok(PublishReport {
        url: format!("http://{}{}", cfg.url.authority, cfg.url.path),
        target_rate: cfg.rate,
        achieved_rate: sched.achieved_rate,
        duration_s: t0.elapsed().as_secs_f64(),
        attempted: a.attempted,
        accepted: a.accepted,
        statuses: a.statuses.clone(),
        errors: a.errors.clone(),
        lag_us: sched.lag_us,
        latency_us: Percentiles::of(&a.latency),
    })
}

async fn lane(shared: Arc<Shared>, schedule: Schedule, slot: Slot, total: u64) {
    let mut conn = HttpConn { sender: None };
    for k in slot.indices(total) {
        let due = schedule.at(k);
        tokio::time::sleep_until(due).await;
        let start = Instant::now();
        let channel = shared
            .channels
            .get(usize::try_from(k).unwrap_or(0) % shared.channels.len().max(1));
        let body = if shared.pad.is_empty() {
            serde_json::json!({
                "channel": channel,
                "data": { "ts_us": unix_us(), "n": k },
            })
        } else {
            serde_json::json!({
                "channel": channel,
                "data": { "ts_us": unix_us(), "n": k, "pad": shared.pad },
            })
        }
        .to_string();
        let result = tokio::time::timeout(REQUEST_TIMEOUT, conn.post(&shared, body)).await;
        let latency = micros(start.elapsed());
        let mut a = lock(&shared.acc);
        a.attempted += 1;
        let _ = a.lag.record(micros(start.saturating_duration_since(due)));
        let offset = start.saturating_duration_since(shared.t0).as_secs_f64();
        a.first_s = a.first_s.min(offset);
        a.last_s = a.last_s.max(offset);
        match result {
            Ok(Ok(status)) => {
                let _ = a.latency.record(latency);
                if (200..300).contains(&status) {
                    a.accepted += 1;
                }
                *a.statuses.entry(status.to_string()).or_default() += 1;
            }
            Ok(Err(cause)) => *a.errors.entry(cause.to_owned()).or_default() += 1,
            Err(_) => {
                conn.sender = None;
                *a.errors.entry("timeout".to_owned()).or_default() += 1;
            }
        }
    }
}

/// One keep-alive connection; reconnects after any error or `Connection: close`.
struct HttpConn {
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpConn {
    async fn post(&mut self, shared: &Shared, body: String) -> Result<u16, &'static str> {
        let result = self.exchange(shared, body).await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn exchange(&mut self, shared: &Shared, body: String) -> Result<u16, &'static str> {
        let sender = match &mut self.sender {
            Some(s) if !s.is_closed() => s,
            _ => {
                let s = TcpStream::connect(shared.addr)
                    .await
                    .map_err(|_| "connect")?;
                s.set_nodelay(true).map_err(|_| "connect")?;
                let (sender, conn) = http1::handshake(TokioIo::new(s))
                    .await
                    .map_err(|_| "connect")?;
                tokio::spawn(conn);
                self.sender.insert(sender)
            }
        };
        sender.ready().await.map_err(|_| "io")?;
        let req = hyper::Request::post(shared.path.as_str())
            .header(hyper::header::HOST, shared.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| "bad_request")?;
        let resp = sender.send_request(req).await.map_err(cause)?;
        let status = resp.status().as_u16();
        // Read the body so that the next response starts on a clean stream.
        resp.into_body().collect().await.map_err(cause)?;
        Ok(status)
    }
}

/// The `errors` key of a failed exchange.
fn cause(e: hyper::Error) -> &'static str {
    if e.is_parse() {
        "bad_response"
    } else {
        "io"
    }
}
