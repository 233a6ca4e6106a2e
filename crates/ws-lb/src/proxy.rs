//! `GET /ws`: one client's way through the LB — validation, origin check, admission
//! pacing, shard selection with retries, then either a relay or a close frame that says why.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, Request, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::FutureExt;
use lb_core::error::{FinalClose, OVERLOADED};
use lb_core::retry::Attempts;
use net_core::upgrade::{check_request, into_axum, into_raw, refuse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::either::Either;
use ws_protocol::close;
use ws_protocol::frame::{self, FrameTracker};

use crate::backend::Upstream;
use crate::metrics::{ClientOutcome, Rejection};
use crate::relay::{relay, RelayEnd, RelayHost, RelayOptions};
use crate::{edge_auth, ClientIp, Lb};

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

/// The fields of a WebSocket request the LB decides on, however it was read.
pub(crate) struct WsRequest<'a> {
    /// The TCP peer, or `X-Forwarded-For`'s entry when trusted (`ClientIp`).
    pub(crate) client_ip: IpAddr,
    pub(crate) origin: Option<&'a str>,
    pub(crate) query: Option<&'a str>,
}

/// A request answered with an HTTP status instead of an upgrade.
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) reason: &'static str,
}

/// A client let in: held until its relay (or its close) ends.
pub(crate) struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Counts the client among the relays a drain waits for, from admission on.
    _relay: tokio_util::task::task_tracker::TaskTrackerToken,
    client_ip: IpAddr,
    query_token: Option<String>,
}

/// What happens once the client has its 101.
pub(crate) enum Plan {
    /// Authentication on and no `?token=`: the first message decides.
    FirstMessage,
    /// Refused after all (token, subject limit): this close frame.
    Close(FinalClose),
    /// A shard took the client (or none did: the close that says why).
    Relay(
        Option<edge_auth::SubjectGuard>,
        Result<Connected, FinalClose>,
    ),
}

/// Origin, drain and `max_clients`; the client IP and the query token. Counts refusals.
pub(crate) fn admit(lb: &Arc<Lb>, req: &WsRequest<'_>) -> Result<Admitted, Refusal> {
    let refused = |rejection, status, reason| {
        lb.metrics.rejected(rejection);
        lb.metrics.client(ClientOutcome::Rejected);
        Err(Refusal { status, reason })
    };
    if !origin_allowed(&lb.cfg.allowed_origins, req.origin) {
        return refused(
            Rejection::Origin,
            StatusCode::FORBIDDEN,
            "origin not allowed",
        );
    }
    if lb.draining() {
        return refused(
            Rejection::Draining,
            StatusCode::SERVICE_UNAVAILABLE,
            "load balancer draining",
        );
    }
    let Some(permit) = lb.client_permit() else {
        return refused(
            Rejection::ClientLimit,
            StatusCode::SERVICE_UNAVAILABLE,
            "client limit reached",
        );
    };
    // Read before the upgrade takes the request apart. Never logged: query strings with
    // tokens must not reach any log (the request line is not logged anywhere in ws-lb).
    let query_token = lb
        .verifier
        .enabled()
        .then(|| edge_auth::query_token(req.query).map(str::to_owned))
        .flatten();
    Ok(Admitted {
        _permit: permit,
        _relay: lb.relays.token(),
        client_ip: req.client_ip,
        query_token,
    })
}

/// Everything decided before the client's 101: the token, the subject limit, pacing and
/// a shard (the client's 101 follows the shard's).
pub(crate) async fn before_101(lb: &Lb, adm: &Admitted) -> Plan {
    if lb.verifier.enabled() && adm.query_token.is_none() {
        return Plan::FirstMessage;
    }
    // Auth off, or a token in the query: decided before anything else happens.
    let admitted = match edge_auth::verify(&lb.verifier, &lb.metrics, adm.query_token.as_deref()) {
        Err(failure) => Err(refuse_auth(lb, failure)),
        Ok(identity) => subject_place(lb, identity.as_ref()),
    };
    match admitted {
        Err(close) => Plan::Close(close),
        Ok(guard) => Plan::Relay(
            guard,
            admit_and_connect(lb, adm.client_ip, adm.query_token.as_deref()).await,
        ),
    }
}

