//! Authentication at the edge: the token of a client, from its upgrade request (`?token=`)
//! or its first WebSocket message (`{"type":"auth","token":...}`), verified before any shard
//! is dialled, and the per-subject connection limit.
//!
//! Nothing here trusts the shard tier to refuse a bad token: a client whose token fails never
//! causes a shard connection. The raw token of an accepted client goes to its shard in an
//! `Authorization: Bearer` header, and the shard verifies it again with the same keys (it
//! trusts nothing it could not check itself).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use auth::{AuthFailure, Identity, Verifier};
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use ws_protocol::frame::{apply_mask, parse_header, Header, MAX_HEADER_LEN, OP_TEXT};
use ws_protocol::ClientMessage;

/// The `token` parameter of a request's query string, if any. Tokens are base64url and dots,
/// so they need no percent-decoding; a token that does is malformed anyway.
pub(crate) fn query_token(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .filter(|t| !t.is_empty())
}

/// Whether `token` can go into an HTTP header as it is. A verified JWT always can; this
/// guards the header against anything else.
pub(crate) fn header_safe(token: &str) -> bool {
    token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

/// What the client's first message said.
#[derive(Debug)]
pub(crate) enum FirstMessage {
    /// `{"type":"auth"}` with this token; `rest` holds the bytes after it, still masked.
    Auth { token: String, rest: Bytes },
    /// Something else (or nothing within the timeout): every byte read so far, untouched.
    Other { read: Bytes },
    /// An auth message too long to hold a token we would accept: refused unparsed.
    TooLong,
    /// The client went away.
    Gone,
}

/// Bytes of an oversized first message looked at for `"auth"`.
const PEEK: usize = 64;

/// Looks at `buf` (bytes from the client, starting at a frame boundary): `None` while the
/// first frame is incomplete, else what it is. Only a single unfragmented, masked text frame
/// of at most `max_len` bytes can be an auth message.
fn classify(buf: &[u8], max_len: usize) -> Option<FirstMessage> {
    let other = || {
        Some(FirstMessage::Other {
            read: Bytes::copy_from_slice(buf),
        })
    };
    let Header {
        fin,
        opcode,
        mask,
        header_len,
        payload_len: len,
    } = parse_header(buf)?;
    let Some(mask) = mask else { return other() };
    if !fin || opcode != OP_TEXT {
        return other();
    }
    if len > max_len as u64 {
        // Too long to read whole; look at its start to tell an oversized `auth` (a
        // 100 KB token) from a large ordinary first message.
        let want = header_len + (len.min(PEEK as u64) as usize);
        let mut start = buf.get(header_len..want)?.to_vec();
        apply_mask(&mut start, mask, 0);
        let is_auth = start.windows(6).any(|w| w == b"\"auth\"");
        return if is_auth {
            Some(FirstMessage::TooLong)
        } else {
            other()
        };
    }
    let end = header_len + len as usize;
    let payload = buf.get(header_len..end)?;
    let mut text = payload.to_vec();
    apply_mask(&mut text, mask, 0);
    match ClientMessage::decode(&text) {
        Ok(ClientMessage::Auth { token }) => Some(FirstMessage::Auth {
            token,
            rest: Bytes::copy_from_slice(buf.get(end..).unwrap_or_default()),
        }),
        _ => other(),
    }
}

/// Reads the client's first message (within `wait`). `prefix` holds bytes that arrived with
/// the upgrade request.
pub(crate) async fn read_first_message(
    client: &mut TcpStream,
    prefix: Bytes,
    max_token_len: usize,
    wait: Duration,
) -> FirstMessage {
    // The auth message is a small JSON object around the token.
    let max_len = max_token_len + 256;
    let mut buf = BytesMut::from(&prefix[..]);
    let read = timeout(wait, async {
        loop {
            if let Some(m) = classify(&buf, max_len) {
                return m;
            }
            if buf.len() > max_len + MAX_HEADER_LEN {
                // Cannot be a frame we accept, yet incomplete: give it to the caller as is.
                return FirstMessage::Other {
                    read: buf.split().freeze(),
                };
            }
            match client.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return FirstMessage::Gone,
                Ok(_) => {}
            }
        }
    })
    .await;
    read.unwrap_or_else(|_| FirstMessage::Other { read: buf.freeze() })
}

/// Connections per token subject in this process (`max_connections_per_sub`).
#[derive(Debug, Default)]
pub(crate) struct SubjectCounts {
    /// Keyed by `Arc<str>` so that every guard of a subject shares the key's allocation.
    counts: Mutex<HashMap<Arc<str>, usize>>,
}

/// One connection of a subject; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct SubjectGuard {
    counts: Arc<SubjectCounts>,
    sub: Arc<str>,
}

