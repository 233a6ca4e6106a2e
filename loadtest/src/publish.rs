//! The publisher: `POST {"channel","data":{"ts_us","n"}}` at a scheduled rate over a few
//! keep-alive HTTP/1.1 connections, with a minimal hand-written client.
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

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::PublishConfig;
use crate::handshake::find_head_end;
use crate::progress::Progress;
use crate::report::{Percentiles, ScheduleReport};
use crate::schedule::{Schedule, Slot};
use crate::stats::{lock, new_histogram, unix_us};

/// Per-request deadline; a bus that takes longer is counted as `timeout`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response accepted (head plus body); the bus answers ~60 bytes.
const MAX_RESPONSE: usize = 64 * 1024;

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
    head: String,
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
        head: format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n",
            cfg.url.path, cfg.url.authority
        ),
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
    let mut conn = HttpConn {
        stream: None,
        buf: Vec::new(),
    };
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
        let result =
            tokio::time::timeout(REQUEST_TIMEOUT, conn.post(&shared, body.as_bytes())).await;
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
                conn.stream = None;
                *a.errors.entry("timeout".to_owned()).or_default() += 1;
            }
        }
    }
}

/// One keep-alive connection; reconnects after any error or `Connection: close`.
struct HttpConn {
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl HttpConn {
    async fn post(&mut self, shared: &Shared, body: &[u8]) -> Result<u16, &'static str> {
        let result = self.exchange(shared, body).await;
        if !matches!(result, Ok((_, true))) {
            self.stream = None;
        }
        result.map(|(status, _)| status)
    }

    /// Returns the status and whether the connection may be reused.
    async fn exchange(
        &mut self,
        shared: &Shared,
        body: &[u8],
    ) -> Result<(u16, bool), &'static str> {
        if self.stream.is_none() {
            let s = TcpStream::connect(shared.addr)
                .await
                .map_err(|_| "connect")?;
            s.set_nodelay(true).map_err(|_| "connect")?;
            self.stream = Some(s);
        }
        let stream = self.stream.as_mut().ok_or("connect")?;
        let mut req = Vec::with_capacity(shared.head.len() + 32 + body.len());
        req.extend_from_slice(shared.head.as_bytes());
        req.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        req.extend_from_slice(body);
        stream.write_all(&req).await.map_err(|_| "io")?;
        self.buf.clear();
        let head_end = loop {
            if stream.read_buf(&mut self.buf).await.map_err(|_| "io")? == 0 {
                return Err("io");
            }
            if let Some(end) = find_head_end(&self.buf, 0) {
                break end;
            }
            if self.buf.len() > MAX_RESPONSE {
                return Err("bad_response");
            }
        };
        let head = std::str::from_utf8(self.buf.get(..head_end).unwrap_or_default())
            .map_err(|_| "bad_response")?;
        let parsed = parse_response_head(head).ok_or("bad_response")?;
        let body_start = head_end + 4;
        // Read the rest of the body so the next response starts on a clean stream.
        loop {
            let got = self.buf.get(body_start..).unwrap_or_default();
            let complete = match parsed.content_length {
                Some(n) => got.len() >= n,
                None if parsed.chunked => got.ends_with(b"0\r\n\r\n"),
                None => true,
            };
            if complete {
                break;
            }
            if self.buf.len() > MAX_RESPONSE
                || stream.read_buf(&mut self.buf).await.map_err(|_| "io")? == 0
            {
                return Err("bad_response");
            }
        }
        Ok((
            parsed.status,
            parsed.keep_alive && (parsed.content_length.is_some() || parsed.chunked),
        ))
    }
}

#[derive(Debug, PartialEq)]
struct ResponseHead {
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
    keep_alive: bool,
}

fn parse_response_head(head: &str) -> Option<ResponseHead> {
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut r = ResponseHead {
        status,
        content_length: None,
        chunked: false,
        keep_alive: true,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            r.content_length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            r.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            r.keep_alive = !value.eq_ignore_ascii_case("close");
        }
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_response_heads() {
        let h = parse_response_head(
            "HTTP/1.1 202 Accepted\r\ncontent-length: 42\r\nConnection: keep-alive",
        );
        assert_eq!(
            h,
            Some(ResponseHead {
                status: 202,
                content_length: Some(42),
                chunked: false,
                keep_alive: true
            })
        );
        let h = parse_response_head(
            "HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\nConnection: close",
        )
        .unwrap();
        assert!(h.chunked && !h.keep_alive && h.status == 503);
        assert_eq!(parse_response_head("nonsense"), None);
    }
}
