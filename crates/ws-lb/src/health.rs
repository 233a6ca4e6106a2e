//! Shard health polling (feeding utilization and draining state into the pool) and the
//! LB's own `GET /health`.
//!
//! `/health` is this process's liveness: 200 while it serves clients, 503 only while it
//! drains. Whether any shard can take a client is reported in the body and in
//! `ws_lb_shards_available`, never in the status code: the front load balancer and the
//! instance group's autohealer both act on the status, and a shard-tier outage must neither
//! take every LB out of the front LB (clients would get the front LB's HTTP 5xx instead of a
//! WebSocket closed with 1012) nor get every LB VM recreated.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use lb_core::Reported;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use ws_protocol::{ShardHealth, ShardStatus};

use crate::Lb;

/// Largest health body accepted from a shard.
const MAX_HEALTH_BODY: usize = 64 * 1024;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// What one `/health` poll found.
enum Poll {
    Health(ShardHealth),
    /// No TCP connection could be opened (refused, or the connect timed out).
    Unreachable,
    /// Connected, but no usable answer in time (slow, an error status without a health body,
    /// a malformed body).
    NoAnswer,
}

async fn poll_one(client: HttpClient, uri: String, limit: std::time::Duration) -> Poll {
    let Ok(uri) = uri.parse::<http::Uri>() else {
        return Poll::NoAnswer;
    };
    let fut = async {
        let resp = match client.get(uri).await {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Poll::Unreachable,
            Err(_) => return Poll::NoAnswer,
        };
        let Ok(body) = Limited::new(resp.into_body(), MAX_HEALTH_BODY)
            .collect()
            .await
        else {
            return Poll::NoAnswer;
        };
        match serde_json::from_slice::<ShardHealth>(&body.to_bytes()) {
            Ok(h) => Poll::Health(h),
            Err(_) => Poll::NoAnswer,
        }
    };
    timeout(limit, fut).await.unwrap_or(Poll::NoAnswer)
}

/// Polls every shard's `/health` each `health_interval` until the LB stops.
pub(crate) async fn poll_loop(lb: Arc<Lb>) {
    // The connect gets half the poll's budget, so a connect that never completes (a shard
    // this LB cannot reach) is told apart from a shard that is merely slow to answer.
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_connect_timeout(Some(lb.cfg.health_timeout / 2));
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build(connector);
    let mut tick = tokio::time::interval(lb.cfg.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = lb.shutdown.hard.cancelled() => return,
            _ = tick.tick() => {}
            // Shards just added: admit them as soon as they answer, not a tick later.
            _ = lb.poll_now.notified() => {}
        }
        let mut polls = JoinSet::new();
        // Listed shards only: a removed one takes no new client, whatever its health.
        for (i, b) in lb.pool.listed() {
            let (client, uri, limit) = (client.clone(), b.health_uri(), lb.cfg.health_timeout);
            polls.spawn(async move { (i, poll_one(client, uri, limit).await) });
        }
        while let Some(done) = polls.join_next().await {
            let Ok((i, result)) = done else { continue };
            match result {
                // `draining` and `starting` alike: no new client for now (and a pending
                // shard is admitted only on `ok`).
                Poll::Health(h) => lb.pool.set_health(
                    i,
                    h.utilization(),
                    h.max_connections,
                    reported(h.status),
                    Instant::now(),
                ),
                Poll::Unreachable => {
                    lb.pool.probe_unreachable(i, Instant::now());
                    if let Some(h) = lb.metrics.shard(i) {
                        h.health_poll_failures.increment(1);
                    }
                }
                Poll::NoAnswer => {
                    lb.pool.set_health_unreachable(i);
                    if let Some(h) = lb.metrics.shard(i) {
                        h.health_poll_failures.increment(1);
                    }
                }
            }
        }
        let snapshot = lb.pool.snapshot(Instant::now());
        lb.metrics.update(&snapshot);
        lb.metrics
            .shards_available
            .set(snapshot.iter().filter(|s| s.admits).count() as f64);
        lb.metrics.queue_len.set(lb.pacer.queue_len() as f64);
    }
}

#[derive(Serialize)]
struct LbHealth {
    /// `ok`, `no_shard_available` (live, but every new client gets 1012 until a shard
    /// admits again) or `draining`.
    status: &'static str,
    /// Shards that would take a new client now.
    shards_available: usize,
    /// Listed shards (pending, warming, active).
    shards_total: usize,
    admission_queue: usize,
    /// Every shard with a slot, removed ones included (`member`).
    shards: Vec<lb_core::ShardSnapshot>,
}

/// `GET /health`: 200 unless the LB is draining (503). The body says whether any shard can
/// take a new client (`status`, `shards_available`) and shows each shard's URL, membership
/// state, weight, breaker state, score, utilization and relay count.
pub(crate) async fn lb_health(State(lb): State<Arc<Lb>>) -> Response {
    let snapshot = lb.pool.snapshot(Instant::now());
    let available = snapshot.iter().filter(|s| s.admits).count();
    let status = match (lb.draining(), available) {
        (true, _) => "draining",
        (false, 0) => "no_shard_available",
        (false, _) => "ok",
    };
    let body = LbHealth {
        status,
        shards_available: available,
        shards_total: snapshot
            .iter()
            .filter(|s| s.member != lb_core::MemberState::Removed)
            .count(),
        admission_queue: lb.pacer.queue_len(),
        shards: snapshot,
    };
    let code = if lb.draining() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}

/// A shard's status (from its `/health`, or the header of an upgrade's 503) as the pool
/// keeps it.
pub(crate) fn reported(status: ShardStatus) -> Reported {
    match status {
        ShardStatus::Ok => Reported::Ok,
        ShardStatus::Draining => Reported::Draining,
        ShardStatus::Starting => Reported::Starting,
    }
}
