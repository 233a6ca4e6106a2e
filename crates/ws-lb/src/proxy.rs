//! `GET /ws`: one client's way through the LB — validation, origin check, admission
//! pacing, shard selection with retries, then either a relay or a close frame that says why.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, Request, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use lb_core::error::{FinalClose, OVERLOADED};
use lb_core::retry::Attempts;
use net_core::upgrade::{check_request, into_axum, into_raw, refuse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use ws_protocol::frame::{self, FrameTracker};

use crate::metrics::{ClientOutcome, Rejection};
use crate::relay::{relay, RelayEnd};
use crate::{ClientIp, Lb};

/// Whether `origin` may open a WebSocket (empty list: any). A request without `Origin`
/// is not from a browser page and cannot be a cross-site hijack, so it is allowed.
fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    match origin {
        _ if allowed.is_empty() => true,
        None => true,
        Some(o) => allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(o.trim_end_matches('/'))),
    }
}

pub(crate) async fn handle(
    State(lb): State<Arc<Lb>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request<Body>,
) -> Response {
    if let Err(r) = check_request(&req) {
        lb.metrics.client(ClientOutcome::Rejected);
        return *r;
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    if !origin_allowed(&lb.cfg.allowed_origins, origin) {
        lb.metrics.rejected(Rejection::Origin);
        lb.metrics.client(ClientOutcome::Rejected);
        return refuse(StatusCode::FORBIDDEN, "origin not allowed");
    }
    if lb.draining() {
        lb.metrics.rejected(Rejection::Draining);
        lb.metrics.client(ClientOutcome::Rejected);
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "load balancer draining");
    }
    let Some(permit) = lb.client_permit() else {
        lb.metrics.rejected(Rejection::ClientLimit);
        lb.metrics.client(ClientOutcome::Rejected);
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "client limit reached");
    };
    let client_ip = ClientIp {
        trust_forwarded_for: lb.cfg.trust_forwarded_for,
    }
    .of(&req)
    .unwrap_or(peer.ip());
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "bad upgrade request");
            lb.metrics.client(ClientOutcome::Rejected);
            return refuse(StatusCode::BAD_REQUEST, "bad upgrade request");
        }
    };

    let outcome = match lb.pacer.reserve(Instant::now()) {
        Err(rejection) => {
            lb.metrics.rejected(rejection.into());
            Err(OVERLOADED)
        }
        Ok(reservation) => {
            lb.metrics.queue_len.set(lb.pacer.queue_len() as f64);
            let waited = Instant::now();
            reservation.wait().await;
            lb.metrics
                .admission_wait
                .record(waited.elapsed().as_secs_f64());
            connect(&lb, client_ip).await
        }
    };

    let task_lb = lb.clone();
    match outcome {
        Ok((shard, shard_prefix, idx)) => {
            lb.relays.spawn(async move {
                let _permit = permit;
                let (client, client_prefix) = match into_raw(upgrade).await {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::debug!(error = %e, "client left before its upgrade completed");
                        return;
                    }
                };
                task_lb.metrics.client(ClientOutcome::Relayed);
                task_lb.metrics.active.increment(1.0);
                let end = relay(
                    client,
                    client_prefix,
                    shard,
                    shard_prefix,
                    &task_lb.relay_opts,
                    &|code| task_lb.metrics.lb_close(code),
                )
                .await;
                task_lb.metrics.active.decrement(1.0);
                task_lb.metrics.relay_end(end);
                if let RelayEnd::ShardLost { notified } = end {
                    tracing::debug!(shard_id = idx, notified, "shard lost mid-session");
                }
            });
        }
        Err(close) => {
            lb.metrics.client(if close.code == OVERLOADED.code {
                ClientOutcome::Closed1013
            } else {
                ClientOutcome::Closed1012
            });
            let close_timeout = lb.cfg.close_timeout;
            lb.relays.spawn(async move {
                let _permit = permit;
                if let Ok((client, _)) = into_raw(upgrade).await {
                    task_lb.metrics.lb_close(close.code);
                    close_client(client, close, close_timeout).await;
                }
            });
        }
    }
    into_axum(response)
}

/// Tries shards until one completes its handshake or the policy gives up.
async fn connect(lb: &Lb, client_ip: IpAddr) -> Result<(TcpStream, Bytes, usize), FinalClose> {
    let mut attempts = Attempts::start(lb.cfg.retry, Instant::now());
    loop {
        let now = Instant::now();
        let lease = lb.pool.select(attempts.tried(), now, &mut rand::rng());
        let Some(lease) = lease else {
            return Err(attempts.final_close(now));
        };
        let idx = lease.index();
        let Some(budget) = attempts.begin(idx, now) else {
            return Err(attempts.final_close(now));
        };
        let (Some(h), Some(backend)) = (lb.metrics.shards.get(idx), lb.backends.get(idx)) else {
            return Err(attempts.final_close(now));
        };
        h.attempts.increment(1);
        if let Some(rank) = lb
            .metrics
            .attempt_rank
            .get(attempts.count().saturating_sub(1))
        {
            rank.increment(1);
        }
        let started = Instant::now();
        match backend.dial(budget, client_ip).await {
            Ok((stream, prefix)) => {
                h.success.increment(1);
                h.duration.record(started.elapsed().as_secs_f64());
                lease.succeed();
                return Ok((stream, prefix, idx));
            }
            Err(e) => {
                h.attempt_error(e.kind());
                lease.fail(&e);
                if !e.counts_against_shard() {
                    // Out of descriptors or ports here: every other shard would fail the
                    // same way, and none of them is to blame. The client hears 1013 at once.
                    tracing::warn!(shard_id = idx, error = %e, "cannot dial a shard: local resources exhausted");
                    return Err(OVERLOADED);
                }
                h.failures.increment(1);
                h.breaker_failures.increment(1);
                tracing::debug!(shard_id = idx, error = %e, "shard handshake failed");
                attempts.fail(e);
                match attempts.next_start(Instant::now()) {
                    Some(at) => sleep_until(at).await,
                    None => return Err(attempts.final_close(Instant::now())),
                }
            }
        }
    }
}

/// Sends the close frame and waits (bounded) for the client's close before closing TCP, so
/// the client reads a clean close with the code instead of a reset.
async fn close_client(mut client: TcpStream, close: FinalClose, wait: Duration) {
    let frame = frame::encode_close(close.code, close.reason);
    if timeout(wait, client.write_all(&frame)).await.is_err() {
        return;
    }
    let mut tracker = FrameTracker::new();
    let mut buf = [0u8; 1024];
    let _ = timeout(wait, async {
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    tracker.observe(buf.get(..n).unwrap_or_default());
                    if tracker.close_seen() && tracker.at_boundary() {
                        return;
                    }
                }
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_rules() {
        let allowed = vec!["https://app.example.com".to_owned()];
        assert!(origin_allowed(&[], Some("https://evil.example")));
        assert!(origin_allowed(&allowed, None));
        assert!(origin_allowed(&allowed, Some("https://APP.example.com")));
        assert!(!origin_allowed(&allowed, Some("https://evil.example")));
        assert!(!origin_allowed(
            &allowed,
            Some("https://app.example.com.evil.example")
        ));
    }
}
