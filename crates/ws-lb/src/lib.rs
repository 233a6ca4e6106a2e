//! The ws-lb server: admits clients, picks a shard, completes the shard's handshake first,
//! then the client's, and relays frames until either side closes.
//!
//! A client is never dropped silently. If no shard can take it, the client's upgrade still
//! completes and it receives a close frame saying why: 1013 (overloaded — retry) or 1012 (no
//! shard available). A browser cannot read the HTTP status of a failed handshake; the close
//! code is what it sees. Policy — breakers, scores, selection, retry budget, pacing — comes
//! from lb-core; this crate does the I/O.

mod backend;
mod edge_auth;
mod front;
mod health;
mod membership;
pub mod metrics;
mod proxy;
mod relay;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use http::Request;
use lb_core::{
    BreakerConfig, ConfigError, Pacer, PacingConfig, RetryConfig, ScoreConfig, ShardPool,
};
use metrics_exporter_prometheus::PrometheusHandle;
use net_core::{HttpLimits, Shutdown, SocketOptions};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::{GovernorError, GovernorLayer};

pub use backend::{Backend, BadBackend};
pub use membership::MembershipSource;
pub use relay::RelayEnd;

/// Per-client-IP limit on new connections, answered with HTTP 429 before any upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerIpLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// Everything the LB needs, validated.
#[derive(Debug, Clone)]
pub struct LbConfig {
    /// Shard URLs, `ws://host:port/path`: the whole membership when `membership` is
    /// static.
    pub backends: Vec<String>,
    /// Where the shard list comes from, and how it is kept current.
    pub membership: MembershipSource,
    /// How often a file source's modification time is checked, or a DNS name resolved
    /// (also the DNS lookup's time limit).
    pub membership_interval: Duration,
    /// How long a shard that joins a running pool takes to reach its full share of new
    /// connections (its selection weight ramps from 10 % to 100 %); zero: at once.
    pub slow_start: Duration,
    pub breaker: BreakerConfig,
    pub score: ScoreConfig,
    pub retry: RetryConfig,
    pub pacing: PacingConfig,
    /// `None` disables the per-IP limit.
    pub per_ip: Option<PerIpLimit>,
    /// Clients relayed or being connected at once (each holds two sockets); beyond it a
    /// new client gets 503 before its upgrade, well before the process runs out of
    /// descriptors. 0 = no cap.
    pub max_clients: usize,
    /// Take the client IP from `X-Forwarded-For` (as set by the GCP HTTP(S) load balancer:
    /// the entry before the last) instead of the TCP peer.
    pub trust_forwarded_for: bool,
    /// Allowed `Origin` values; empty allows any (only for local runs).
    pub allowed_origins: Vec<String>,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub http: HttpLimits,
    /// Options for accepted client sockets.
    pub socket: SocketOptions,
    pub close_timeout: Duration,
    /// A relayed client (or shard) that takes no byte of what waits for it for this long is
    /// dropped (see `relay::machine::Timers::stall_timeout`).
    pub stall_timeout: Duration,
    pub drain_window: Duration,
    pub grace: Duration,
    /// Token verification; off when no key file is configured.
    pub auth: auth::AuthConfig,
    /// With authentication on and no `?token=`, how long the client has to send its first
    /// message (`auth`, or anything when public channels exist).
    pub auth_timeout: Duration,
    /// Connections per token subject in this process; beyond it the client is closed with
    /// 4003. 0 = no limit.
    pub max_connections_per_sub: usize,
    /// Carry clients to each shard as streams of one TCP connection (the tier link,
    /// `GET /mux`) instead of one TCP connection per client. Experimental; off by default.
    pub tier_mux: bool,
}

impl Default for LbConfig {
    /// Production values; `backends` is empty (a deployment must name its shards).
    fn default() -> Self {
        Self {
            backends: Vec::new(),
            membership: MembershipSource::Static,
            membership_interval: Duration::from_secs(2),
            slow_start: Duration::from_secs(30),
            breaker: BreakerConfig::default(),
            score: ScoreConfig::default(),
            retry: RetryConfig::default(),
            pacing: PacingConfig::default(),
            per_ip: Some(PerIpLimit {
                per_second: 100,
                burst: 200,
            }),
            max_clients: 0,
            trust_forwarded_for: false,
            allowed_origins: Vec::new(),
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_millis(500),
            http: HttpLimits::default(),
            socket: SocketOptions::default(),
            close_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(30),
            drain_window: Duration::from_secs(10),
            grace: Duration::from_secs(30),
            auth: auth::AuthConfig::default(),
            auth_timeout: Duration::from_secs(5),
            max_connections_per_sub: 0,
            tier_mux: false,
        }
    }
}

impl LbConfig {
    /// Checks what the parts' own constructors do not.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.membership_interval.is_zero() {
            return Err(ConfigError::new("membership_interval", "must be positive"));
        }
        if self.stall_timeout.is_zero() {
            return Err(ConfigError::new(
                "stall_timeout",
                "must be positive (it bounds how long a client that stopped reading is kept)",
            ));
        }
        Ok(self)
    }
}