/// After the client's 101: the relay, the first message, or the close frame. Not an
/// `async fn`: a relayed client's future (the one its task holds for the client's whole
/// life) is built by [`relayed`] from what the relay needs alone; every other path —
/// short-lived, or authentication by message — is boxed.
pub(crate) fn after_101(
    lb: Arc<Lb>,
    adm: Admitted,
    plan: Plan,
    client: TcpStream,
    client_prefix: Bytes,
) -> impl Future<Output = ()> + Send + 'static {
    match plan {
        Plan::Relay(guard, Ok(connected)) => {
            Either::Left(relayed(lb, (adm, guard), client, client_prefix, connected))
        }
        plan => Either::Right(Box::pin(not_relayed(lb, adm, plan, client, client_prefix))),
    }
}

/// The paths of [`after_101`] that are not a relay from the start.
async fn not_relayed(
    lb: Arc<Lb>,
    adm: Admitted,
    plan: Plan,
    client: TcpStream,
    client_prefix: Bytes,
) {
    match plan {
        Plan::FirstMessage => {
            first_message_then_relay(&lb, client, client_prefix, adm.client_ip).await;
        }
        Plan::Close(close) => close_client(client, close, lb.cfg.close_timeout).await,
        Plan::Relay(_guard, outcome) => finish(&lb, client, client_prefix, outcome).await,
    }
    drop(adm);
}

/// A relayed client, start to end: counts it, relays, counts how it ended. `held` (the
/// admission's permits, a subject's place) is released when the relay ends. Built with
/// `map`, not as an `async fn` or block: those keep their arguments, and a future they
/// await by value, in their state beside the copy being awaited (`after_101`'s future was
/// 1,720 bytes that way, 912 this way at f8b127f). `lb` goes into the relay as its host
/// and comes back with the end: no second handle per connection.
fn relayed(
    lb: Arc<Lb>,
    held: impl Send + 'static,
    client: TcpStream,
    client_prefix: Bytes,
    (shard, shard_prefix, idx, count): Connected,
) -> impl Future<Output = ()> + Send + 'static {
    lb.metrics.client(ClientOutcome::Relayed);
    lb.metrics.active.increment(1.0);
    relay(client, client_prefix, shard, shard_prefix, lb).map(move |(end, lb)| {
        lb.metrics.active.decrement(1.0);
        lb.metrics.relay_end(end);
        if let RelayEnd::ShardLost { notified } = end {
            tracing::debug!(shard_id = idx, notified, "shard lost mid-session");
        }
        drop((held, count));
    })
}

impl RelayHost for Arc<Lb> {
    fn options(&self) -> &RelayOptions {
        &self.relay_opts
    }
    fn lb_close(&self, code: u16) {
        self.metrics.lb_close(code);
    }
}

/// `GET /ws` served by hyper: requests the fast path (`crate::front`) declined — bad
/// upgrades get their precise statuses here — and an upgrade that follows another request
/// on a kept-alive connection.
pub(crate) async fn handle(
    State(lb): State<Arc<Lb>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request<Body>,
) -> Response {
    if let Err(r) = check_request(&req) {
        lb.metrics.client(ClientOutcome::Rejected);
        return *r;
    }
    let adm = {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let client_ip = ClientIp::of_parts(
            lb.cfg.trust_forwarded_for,
            peer.ip(),
            header("x-forwarded-for"),
        );
        let fields = WsRequest {
            client_ip,
            origin: header(header::ORIGIN.as_str()),
            query: req.uri().query(),
        };
        match admit(&lb, &fields) {
            Ok(adm) => adm,
            Err(r) => return refuse(r.status, r.reason),
        }
    };
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "bad upgrade request");
            lb.metrics.client(ClientOutcome::Rejected);
            return refuse(StatusCode::BAD_REQUEST, "bad upgrade request");
        }
    };
    let plan = before_101(&lb, &adm).await;
    let task_lb = lb.clone();
    lb.relays.spawn(async move {
        let Ok((client, client_prefix)) = into_raw(upgrade).await else {
            tracing::debug!("client left before its upgrade completed");
            return;
        };
        after_101(task_lb, adm, plan, client, client_prefix).await;
    });
    into_axum(response)
}