impl SubjectCounts {
    /// A place for one more connection of `sub`, or `None` at `max` (0 = no limit: no
    /// bookkeeping at all).
    pub(crate) fn acquire(self: &Arc<Self>, sub: &str, max: usize) -> Option<Option<SubjectGuard>> {
        if max == 0 {
            return Some(None);
        }
        let mut counts = self.counts.lock();
        // A subject already present costs no allocation: its key is shared.
        let key: Arc<str> = match counts.get_key_value(sub) {
            Some((_, &n)) if n >= max => return None,
            Some((k, _)) => k.clone(),
            None => sub.into(),
        };
        *counts.entry(key.clone()).or_insert(0) += 1;
        Some(Some(SubjectGuard {
            counts: self.clone(),
            sub: key,
        }))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.counts.lock().len()
    }
}

impl Drop for SubjectGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.counts.lock();
        if let Some(n) = counts.get_mut(&*self.sub) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&*self.sub);
            }
        }
    }
}

/// The outcome of checking a token at the edge (the verified-token cache lookup counted).
pub(crate) fn verify(
    verifier: &Verifier,
    metrics: &crate::metrics::LbMetrics,
    token: Option<&str>,
) -> Result<Option<Identity>, AuthFailure> {
    match token {
        Some(t) => {
            let (r, lookup) = verifier.verify_traced(t);
            metrics.auth_lookup(lookup);
            r.map(Some)
        }
        None if verifier.allows_anonymous() => Ok(None),
        None => Err(AuthFailure::Missing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ws_protocol::frame::encode_masked_frame;

    #[test]
    fn query_tokens() {
        assert_eq!(query_token(Some("token=a.b.c")), Some("a.b.c"));
        assert_eq!(query_token(Some("x=1&token=a.b.c&y=2")), Some("a.b.c"));
        assert_eq!(query_token(Some("token=")), None);
        assert_eq!(query_token(Some("xtoken=a")), None);
        assert_eq!(query_token(None), None);
        assert!(header_safe("eyJ.eyJ-_.sig="));
        assert!(!header_safe("a\r\nX-Evil: 1"));
        assert!(!header_safe("a b"));
    }

    #[test]
    fn first_message_classification() {
        let mask = [1, 2, 3, 4];
        let auth = encode_masked_frame(OP_TEXT, br#"{"type":"auth","token":"a.b.c"}"#, mask);
        let sub = encode_masked_frame(OP_TEXT, br#"{"type":"subscribe","channels":["x"]}"#, mask);
        let mut both = auth.to_vec();
        both.extend_from_slice(&sub);
        match classify(&both, 1024) {
            Some(FirstMessage::Auth { token, rest }) => {
                assert_eq!(token, "a.b.c");
                assert_eq!(&rest[..], &sub[..], "the rest stays masked, untouched");
            }
            other => panic!("{other:?}"),
        }
        // Incomplete: wait for more.
        for cut in 0..auth.len() {
            assert!(classify(&auth[..cut], 1024).is_none(), "{cut}");
        }
        // Not an auth message: every byte comes back unchanged.
        match classify(&sub, 1024) {
            Some(FirstMessage::Other { read }) => assert_eq!(&read[..], &sub[..]),
            other => panic!("{other:?}"),
        }
        // Too long, unmasked, fragmented or binary frames are never auth messages.
        let big = encode_masked_frame(OP_TEXT, &[b' '; 2000], mask);
        assert!(
            classify(&big[..10], 1024).is_none(),
            "waits for the start of the payload"
        );
        assert!(matches!(
            classify(&big[..100], 1024),
            Some(FirstMessage::Other { .. })
        ));
        let token = "x".repeat(2000);
        let huge = format!(r#"{{"type":"auth","token":"{token}"}}"#);
        let huge = encode_masked_frame(OP_TEXT, huge.as_bytes(), mask);
        assert!(matches!(
            classify(&huge[..100], 1024),
            Some(FirstMessage::TooLong)
        ));
        let unmasked = ws_protocol::frame::encode_frame(OP_TEXT, br#"{"type":"auth","token":"a"}"#);
        assert!(matches!(
            classify(&unmasked, 1024),
            Some(FirstMessage::Other { .. })
        ));
        let frag = ws_protocol::frame::encode_masked_frame_fin(false, OP_TEXT, b"{", mask);
        assert!(matches!(
            classify(&frag, 1024),
            Some(FirstMessage::Other { .. })
        ));
    }

    #[test]
    fn subject_limit_frees_its_places() {
        let counts = Arc::new(SubjectCounts::default());
        let a = counts.acquire("u1", 2).unwrap();
        let b = counts.acquire("u1", 2).unwrap();
        let (ga, gb) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        assert!(Arc::ptr_eq(&ga.sub, &gb.sub), "one key per subject");
        assert!(counts.acquire("u1", 2).is_none());
        let other = counts.acquire("u2", 2).unwrap();
        drop(a);
        let c = counts.acquire("u1", 2).unwrap();
        assert!(counts.acquire("u1", 2).is_none());
        drop((b, c, other));
        assert_eq!(counts.len(), 0, "no entry left behind");
        assert!(matches!(counts.acquire("u1", 0), Some(None)));
        assert_eq!(counts.len(), 0);
    }
}
