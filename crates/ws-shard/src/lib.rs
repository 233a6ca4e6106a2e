//! The ws-shard server: N independent shards in one process, sharing one message source.
//!
//! Shard `i` serves, on its own listener: `GET /ws` (the pub/sub WebSocket), `GET /health`
//! (a [`ShardHealth`] report) and, with echo enabled, `GET /echo`. The admin listener serves
//! `GET /metrics` and, with the embedded bus, `POST /publish`.
//!
//! An upgrade takes a connection slot *before* answering 101; a full or draining shard
//! answers 503 so a load balancer can try another shard. After the upgrade the raw
//! `TcpStream` is recovered from hyper and handed to `shard_core::session::run`.

mod admin;
mod upgrade;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use net_core::{HttpLimits, Shutdown, SocketOptions};
use shard_core::metrics::{ShardMetrics, MAX_CONNECTIONS};
use shard_core::session::{Mode, ShardContext};
use shard_core::source::bus::{fresh_epoch, EmbeddedBus};
use shard_core::source::{MessageSource, SourceStatus};
use shard_core::{Hub, HubConfig, SessionConfig, Slots};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use ws_protocol::{ShardHealth, ShardStatus};

/// Where messages come from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// The embedded bus, optionally with the demo feed at `demo_rate` ticks/s per channel.
    Embedded { demo_rate: Option<u32> },
    /// One Kafka consumer feeding every shard of the process.
    Kafka(kafka_source::KafkaConfig),
}

/// Everything the server needs, validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub max_connections: usize,
    pub session: SessionConfig,
    /// `Some` enables `GET /echo` with these limits.
    pub echo: Option<SessionConfig>,
    pub hub: HubConfig,
    pub http: HttpLimits,
    /// Options for accepted client sockets.
    pub socket: SocketOptions,
    pub source: SourceConfig,
    /// Longest a drain may take before the process stops anyway.
    pub grace: Duration,
    /// Token verification; off when no key file is configured.
    pub auth: auth::AuthConfig,
}

impl Default for ServerConfig {
    /// Production values: the embedded bus without the demo feed, no `/echo`.
    fn default() -> Self {
        Self {
            max_connections: 6000,
            session: SessionConfig::default(),
            echo: None,
            hub: HubConfig::default(),
            http: HttpLimits::default(),
            socket: SocketOptions::default(),
            source: SourceConfig::Embedded { demo_rate: None },
            grace: Duration::from_secs(30),
            auth: auth::AuthConfig::default(),
        }
    }
}

/// Pre-bound listeners: one per shard (shard `i` = index `i`) and the admin listener.
#[derive(Debug)]
pub struct Listeners {
    pub shards: Vec<TcpListener>,
    pub admin: TcpListener,
}

/// Failures that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("no shard listeners given")]
    NoShards,
    #[error("at most {max} shards per process, got {got}", max = shard_core::hub::MAX_SHARDS_PER_PROCESS)]
    TooManyShards { got: usize },
    #[error(transparent)]
    Source(#[from] shard_core::source::SourceError),
    #[error("authentication: {0}")]
    Auth(#[from] auth::StartError),
}

/// One shard's shared state.
#[derive(Debug)]
pub(crate) struct Shard {
    pub(crate) slots: Arc<Slots>,
    pub(crate) ctx: Arc<ShardContext>,
    pub(crate) echo: bool,
    pub(crate) source: Arc<SourceStatus>,
    pub(crate) sessions: TaskTracker,
}

impl Shard {
    pub(crate) fn health(&self) -> ShardHealth {
        ShardHealth {
            shard_id: self.ctx.shard_id,
            status: if self.ctx.drain.is_fired() {
                ShardStatus::Draining
            } else if !self.source.ready() {
                ShardStatus::Starting
            } else {
                ShardStatus::Ok
            },
            connections: self.slots.current() as u64,
            max_connections: self.slots.max() as u64,
            source: self.source.health(),
        }
    }
}

async fn health(State(shard): State<Arc<Shard>>) -> Response {
    let h = shard.health();
    let status = if h.status == ShardStatus::Ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(h)).into_response()
}

fn shard_router(shard: Arc<Shard>) -> Router {
    let mut r = Router::new()
        .route("/ws", get(|s, req| upgrade::handle(s, req, Mode::PubSub)))
        .route(tier_mux::upgrade::PATH, get(upgrade::handle_link))
        .route("/health", get(health))
        .route("/live", get(|| std::future::ready("live\n")));
    if shard.echo {
        r = r.route("/echo", get(|s, req| upgrade::handle(s, req, Mode::Echo)));
    }
    r.with_state(shard)
}