/// Without `?token=` and with authentication on: the first message decides (`auth` with a
/// token, or — when public channels exist — anything else for an anonymous connection).
async fn first_message_then_relay(
    lb: &Arc<Lb>,
    mut client: TcpStream,
    prefix: Bytes,
    client_ip: IpAddr,
) {
    let max = lb.verifier.config().max_token_len;
    let first = edge_auth::read_first_message(&mut client, prefix, max, lb.cfg.auth_timeout).await;
    let (token, client_prefix) = match first {
        edge_auth::FirstMessage::Gone => return,
        edge_auth::FirstMessage::TooLong => {
            let close = refuse_auth(lb, auth::AuthFailure::TooLong);
            return close_client(client, close, lb.cfg.close_timeout).await;
        }
        edge_auth::FirstMessage::Auth { token, rest } => (Some(token), rest),
        edge_auth::FirstMessage::Other { read } if lb.verifier.allows_anonymous() => (None, read),
        edge_auth::FirstMessage::Other { .. } => {
            let close = refuse_auth(lb, auth::AuthFailure::NoAuthMessage);
            return close_client(client, close, lb.cfg.close_timeout).await;
        }
    };
    let admitted = match token {
        Some(ref t) => match edge_auth::verify(&lb.verifier, &lb.metrics, Some(t)) {
            Err(failure) => Err(refuse_auth(lb, failure)),
            Ok(identity) => subject_place(lb, identity.as_ref()),
        },
        None => Ok(None),
    };
    let _guard = match admitted {
        Ok(guard) => guard,
        Err(close) => return close_client(client, close, lb.cfg.close_timeout).await,
    };
    let outcome = admit_and_connect(lb, client_ip, token.as_deref()).await;
    finish(lb, client, client_prefix, outcome).await;
}

/// Counts a refused token; the close the client gets (4001, with the reason).
fn refuse_auth(lb: &Lb, failure: auth::AuthFailure) -> FinalClose {
    lb.metrics.auth_failure(failure);
    lb.metrics.client(ClientOutcome::Closed4001);
    lb.metrics.lb_close(close::UNAUTHORIZED);
    FinalClose {
        code: close::UNAUTHORIZED,
        reason: failure.reason(),
    }
}

/// A place under `max_connections_per_sub` for an authenticated client, or the 4003 close.
fn subject_place(
    lb: &Lb,
    identity: Option<&auth::Identity>,
) -> Result<Option<edge_auth::SubjectGuard>, FinalClose> {
    let Some(id) = identity else { return Ok(None) };
    match lb.subjects.acquire(&id.sub, lb.cfg.max_connections_per_sub) {
        Some(guard) => Ok(guard),
        None => {
            lb.metrics.rejected(Rejection::SubjectLimit);
            lb.metrics.client(ClientOutcome::Closed4003);
            lb.metrics.lb_close(close::TOO_MANY_CONNECTIONS);
            Err(FinalClose {
                code: close::TOO_MANY_CONNECTIONS,
                reason: "too many connections for this subject",
            })
        }
    }
}

/// Admission pacing, then a shard.
async fn admit_and_connect(
    lb: &Lb,
    client_ip: IpAddr,
    token: Option<&str>,
) -> Result<Connected, FinalClose> {
    match lb.pacer.reserve(Instant::now()) {
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
            connect(lb, client_ip, token).await
        }
    }
}

