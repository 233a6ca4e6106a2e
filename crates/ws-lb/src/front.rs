//! The client listener: one task per connection. A well-formed `GET /ws` upgrade is served
//! on the raw socket (`net_core::head`): per-IP limit, admission, a shard, the 101 written
//! here, then the relay in a task of its own. Anything else — `/health`, bad upgrades, other
//! paths — is served by hyper and the router with every byte already read.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::Router;
use governor::clock::{Clock, DefaultClock};
use net_core::head::{self, Head, Rewind, UpgradeHead};
use net_core::HttpLimits;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
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
    pub(crate) async fn serve(self: Arc<Self>, mut stream: TcpStream, peer: SocketAddr) {
        match head::read_head(&mut stream, &self.limits, "/ws", &self.stop).await {
            Head::Gone => {}
            Head::Other(read) => {
                let io = Rewind::new(read.freeze(), stream);
                let (router, stop) = (self.router.clone(), self.stop.clone());
                net_core::serve_connection(io, peer, router, self.limits, stop).await;
            }
            Head::Upgrade(head) => self.upgrade(stream, peer.ip(), head).await,
        }
    }

    async fn upgrade(&self, mut stream: TcpStream, peer: IpAddr, head: UpgradeHead) {
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
                return respond(stream, StatusCode::TOO_MANY_REQUESTS, &extra, &body).await;
            }
        }
        let fields = WsRequest {
            client_ip,
            origin: head.origin(),
            query: head.query(),
        };
        let adm = match proxy::admit(&lb, &fields) {
            Ok(adm) => adm,
            Err(r) => return respond(stream, r.status, "", r.reason).await,
        };
        let plan = proxy::before_101(&lb, &adm).await;
        let response = head.switching_protocols();
        let rest = head.into_rest();
        if stream.write_all(&response).await.is_err() {
            tracing::debug!("client left before its upgrade completed");
            return;
        }
        // The relay gets a task of its own, sized for the relay alone: this one's future is
        // as large as its largest await point (the shard dial, hyper's connection state),
        // which a held client must not carry for its whole life (measured with
        // `bench.py builds`: 4.45 -> 3.59 KiB per held connection when the relay moved out).
        lb.relays
            .clone()
            .spawn(proxy::after_101(lb, adm, plan, stream, rest));
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
