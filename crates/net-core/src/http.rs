//! Serving one accepted connection as HTTP/1.1 with WebSocket upgrades, under limits that
//! protect against hostile clients: a header read timeout (slowloris), a cap on header
//! count and header bytes (431), and graceful close of idle keep-alive connections on drain.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Limits on the HTTP request that precedes a WebSocket upgrade.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// The request head must arrive within this time.
    pub header_read_timeout: Duration,
    /// Most header fields accepted.
    pub max_headers: usize,
    /// Most bytes of request head buffered (at least 8192, hyper's minimum).
    pub max_header_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            max_headers: 64,
            max_header_bytes: 16 * 1024,
        }
    }
}

/// Serves `stream` (a `TcpStream`, or a [`crate::head::Rewind`] of one) with `router` until the client closes, the connection is upgraded (the
/// handler then owns the socket), or `drain` asks idle connections to close.
pub async fn serve_connection<I>(
    stream: I,
    peer: SocketAddr,
    router: Router,
    limits: HttpLimits,
    drain: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        let router = router.clone();
        async move { Ok::<_, Infallible>(router.oneshot(req).await.unwrap_or_else(|e| match e {})) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "http connection ended with error");
            }
        }
        _ = drain.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}
