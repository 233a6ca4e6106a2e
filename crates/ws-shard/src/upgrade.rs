//! The WebSocket upgrade on a shard port: refuse early with the right status, take a slot,
//! answer 101, recover the raw socket and start the session.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use net_core::upgrade::{check_request, into_axum, into_raw, refuse};
use shard_core::metrics::UpgradeRejection;
use shard_core::session::{self, Admission, Mode};
use ws_protocol::health::SHARD_STATUS_HEADER;
use ws_protocol::ShardStatus;

use crate::Shard;

/// The upgrade request's token: `Authorization: Bearer <token>`, else `?token=<token>`.
fn bearer_token(req: &Request<Body>) -> Option<&str> {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    header.or_else(|| {
        req.uri()
            .query()?
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .filter(|t| !t.is_empty())
    })
}

/// How long an upgrade waits for the Kafka history warm-up to end before the shard refuses it
/// with 503: under ws-lb's default `attempt_timeout` (2 s), so the LB gets the answer in time.
const STARTING_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The 503 of a shard that is draining or starting: the reason in the body, the status in
/// [`SHARD_STATUS_HEADER`] so that ws-lb tries another shard without holding the refusal
/// against this one's breaker (it is not full, and not broken).
fn not_ready(status: ShardStatus, reason: &'static str) -> Response {
    let mut r = refuse(StatusCode::SERVICE_UNAVAILABLE, reason);
    r.headers_mut().insert(
        SHARD_STATUS_HEADER,
        axum::http::HeaderValue::from_static(status.as_str()),
    );
    r
}

pub(crate) async fn handle(
    State(shard): State<Arc<Shard>>,
    mut req: Request<Body>,
    mode: Mode,
) -> Response {
    let m = &shard.ctx.metrics;
    if let Err(r) = check_request(&req) {
        m.rejected(UpgradeRejection::BadRequest);
        return *r;
    }
    if shard.ctx.drain.is_fired() {
        m.rejected(UpgradeRejection::Draining);
        return not_ready(ShardStatus::Draining, "shard draining");
    }
    // Its `/health` says `starting`, so ws-lb places no client here — but a load balancer
    // learns that only at its next poll (a breaker's trial can arrive first) and a client
    // may dial directly: a subscribe with `since` now would be told `recovered: false` for
    // history still being re-read. A warm-up about to end is waited for (the client gets in
    // here instead of going elsewhere); a longer one is refused: another shard can take it.
    if !shard.source.wait_ready(STARTING_WAIT).await {
        m.rejected(UpgradeRejection::Starting);
        return not_ready(ShardStatus::Starting, "shard starting");
    }
    let Some(slot) = shard.slots.try_acquire() else {
        m.rejected(UpgradeRejection::Full);
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "shard full");
    };
    // The token ws-lb forwards (`Authorization: Bearer`), or a direct client's `?token=`;
    // verified here again, with the same keys. Never logged.
    let admission = if mode == Mode::PubSub {
        Admission::of(&shard.ctx.auth, m, bearer_token(&req))
    } else {
        Admission::Anonymous
    };
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "bad upgrade request");
            m.rejected(UpgradeRejection::BadRequest);
            return refuse(StatusCode::BAD_REQUEST, "bad upgrade request");
        }
    };
    m.accepted.increment(1);
    let ctx = shard.ctx.clone();
    shard.sessions.spawn(async move {
        // The slot moves into this task: whatever happens below, it is released.
        match into_raw(fut).await {
            Ok((stream, prefix)) => session::run(stream, prefix, ctx, mode, admission, slot).await,
            Err(e) => tracing::debug!(error = %e, "upgrade not completed"),
        }
    });
    into_axum(response)
}
