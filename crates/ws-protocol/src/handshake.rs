//! The client side of the RFC 6455 opening handshake, without I/O: building the upgrade
//! request and reading the server's response head. ws-lb uses it to dial shards; the load
//! tool to dial anything.

use base64::Engine;
use sha1::{Digest, Sha1};

use crate::health::{ShardStatus, SHARD_STATUS_HEADER};

/// The GUID every server appends to the client key (RFC 6455 §1.3).
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest response head accepted from a server.
pub const MAX_RESPONSE_HEAD: usize = 4096;

/// The `Sec-WebSocket-Accept` value a server must answer to `key`.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A `Sec-WebSocket-Key` from 16 random bytes.
pub fn key_from_bytes(bytes: [u8; 16]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The upgrade request for `path` on `host` (as sent in the `Host` header).
pub fn client_request(path: &str, host: &str, key: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in extra {
        r.push_str(name);
        r.push_str(": ");
        r.push_str(value);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// Why a server's answer is not a valid acceptance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("server answered HTTP {0}")]
    Status(u16),
    /// A 503 from a shard that says it is `draining` or `starting`
    /// ([`crate::health::SHARD_STATUS_HEADER`]): not ready, rather than full.
    #[error("server answered HTTP 503: shard {}", .0.as_str())]
    NotReady(ShardStatus),
    #[error("response head exceeds {MAX_RESPONSE_HEAD} bytes")]
    TooLarge,
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("101 without a valid Upgrade/Connection/Sec-WebSocket-Accept")]
    BadAccept,
}

/// Result of reading what arrived so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Need more bytes.
    Partial,
    /// A valid 101; the head is `head_len` bytes, anything after it is WebSocket data.
    Accepted { head_len: usize },
}

/// Parses the response head in `buf` for a request made with `key`.
pub fn parse_response(buf: &[u8], key: &str) -> Result<Response, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => {
            return Err(HandshakeError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(Response::Partial),
        Err(e) => return Err(HandshakeError::Malformed(e.to_string())),
    };
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let code = resp.code.unwrap_or(0);
    if code == 503 {
        let not_ready = header(SHARD_STATUS_HEADER)
            .and_then(ShardStatus::from_header)
            .filter(|s| *s != ShardStatus::Ok);
        if let Some(status) = not_ready {
            return Err(HandshakeError::NotReady(status));
        }
    }
    if code != 101 {
        return Err(HandshakeError::Status(code));
    }
    let has_token = |name: &str, token: &str| {
        header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    let accept_ok = header("sec-websocket-accept") == Some(accept_key(key).as_bytes());
    if !(accept_ok && has_token("upgrade", "websocket") && has_token("connection", "upgrade")) {
        return Err(HandshakeError::BadAccept);
    }
    Ok(Response::Accepted { head_len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn parses_acceptance_and_failures() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
        assert_eq!(
            parse_response(ok, key),
            Ok(Response::Accepted {
                head_len: ok.len() - 2
            })
        );
        assert_eq!(parse_response(&ok[..20], key), Ok(Response::Partial));
        let full = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_response(full, key), Err(HandshakeError::Status(503)));
        let starting = b"HTTP/1.1 503 Service Unavailable\r\nX-Odin-Shard-Status: starting\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            parse_response(starting, key),
            Err(HandshakeError::NotReady(ShardStatus::Starting))
        );
        let draining = b"HTTP/1.1 503 Service Unavailable\r\nx-odin-shard-status: Draining\r\n\r\n";
        assert_eq!(
            parse_response(draining, key),
            Err(HandshakeError::NotReady(ShardStatus::Draining))
        );
        // `ok`, an unknown value, or the header on another status: the status decides.
        for head in [
            b"HTTP/1.1 503 Service Unavailable\r\nX-Odin-Shard-Status: ok\r\n\r\n".as_slice(),
            b"HTTP/1.1 503 Service Unavailable\r\nX-Odin-Shard-Status: later\r\n\r\n",
            b"HTTP/1.1 500 Internal Server Error\r\nX-Odin-Shard-Status: starting\r\n\r\n",
        ] {
            let code = if head.starts_with(b"HTTP/1.1 500") {
                500
            } else {
                503
            };
            assert_eq!(parse_response(head, key), Err(HandshakeError::Status(code)));
        }
        let wrong = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert_eq!(parse_response(wrong, key), Err(HandshakeError::BadAccept));
        assert!(matches!(
            parse_response(b"garbage\r\n\r\n", key),
            Err(HandshakeError::Malformed(_))
        ));
        assert_eq!(
            parse_response(&[b'a'; MAX_RESPONSE_HEAD], key).unwrap_err(),
            HandshakeError::Malformed("invalid HTTP version".into())
        );
        let long = [
            b"HTTP/1.1 101 OK\r\nX: ".as_slice(),
            &[b'a'; MAX_RESPONSE_HEAD],
        ]
        .concat();
        assert_eq!(parse_response(&long, key), Err(HandshakeError::TooLarge));
    }

    #[test]
    fn request_has_the_required_headers() {
        let r = String::from_utf8(client_request(
            "/ws",
            "h:1",
            "k",
            &[("X-Forwarded-For", "1.2.3.4")],
        ))
        .unwrap();
        assert!(r.starts_with("GET /ws HTTP/1.1\r\nHost: h:1\r\n"));
        assert!(
            r.contains("Sec-WebSocket-Version: 13\r\n")
                && r.contains("X-Forwarded-For: 1.2.3.4\r\n")
        );
        assert!(r.ends_with("\r\n\r\n"));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_response(&bytes, "k");
        }
    }
}
