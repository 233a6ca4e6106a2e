//! The WebSocket upgrade on a shard port: refuse early with the right status, take a slot,
//! answer 101, recover the raw socket and start the session.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hyper_util::rt::TokioIo;
use shard_core::session::{self, Mode};
use tokio::net::TcpStream;

use crate::Shard;

fn refuse(status: StatusCode, reason: &'static str) -> Response {
    (status, [(header::CONNECTION, "close")], reason).into_response()
}

/// Checks the parts of the upgrade request fastwebsockets does not: the `Upgrade`
/// header, and a `Sec-WebSocket-Key` that is base64 of 16 bytes (RFC 6455 §4.2.1).
pub(crate) fn check_request<B>(req: &Request<B>) -> Result<(), Response> {
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        let mut r = refuse(StatusCode::UPGRADE_REQUIRED, "WebSocket upgrade required");
        r.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return Err(r);
    }
    if req.headers().get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        let mut r = refuse(StatusCode::UPGRADE_REQUIRED, "unsupported Sec-WebSocket-Version");
        r.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return Err(r);
    }
    let key_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k.as_bytes()).ok())
        .is_some_and(|k| k.len() == 16);
    if !key_ok {
        return Err(refuse(StatusCode::BAD_REQUEST, "missing or invalid Sec-WebSocket-Key"));
    }
    Ok(())
}

pub(crate) async fn handle(State(shard): State<Arc<Shard>>, mut req: Request<Body>, mode: Mode) -> Response {
    let m = &shard.ctx.metrics;
    if let Err(r) = check_request(&req) {
        m.rejected("bad_request");
        return r;
    }
    if shard.ctx.drain.is_cancelled() {
        m.rejected("draining");
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "shard draining");
    }
    let Some(slot) = shard.slots.try_acquire() else {
        m.rejected("full");
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "shard full");
    };
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            m.rejected("bad_request");
            tracing::debug!(error = %e, "bad upgrade request");
            return refuse(StatusCode::BAD_REQUEST, "bad upgrade request");
        }
    };
    m.accepted.increment(1);
    let ctx = shard.ctx.clone();
    shard.sessions.spawn(async move {
        // The slot moves into this task: whatever happens below, it is released.
        let ws = match fut.await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade abandoned");
                drop(slot);
                return;
            }
        };
        match ws.into_inner().into_inner().downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => session::run(parts.io.into_inner(), parts.read_buf, ctx, mode, slot).await,
            Err(_) => tracing::error!("upgraded connection is not a TCP stream"),
        }
    });
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, Body::empty())
}