/// Pre-bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// Clients: `GET /ws`, `GET /health`.
    pub client: TcpListener,
    /// `GET /metrics`.
    pub admin: TcpListener,
}

/// Failures that stop the LB before it serves.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    #[error(transparent)]
    Backend(#[from] BadBackend),
    #[error(transparent)]
    Pool(#[from] lb_core::pool::PoolSizeError),
    #[error("invalid per-IP limit: rate and burst must both be positive")]
    PerIp,
    #[error("authentication: {0}")]
    Auth(#[from] auth::StartError),
    #[error("membership source: {0}")]
    Membership(#[from] membership::Failure),
}

/// Shared state of one LB process.
#[derive(Debug)]
pub(crate) struct Lb {
    pub(crate) cfg: LbConfig,
    /// The shards, each with how to dial it.
    pub(crate) pool: ShardPool<Arc<Backend>>,
    /// Wakes the health poller at once (a membership update added shards to admit).
    pub(crate) poll_now: tokio::sync::Notify,
    pub(crate) pacer: Pacer,
    pub(crate) metrics: metrics::LbMetrics,
    pub(crate) relays: TaskTracker,
    pub(crate) relay_opts: relay::RelayOptions,
    pub(crate) shutdown: Shutdown,
    /// Clients between admission and the end of their relay: `max_clients` permits
    /// (`Semaphore::MAX_PERMITS` when there is no cap).
    pub(crate) clients: Arc<tokio::sync::Semaphore>,
    pub(crate) verifier: Arc<auth::Verifier>,
    /// Connections per token subject (`max_connections_per_sub`).
    pub(crate) subjects: Arc<edge_auth::SubjectCounts>,
}

impl Lb {
    /// One unit of `max_clients`, held until the relay ends or the client leaves; `None`
    /// at the cap.
    pub(crate) fn client_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.clients.clone().try_acquire_owned().ok()
    }
}

impl Lb {
    pub(crate) fn draining(&self) -> bool {
        self.shutdown.drained.is_fired()
    }
}

/// The client IP used for the per-IP limit and passed to shards.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientIp {
    trust_forwarded_for: bool,
}

impl ClientIp {
    pub(crate) fn of<T>(&self, req: &Request<T>) -> Option<IpAddr> {
        let peer = req
            .extensions()
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())?;
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        Some(Self::of_parts(self.trust_forwarded_for, peer, forwarded))
    }

    /// The client IP from the TCP peer and the first `X-Forwarded-For` header.
    pub(crate) fn of_parts(
        trust_forwarded_for: bool,
        peer: IpAddr,
        forwarded: Option<&str>,
    ) -> IpAddr {
        if !trust_forwarded_for {
            return peer;
        }
        // GCP appends "<client-ip>,<load-balancer-ip>" to whatever the client sent, so the
        // trustworthy entry is the second from the right; anything further left is
        // client-supplied and could be forged.
        forwarded
            .and_then(|v| {
                let mut parts = v.rsplit(',').map(str::trim);
                parts.next()?;
                parts.next()?.parse::<IpAddr>().ok()
            })
            .unwrap_or(peer)
    }
}

impl KeyExtractor for ClientIp {
    type Key = IpAddr;

    fn extract<T>(&self, req: &Request<T>) -> Result<Self::Key, GovernorError> {
        self.of(req).ok_or(GovernorError::UnableToExtractKey)
    }
}

/// The router hyper serves the client listener with, and the per-IP limiter it shares with
/// the fast path (`front`).
fn client_router(lb: Arc<Lb>) -> Result<(Router, Option<front::PerIpLimiter>), LbError> {
    let ws = get(proxy::handle);
    let mut shared = None;
    let ws = match lb.cfg.per_ip {
        None => ws,
        Some(limit) => {
            let period = Duration::from_secs(1)
                .checked_div(limit.per_second)
                .filter(|p| !p.is_zero())
                .ok_or(LbError::PerIp)?;
            let config = GovernorConfigBuilder::default()
                .key_extractor(ClientIp {
                    trust_forwarded_for: lb.cfg.trust_forwarded_for,
                })
                .period(period)
                .burst_size(limit.burst)
                .finish()
                .ok_or(LbError::PerIp)?;
            let limiter = config.limiter().clone();
            shared = Some(limiter.clone());
            // The per-IP table grows with distinct clients; forget idle ones regularly.
            let stop = lb.shutdown.hard.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(30));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => limiter.retain_recent(),
                    }
                }
            });
            let rejected = lb.metrics.rejection_counter(metrics::Rejection::PerIp);
            let refused = lb.metrics.outcome_counter(metrics::ClientOutcome::Rejected);
            ws.layer(GovernorLayer::new(config).error_handler(move |e| {
                rejected.increment(1);
                refused.increment(1);
                let r = e.into_response();
                let (parts, body) = r.into_parts();
                axum::response::Response::from_parts(parts, axum::body::Body::from(body))
            }))
        }
    };
    let router = Router::new()
        .route("/ws", ws)
        .route("/health", get(health::lb_health))
        .with_state(lb);
    Ok((router, shared))
}

