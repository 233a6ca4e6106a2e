//! The admin listener: `GET /metrics`, `GET /health` (all shards of the process) and, with
//! the embedded bus, `POST /publish`.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::value::RawValue;
use shard_core::source::bus::EmbeddedBus;
use ws_protocol::ChannelName;

use crate::Shard;

/// Largest accepted `POST /publish` body.
pub const MAX_PUBLISH_BODY: usize = 1024 * 1024;

#[derive(Deserialize)]
struct PublishRequest {
    channel: String,
    data: Box<RawValue>,
}

async fn publish(
    State(bus): State<EmbeddedBus>,
    body: Result<Json<PublishRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            let msg = serde_json::json!({"error": "invalid_request", "message": e.body_text()});
            return (e.status(), Json(msg)).into_response();
        }
    };
    let channel = match ChannelName::new(&req.channel) {
        Ok(c) => c,
        Err(e) => {
            let msg = serde_json::json!({"error": "invalid_channel", "message": e.to_string()});
            return (StatusCode::BAD_REQUEST, Json(msg)).into_response();
        }
    };
    let pos = bus.publish(channel, req.data.get());
    let body = serde_json::json!({"channel": req.channel, "epoch": pos.epoch, "seq": pos.seq});
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

pub(crate) fn router(
    prometheus: PrometheusHandle,
    bus: Option<EmbeddedBus>,
    shards: Vec<Arc<Shard>>,
) -> Router {
    let mut r = net_core::telemetry::metrics_router(prometheus).route(
        "/health",
        get(move || {
            let all: Vec<_> = shards.iter().map(|s| s.health()).collect();
            std::future::ready(Json(all))
        }),
    );
    if let Some(bus) = bus {
        let p = Router::new()
            .route("/publish", post(publish))
            .layer(DefaultBodyLimit::max(MAX_PUBLISH_BODY))
            .with_state(bus);
        r = r.merge(p);
    }
    r
}
