//! The client listener: one task per connection. A well-formed `GET /ws` upgrade is served
//! on the raw socket (`net_core::head`): per-IP limit, admission, a shard, the 101 written
//! here, then the relay in the same task (see `Front::serve`). Anything else — `/health`,
//! bad upgrades, other paths — is served by hyper and the router with every byte already read.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::Router;
use futures_util::FutureExt;
use governor::clock::{Clock, DefaultClock};
use net_core::head::{self, Head, Rewind, UpgradeHead};
use net_core::HttpLimits;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::metrics::{ClientOutcome, Rejection};
use crate::proxy::{self, WsRequest};
use crate::{ClientIp, Lb};

/// The per-IP limiter shared with the router's governor layer.
pub(crate) type PerIpLimiter = Arc<governor::DefaultKeyedRateLimiter<IpAddr>>;

/// How the client listener serves each connection (shared by all of them).
pub(crate) struct Front {
    pub(crate) lb: Arc<Lb>,
    pub(crate) router: Router,
    pub(crate) limits: HttpLimits,
    pub(crate) per_ip: Option<PerIpLimiter>,
    pub(crate) stop: CancellationToken,
}

impl Front {
    /// One accepted connection, start to end, in one task. Everything before the relay —
    /// the request head, hyper for other requests, admission, the shard's handshake, the
    /// 101 — runs in a boxed future that is freed once the 101 is out; the relay then runs
    /// in this same task, whose future is the relay's alone (912 bytes at f8b127f; the
    /// relay used to get a task of its own, of 1,544, spawned per client). `bench.py
    /// builds`: 2.56 -> 2.05 KiB per held connection; CPU per connection unchanged within
    /// the runs' spread.
    pub(crate) fn serve(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> impl Future<Output = ()> + Send + 'static {
        // Built with `then`, not as an `async fn`: that would keep its arguments, and the
        // relay's future it awaits, in its state beside the copy being awaited.
        Box::pin(async move { self.until_101(stream, peer).await }).then(|after| match after {
            Some(after_101) => Either::Left(after_101),
            None => Either::Right(std::future::ready(())),
        })
    }

    /// Up to the client's 101: the rest of the client's life (`proxy::after_101`, not yet
    /// polled), or None once the connection was served otherwise (hyper, a refusal) or is
    /// gone.
    async fn until_101(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        match head::read_head(&mut stream, &self.limits, "/ws", &self.stop).await {
            Head::Gone => None,
            Head::Other(read) => {
                let io = Rewind::new(read.freeze(), stream);
                let (router, stop) = (self.router.clone(), self.stop.clone());
                net_core::serve_connection(io, peer, router, self.limits, stop).await;
                None
            }
            Head::Upgrade(head) => self.upgrade(stream, peer.ip(), head).await,
        }
    }

    async fn upgrade(
        &self,
        mut stream: TcpStream,
        peer: IpAddr,
        head: UpgradeHead,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let lb = self.lb.clone();
        let client_ip = ClientIp::of_parts(lb.cfg.trust_forwarded_for, peer, head.forwarded_for());
        if let Some(limiter) = &self.per_ip {
            if let Err(not_until) = limiter.check_key(&client_ip) {
                lb.metrics.rejected(Rejection::PerIp);
                lb.metrics.client(ClientOutcome::Rejected);
                let wait = not_until
                    .wait_time_from(DefaultClock::default().now())
                    .as_secs();
                let body = format!("Too Many Requests! Wait for {wait}s");
                let extra = format!("x-ratelimit-after: {wait}\r\nretry-after: {wait}\r\n");
                respond(stream, StatusCode::TOO_MANY_REQUESTS, &extra, &body).await;
                return None;
            }
        }
        let fields = WsRequest {
            client_ip,
            origin: head.origin(),
            query: head.query(),
        };
        let adm = match proxy::admit(&lb, &fields) {
            Ok(adm) => adm,
            Err(r) => {
                respond(stream, r.status, "", r.reason).await;
                return None;
            }
        };
        let plan = proxy::before_101(&lb, &adm).await;
        let response = head.switching_protocols();
        let rest = head.into_rest();
        if stream.write_all(&response).await.is_err() {
            tracing::debug!("client left before its upgrade completed");
            return None;
        }
        Some(proxy::after_101(lb, adm, plan, stream, rest))
    }
}

/// An HTTP refusal (as `net_core::upgrade::refuse` builds it for hyper), then close.
async fn respond(mut stream: TcpStream, status: StatusCode, extra_headers: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {} {}\r\nconnection: close\r\ncontent-type: text/plain; charset=utf-8\r\n{extra_headers}content-length: {}\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
}