/// Re-reads the key files every `reload_interval` while they change; a bad file keeps the
/// last good keys (and says so in the log).
pub(crate) async fn reload_keys(
    verifier: Arc<auth::Verifier>,
    stop: tokio_util::sync::CancellationToken,
) {
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

/// Runs the LB until a drain completes or a hard stop. Returns the number of client
/// connections still open at exit.
pub async fn run(
    listeners: Listeners,
    cfg: LbConfig,
    prometheus: PrometheusHandle,
    shutdown: Shutdown,
) -> Result<usize, LbError> {
    let members: membership::Members = match &cfg.membership {
        MembershipSource::Static => cfg
            .backends
            .iter()
            .map(|u| Ok((u.clone(), Arc::new(Backend::parse(u)?))))
            .collect::<Result<_, BadBackend>>()?,
        source => membership::read(source, cfg.membership_interval).await?,
    };
    let urls: Vec<String> = members.iter().map(|(u, _)| u.clone()).collect();
    let shard_metrics = Arc::new(metrics::ShardTable::new());
    let observer = Arc::new(metrics::TransitionRecorder::new(shard_metrics.clone()));
    let pool = ShardPool::new(members, cfg.breaker, cfg.score, cfg.slow_start, observer)?;
    tracing::info!(shards = urls.len(), source = ?cfg.membership, "shard membership");
    let clients = match cfg.max_clients {
        0 => tokio::sync::Semaphore::MAX_PERMITS,
        n => n.min(tokio::sync::Semaphore::MAX_PERMITS),
    };
    let verifier = Arc::new(auth::Verifier::new(cfg.auth.clone())?);
    let lb = Arc::new(Lb {
        verifier: verifier.clone(),
        subjects: Arc::default(),
        metrics: metrics::LbMetrics::new(shard_metrics, &urls),
        pacer: Pacer::new(cfg.pacing),
        relay_opts: relay::RelayOptions::new(
            cfg.close_timeout,
            cfg.stall_timeout,
            cfg.drain_window,
            shutdown.drained.clone(),
        ),
        relays: TaskTracker::new(),
        pool,
        poll_now: tokio::sync::Notify::new(),
        cfg,
        shutdown: shutdown.clone(),
        clients: Arc::new(tokio::sync::Semaphore::new(clients)),
    });
    let tasks = TaskTracker::new();
    tasks.spawn(health::poll_loop(lb.clone()));
    lb.metrics
        .update(&lb.pool.snapshot(tokio::time::Instant::now()));
    if lb.cfg.membership != MembershipSource::Static {
        lb.metrics.membership_read_ok();
    }
    tasks.spawn(membership::watch(lb.clone()));
    if verifier.enabled() {
        tasks.spawn(reload_keys(verifier, shutdown.hard.clone()));
    }
    let (router, per_ip) = client_router(lb.clone())?;
    let front = Arc::new(front::Front {
        lb: lb.clone(),
        router,
        limits: lb.cfg.http,
        per_ip,
        stop: shutdown.hard.clone(),
    });
    let (conns, stop, client_opts) = (tasks.clone(), shutdown.hard.clone(), lb.cfg.socket);
    tracing::info!(listener = "client", addr = ?listeners.client.local_addr().ok(), "ws-lb listening");
    tasks.spawn(async move {
        // Plain HTTP keeps being served while draining so /health can say so.
        net_core::accept_loop(
            listeners.client,
            "client",
            client_opts,
            stop,
            |stream, peer| {
                conns.spawn(front.clone().serve(stream, peer));
            },
        )
        .await;
    });
    let admin = net_core::telemetry::metrics_router(prometheus);
    let (limits, stop, conns) = (lb.cfg.http, shutdown.hard.clone(), tasks.clone());
    tracing::info!(listener = "admin", addr = ?listeners.admin.local_addr().ok(), "ws-lb listening");
    tasks.spawn(async move {
        net_core::accept_loop(
            listeners.admin,
            "admin",
            SocketOptions::default(),
            stop.clone(),
            |stream, peer| {
                conns.spawn(net_core::serve_connection(
                    stream,
                    peer,
                    admin.clone(),
                    limits,
                    stop.clone(),
                ));
            },
        )
        .await;
    });

    tokio::select! {
        _ = shutdown.drain.cancelled() => {}
        _ = shutdown.hard.cancelled() => {}
    }
    tracing::info!(relays = lb.relays.len(), "draining");
    lb.relays.close();
    tokio::select! {
        _ = lb.relays.wait() => tracing::info!("all client connections closed"),
        _ = shutdown.hard.cancelled() => {}
    }
    let left = lb.relays.len();
    shutdown.hard.cancel();
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), tasks.wait()).await;
    Ok(left)
}
