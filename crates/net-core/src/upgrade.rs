//! Server side of the WebSocket upgrade, shared by shards and the LB: validate the request
//! with precise statuses, then, after the 101, recover the raw `TcpStream` from hyper so the
//! connection can be driven without hyper's or fastwebsockets' per-connection buffers.

use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use fastwebsockets::upgrade::UpgradeFut;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::head::Rewind;

/// A refusal before upgrading: `Connection: close` so the socket does not linger.
pub fn refuse(status: StatusCode, reason: &'static str) -> Response {
    (status, [(header::CONNECTION, "close")], reason).into_response()
}

/// Checks what fastwebsockets does not: an `Upgrade: websocket` request (426 otherwise),
/// version 13 (426 with `Sec-WebSocket-Version: 13`), and a `Sec-WebSocket-Key` that is
/// base64 of 16 bytes (400), per RFC 6455 §4.2.1-4.2.2.
pub fn check_request<B>(req: &Request<B>) -> Result<(), Box<Response>> {
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        let mut r = refuse(StatusCode::UPGRADE_REQUIRED, "WebSocket upgrade required");
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return Err(Box::new(r));
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut r = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported Sec-WebSocket-Version",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(Box::new(r));
    }
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY);
    if !key.is_some_and(|k| key_is_valid(k.as_bytes())) {
        return Err(Box::new(refuse(
            StatusCode::BAD_REQUEST,
            "missing or invalid Sec-WebSocket-Key",
        )));
    }
    Ok(())
}

/// A `Sec-WebSocket-Key` is base64 of 16 bytes (RFC 6455 §4.1); both the hyper path and
/// `crate::head` check it with this, once per upgrade: decoded on the stack, no allocation
/// (24 characters decode to at most 18 bytes; anything longer does not fit and is refused).
pub fn key_is_valid(key: &[u8]) -> bool {
    let mut out = [0u8; 18];
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode_slice(key, &mut out)
            .is_ok_and(|n| n == 16)
}

/// Why the raw socket could not be recovered.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("client went away during the upgrade: {0}")]
    Abandoned(fastwebsockets::WebSocketError),
    #[error("upgraded connection is not a TCP stream")]
    NotTcp,
}

/// Waits for hyper to hand over the connection after the 101 and returns the socket plus
/// any bytes hyper had already read past the request (pipelined frames).
pub async fn into_raw(fut: UpgradeFut) -> Result<(TcpStream, Bytes), UpgradeError> {
    let ws = fut.await.map_err(UpgradeError::Abandoned)?;
    raw_parts(ws.into_inner().into_inner())
}

/// The socket of an upgraded connection (any protocol) and the bytes hyper had read past
/// the request.
pub fn raw_parts(upgraded: hyper::upgrade::Upgraded) -> Result<(TcpStream, Bytes), UpgradeError> {
    let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => return Ok((parts.io.into_inner(), parts.read_buf)),
        Err(other) => other
            .downcast::<TokioIo<Rewind<TcpStream>>>()
            .map_err(|_| UpgradeError::NotTcp)?,
    };
    // Served after the fast path declined the first request (see `crate::head`): what is
    // left of the replayed bytes comes before what hyper read past this request.
    let (stream, unread) = parts.io.into_inner().into_parts();
    if unread.is_empty() {
        return Ok((stream, parts.read_buf));
    }
    let mut rest = bytes::BytesMut::from(&parts.read_buf[..]);
    rest.extend_from_slice(&unread);
    Ok((stream, rest.freeze()))
}

/// Turns fastwebsockets' `Response<Empty>` into an axum response.
pub fn into_axum(response: hyper::Response<http_body_util::Empty<Bytes>>) -> Response {
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, axum::body::Body::empty())
}

#[cfg(test)]
mod tests {
    use super::key_is_valid;
    use base64::Engine;

    #[test]
    fn a_key_is_base64_of_exactly_16_bytes() {
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
        assert!(key_is_valid(b"dGhlIHNhbXBsZSBub25jZQ==")); // RFC 6455's example
        assert!(key_is_valid(b64(16).as_bytes()));
        for n in [0, 1, 15, 17, 18, 19, 32] {
            assert!(!key_is_valid(b64(n).as_bytes()), "{n} bytes");
        }
        assert!(!key_is_valid(b"AAAAAAAAAAAAAAAAAAAAAAAA")); // 24 characters, 18 bytes
        assert!(!key_is_valid(b"dGhlIHNhbXBsZSBub25jZQ=!"));
        assert!(!key_is_valid(b"dGhlIHNhbXBsZSBub25jZQ"));
        assert!(!key_is_valid(b""));
    }
}