/// Relays the client to its shard, or closes it with the reason no shard took it.
async fn finish(
    lb: &Arc<Lb>,
    client: TcpStream,
    client_prefix: Bytes,
    outcome: Result<Connected, FinalClose>,
) {
    match outcome {
        Ok(connected) => relayed(lb.clone(), (), client, client_prefix, connected).await,
        Err(close) => {
            lb.metrics.client(if close.code == OVERLOADED.code {
                ClientOutcome::Closed1013
            } else {
                ClientOutcome::Closed1012
            });
            lb.metrics.lb_close(close.code);
            close_client(client, close, lb.cfg.close_timeout).await;
        }
    }
}

/// A shard that completed its handshake: the socket, what the shard sent after its 101,
/// the shard's index and its relay count (held until the relay ends, so selection sees
/// this client on that shard until the next health poll counts it).
pub(crate) type Connected = (Upstream, Bytes, usize, lb_core::RelayCount);

/// Tries shards until one completes its handshake or the policy gives up.
async fn connect(lb: &Lb, client_ip: IpAddr, token: Option<&str>) -> Result<Connected, FinalClose> {
    // Only a verified token is ever forwarded; this keeps the header clean regardless.
    let token = token.filter(|t| edge_auth::header_safe(t));
    let mut attempts = Attempts::start(lb.cfg.retry, Instant::now());
    loop {
        let now = Instant::now();
        let lease = lb.pool.select(attempts.tried(), now, &mut rand::rng());
        let Some(lease) = lease else {
            // Breakers opened by timeouts mean this LB is overloaded: 1013 (back off), not
            // the 1012 (reconnect now) of shards that are down or draining.
            if lb.pool.refused_by_timeouts(attempts.tried()) {
                return Err(OVERLOADED);
            }
            return Err(attempts.final_close(now));
        };
        let idx = lease.index();
        if lease.is_panic() {
            lb.metrics.panic_routed.increment(1);
        }
        let Some(budget) = attempts.begin(idx, now) else {
            return Err(attempts.final_close(now));
        };
        let Some(h) = lb.metrics.shard(idx) else {
            return Err(attempts.final_close(now));
        };
        h.attempts.increment(1);
        if let Some(rank) = lb.metrics.attempt_rank(attempts.count().saturating_sub(1)) {
            rank.increment(1);
        }
        let started = Instant::now();
        match lease
            .target()
            .dial(budget, client_ip, token, lb.cfg.tier_mux)
            .await
        {
            Ok((stream, prefix)) => {
                h.success.increment(1);
                h.duration.record(started.elapsed().as_secs_f64());
                let count = lease.succeed();
                return Ok((stream, prefix, idx, count));
            }
            Err(e) => {
                h.attempt_error(e.kind());
                lease.fail(&e);
                if e.is_local() {
                    // Out of descriptors or ports here: every other shard would fail the
                    // same way, and none of them is to blame. The client hears 1013 at once.
                    tracing::warn!(shard_id = idx, error = %e, "cannot dial a shard: local resources exhausted");
                    return Err(OVERLOADED);
                }
                h.failures.increment(1);
                if e.counts_against_shard() {
                    h.breaker_failures.increment(1);
                }
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
    // On the heap, and only now: a buffer on the stack here would sit in the future of every
    // relayed client (`finish` closes through this function), 1 KiB each.
    let mut buf = vec![0u8; 1024];
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

    /// `finish` (the future of every relayed client) closes through `close_client`; a
    /// buffer kept on its stack once made every held client 1 KiB larger.
    #[tokio::test]
    async fn the_close_future_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let f = close_client(a, OVERLOADED, Duration::from_secs(1));
        let size = std::mem::size_of_val(&f);
        eprintln!("close_client future: {size} bytes");
        assert!(size <= 512, "close_client future is {size} bytes");
    }

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
