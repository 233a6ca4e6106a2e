//! The WebSocket upgrade on a shard port: refuse early with the right status, take a slot,
//! answer 101, recover the raw socket and start the session.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use net_core::upgrade::{check_request, into_axum, into_raw, raw_parts, refuse};
use shard_core::metrics::UpgradeRejection;
use shard_core::session::{self, Admission, Mode};
use shard_core::SlotGuard;
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

/// Why a connection was not admitted: the status (and `X-Odin-Shard-Status`) an upgrade is
/// answered with; a link's `REFUSE` carries the same.
pub(crate) struct Refused {
    status: StatusCode,
    shard_status: Option<ShardStatus>,
    reason: &'static str,
}

impl Refused {
    fn new(status: StatusCode, reason: &'static str) -> Self {
        Self {
            status,
            shard_status: None,
            reason,
        }
    }

    fn not_ready(status: ShardStatus, reason: &'static str) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            shard_status: Some(status),
            reason,
        }
    }

    fn into_response(self) -> Response {
        match self.shard_status {
            Some(s) => not_ready(s, self.reason),
            None => refuse(self.status, self.reason),
        }
    }

    fn into_refusal(self) -> tier_mux::Refusal {
        tier_mux::Refusal {
            status: self.status.as_u16(),
            shard_status: self.shard_status,
            reason: self.reason.to_owned(),
        }
    }
}

/// Admission of a connection, by upgrade or by a link's `OPEN`: not draining, not starting
/// (a warm-up about to end is waited for), a free slot, and what the token says.
async fn admit(
    shard: &Shard,
    mode: Mode,
    token: Option<&str>,
) -> Result<(SlotGuard, Admission), Refused> {
    let m = &shard.ctx.metrics;
    if shard.ctx.drain.is_fired() {
        m.rejected(UpgradeRejection::Draining);
        return Err(Refused::not_ready(ShardStatus::Draining, "shard draining"));
    }
    // Its `/health` says `starting`, so ws-lb places no client here — but a load balancer
    // learns that only at its next poll (a breaker's trial can arrive first) and a client
    // may dial directly: a subscribe with `since` now would be told `recovered: false` for
    // history still being re-read. A warm-up about to end is waited for (the client gets in
    // here instead of going elsewhere); a longer one is refused: another shard can take it.
    if !shard.source.wait_ready(STARTING_WAIT).await {
        m.rejected(UpgradeRejection::Starting);
        return Err(Refused::not_ready(ShardStatus::Starting, "shard starting"));
    }
    let Some(slot) = shard.slots.try_acquire() else {
        m.rejected(UpgradeRejection::Full);
        return Err(Refused::new(StatusCode::SERVICE_UNAVAILABLE, "shard full"));
    };
    // The token ws-lb forwards (`Authorization: Bearer` or in `OPEN`), or a direct client's
    // `?token=`; verified here again, with the same keys. Never logged.
    let admission = if mode == Mode::PubSub {
        Admission::of(&shard.ctx.auth, m, token)
    } else {
        Admission::Anonymous
    };
    Ok((slot, admission))
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
    let (slot, admission) = match admit(&shard, mode, bearer_token(&req)).await {
        Ok(admitted) => admitted,
        Err(r) => return r.into_response(),
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

/// `GET /mux` with `Upgrade: odin-mux/1`: a tier link from ws-lb carrying many clients'
/// connections (`tier_mux`). Each stream the LB opens is admitted as an upgrade would be and
/// served by the same session loop; the link itself takes no slot.
pub(crate) async fn handle_link(
    State(shard): State<Arc<Shard>>,
    mut req: Request<Body>,
) -> Response {
    let wanted = req
        .headers()
        .get(axum::http::header::UPGRADE)
        .is_some_and(|v| v.as_bytes() == tier_mux::upgrade::PROTOCOL.as_bytes());
    if !wanted {
        return refuse(StatusCode::UPGRADE_REQUIRED, "Upgrade: odin-mux/1 required");
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let link_shard = shard.clone();
    tokio::spawn(async move {
        let (sock, prefix) = match on_upgrade
            .await
            .map_err(|e| e.to_string())
            .and_then(|u| raw_parts(u).map_err(|e| e.to_string()))
        {
            Ok(parts) => parts,
            Err(e) => return tracing::debug!(error = %e, "link upgrade not completed"),
        };
        let opener = link_shard.clone();
        let link = tier_mux::Link::shard(Box::new(move |stream, open| {
            open_stream(&opener, stream, open)
        }));
        link_shard.ctx.metrics.links.increment(1.0);
        let end = link.run(sock, prefix).await;
        link_shard.ctx.metrics.links.decrement(1.0);
        tracing::info!(shard_id = link_shard.ctx.shard_id, reason = %end, "tier link ended");
    });
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("Upgrade"),
    );
    h.insert(
        axum::http::header::UPGRADE,
        axum::http::HeaderValue::from_static(tier_mux::upgrade::PROTOCOL),
    );
    r
}

/// A stream the LB opened: admitted like an upgrade (in its own task: a warm-up may be
/// waited for), then the session.
fn open_stream(shard: &Arc<Shard>, stream: tier_mux::MuxStream, open: tier_mux::Open) {
    let path = open.path.split('?').next().unwrap_or("");
    let mode = match path {
        "/ws" => Mode::PubSub,
        "/echo" if shard.echo => Mode::Echo,
        _ => {
            shard.ctx.metrics.rejected(UpgradeRejection::BadRequest);
            return stream
                .refuse(&Refused::new(StatusCode::NOT_FOUND, "no such path").into_refusal());
        }
    };
    // Streams beyond what the slots could ever admit are refused at once, so that a peer
    // cannot pile up admissions (each may wait for a warm-up) faster than they end.
    if stream.link_streams() > 2 * shard.slots.max() {
        shard.ctx.metrics.rejected(UpgradeRejection::Full);
        return stream
            .refuse(&Refused::new(StatusCode::SERVICE_UNAVAILABLE, "shard full").into_refusal());
    }
    let shard = shard.clone();
    shard.clone().sessions.spawn(async move {
        match admit(&shard, mode, open.token.as_deref()).await {
            Err(r) => stream.refuse(&r.into_refusal()),
            Ok((slot, admission)) => {
                if !stream.accept() {
                    return;
                }
                shard.ctx.metrics.accepted.increment(1);
                session::run(
                    stream,
                    Bytes::new(),
                    shard.ctx.clone(),
                    mode,
                    admission,
                    slot,
                )
                .await;
            }
        }
    });
}