/// Runs the server until a drain completes or a hard stop. Returns the number of sessions
/// still open at exit (0 after a complete drain).
pub async fn run(
    listeners: Listeners,
    cfg: ServerConfig,
    prometheus: PrometheusHandle,
    shutdown: Shutdown,
) -> Result<usize, ServerError> {
    let n = listeners.shards.len();
    if n == 0 {
        return Err(ServerError::NoShards);
    }
    if n > shard_core::hub::MAX_SHARDS_PER_PROCESS {
        return Err(ServerError::TooManyShards { got: n });
    }
    let verifier = Arc::new(auth::Verifier::new(cfg.auth.clone())?);
    let epoch = fresh_epoch();
    let hub = Hub::new(cfg.hub, n as u32, &epoch);
    let tasks = TaskTracker::new();
    tasks.spawn(maintain(hub.clone(), shutdown.hard.clone()));
    if verifier.enabled() {
        tasks.spawn(reload_keys(verifier.clone(), shutdown.hard.clone()));
    }

    let (status, bus) = match cfg.source {
        SourceConfig::Embedded { demo_rate } => {
            let bus = EmbeddedBus::new(hub.clone(), &epoch);
            let status = bus.status();
            if let Some(rate) = demo_rate {
                tasks.spawn(shard_core::source::demo::run(
                    bus.clone(),
                    rate,
                    shutdown.drain.clone(),
                ));
            }
            let runner = bus.clone();
            let (h, stop) = (hub.clone(), shutdown.hard.clone());
            tasks.spawn(async move {
                if let Err(e) = runner.run(h, stop).await {
                    tracing::error!(error = %e, "embedded bus stopped");
                }
            });
            (status, Some(bus))
        }
        SourceConfig::Kafka(kcfg) => {
            let source = kafka_source::KafkaSource::new(kcfg)?;
            let status = source.status();
            let (h, stop) = (hub.clone(), shutdown.hard.clone());
            tasks.spawn(async move {
                if let Err(e) = source.run(h, stop).await {
                    tracing::error!(error = %e, "kafka source stopped");
                }
            });
            (status, None)
        }
    };

    let sessions = TaskTracker::new();
    let mut shards = Vec::with_capacity(n);
    for (i, listener) in listeners.shards.into_iter().enumerate() {
        let id = i as u32;
        let metrics = ShardMetrics::new(id);
        metrics::gauge!(MAX_CONNECTIONS, "shard_id" => id.to_string())
            .set(cfg.max_connections as f64);
        let slots = Slots::new(cfg.max_connections, Some(metrics.connections.clone()));
        let ctx = Arc::new(ShardContext {
            shard_id: id,
            hub: hub.clone(),
            pubsub: cfg.session,
            echo: cfg.echo.unwrap_or(cfg.session),
            metrics,
            drain: shutdown.drained.clone(),
            auth: verifier.clone(),
        });
        let shard = Arc::new(Shard {
            slots,
            ctx,
            echo: cfg.echo.is_some(),
            source: status.clone(),
            sessions: sessions.clone(),
        });
        let addr = listener.local_addr().ok();
        tracing::info!(shard_id = id, ?addr, "shard listening");
        let router = shard_router(shard.clone());
        tasks.spawn(serve(
            listener,
            "shard",
            router,
            cfg.http,
            cfg.socket,
            shutdown.clone(),
            tasks.clone(),
        ));
        shards.push(shard);
    }

    let admin = admin::router(prometheus, bus, shards.clone());
    tasks.spawn(serve(
        listeners.admin,
        "admin",
        admin,
        cfg.http,
        SocketOptions::default(),
        shutdown.clone(),
        tasks.clone(),
    ));

    tokio::select! {
        _ = shutdown.drain.cancelled() => {}
        _ = shutdown.hard.cancelled() => {}
    }
    tracing::info!(sessions = sessions.len(), "draining");
    sessions.close();
    tokio::select! {
        _ = sessions.wait() => tracing::info!("all sessions closed"),
        _ = shutdown.hard.cancelled() => {}
    }
    let left = sessions.len();
    // Stop the listeners and the source.
    shutdown.hard.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
    Ok(left)
}

/// Re-reads the key files every `reload_interval` while they change; a bad file keeps the
/// last good keys (and says so in the log).
async fn reload_keys(verifier: Arc<auth::Verifier>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(verifier.config().reload_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => match verifier.reload_if_changed() {
                Ok(true) => tracing::info!("key files changed: new keys in use"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "key files unreadable or invalid: keeping the last good keys"),
            },
        }
    }
}

/// Runs the hub's maintenance (hub clock, idle channels, budget, registry gauges) until the
/// hard stop.
async fn maintain(hub: Arc<Hub>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(hub.maintenance_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            now = tick.tick() => hub.maintain(now.into_std()),
        }
    }
}

async fn serve(
    listener: TcpListener,
    name: &'static str,
    router: Router,
    limits: HttpLimits,
    socket: SocketOptions,
    shutdown: Shutdown,
    tasks: TaskTracker,
) {
    // Plain HTTP connections (health polls, publishes) keep being served while draining, so
    // a draining shard still answers `/health` with `draining` and `/ws` with 503.
    let idle_close = shutdown.hard.clone();
    net_core::accept_loop(
        listener,
        name,
        socket,
        shutdown.hard.clone(),
        |stream, peer| {
            tasks.spawn(net_core::serve_connection(
                stream,
                peer,
                router.clone(),
                limits,
                idle_close.clone(),
            ));
        },
    )
    .await;
}
