//! The link's frames: a 9-byte header — kind (1 byte), stream id (4 bytes, big-endian),
//! payload length (4 bytes, big-endian) — and the payload.
//!
//! | kind | from | payload |
//! |---|---|---|
//! | `OPEN` (1) | LB | path length (2 bytes), path, bearer token (rest; may be empty) |
//! | `ACCEPT` (2) | shard | none: the stream is a WebSocket connection, as after a 101 |
//! | `REFUSE` (3) | shard | HTTP status (2 bytes), shard status (1: 0 none, 1 draining, 2 starting), reason (rest) |
//! | `DATA` (4) | both | the connection's bytes (WebSocket frames, not decoded by the link) |
//! | `CREDIT` (5) | both | bytes (4) the receiver has consumed: the sender may send that many more |
//! | `CLOSE` (6) | both | none: the sender is done with the stream (like closing its socket) |
//!
//! Each side may have at most [`WINDOW`] bytes of `DATA` per stream that the other has not
//! given back with `CREDIT`; a peer that sends more, an unknown kind, or a payload over
//! [`MAX_PAYLOAD`] breaks the link (every stream on it ends).

use bytes::BufMut;
use ws_protocol::ShardStatus;

/// Header bytes before each payload.
pub const HEADER_LEN: usize = 9;

/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// `DATA` bytes per stream and direction in flight before the receiver gives credit back.
pub const WINDOW: u32 = 64 * 1024;

/// A frame's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Open = 1,
    Accept = 2,
    Refuse = 3,
    Data = 4,
    Credit = 5,
    Close = 6,
}

impl Kind {
    fn of(b: u8) -> Option<Self> {
        Some(match b {
            1 => Kind::Open,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Data,
            5 => Kind::Credit,
            6 => Kind::Close,
            _ => return None,
        })
    }
}

/// A frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub stream: u32,
    pub len: usize,
}

/// Input that is not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame payload of {0} bytes is over the limit of {MAX_PAYLOAD}")]
    TooLong(u32),
}

/// The header at the start of `buf`, or `None` if fewer than [`HEADER_LEN`] bytes are there.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let kind = Kind::of(h[0]).ok_or(FrameError::Kind(h[0]))?;
    let stream = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    let len = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
    if len as usize > MAX_PAYLOAD {
        return Err(FrameError::TooLong(len));
    }
    Ok(Some(Header {
        kind,
        stream,
        len: len as usize,
    }))
}

/// Appends a header (the caller appends `len` payload bytes).
pub fn put_header(out: &mut impl BufMut, kind: Kind, stream: u32, len: usize) {
    debug_assert!(len <= MAX_PAYLOAD);
    out.put_u8(kind as u8);
    out.put_u32(stream);
    out.put_u32(len as u32);
}

/// What the LB asks a shard for when it opens a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The path the stream is for, as in the backend URL (`/ws`, `/echo`).
    pub path: String,
    /// The client's verified token, forwarded as `Authorization: Bearer` would be.
    pub token: Option<String>,
}

impl Open {
    /// The payload; `None` if the path is too long for its length prefix or the frame.
    pub fn encode(&self) -> Option<Vec<u8>> {
        let path = u16::try_from(self.path.len()).ok()?;
        let token = self.token.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(2 + self.path.len() + token.len());
        out.extend_from_slice(&path.to_be_bytes());
        out.extend_from_slice(self.path.as_bytes());
        out.extend_from_slice(token.as_bytes());
        (out.len() <= MAX_PAYLOAD).then_some(out)
    }

    /// Parses a payload; `None` if it is malformed.
    pub fn decode(p: &[u8]) -> Option<Self> {
        let path_len = usize::from(u16::from_be_bytes([*p.first()?, *p.get(1)?]));
        let path = std::str::from_utf8(p.get(2..2 + path_len)?).ok()?;
        let token = std::str::from_utf8(p.get(2 + path_len..)?).ok()?;
        Some(Self {
            path: path.to_owned(),
            token: (!token.is_empty()).then(|| token.to_owned()),
        })
    }
}

/// A shard's answer to `OPEN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Accepted,
    Refused(Refusal),
}

/// Why a shard refused a stream: what its HTTP upgrade would have answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// `X-Odin-Shard-Status` of that answer (`draining`/`starting`), if any.
    pub shard_status: Option<ShardStatus>,
    pub reason: String,
}

impl Refusal {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3 + self.reason.len());
        out.extend_from_slice(&self.status.to_be_bytes());
        out.push(match self.shard_status {
            None | Some(ShardStatus::Ok) => 0,
            Some(ShardStatus::Draining) => 1,
            Some(ShardStatus::Starting) => 2,
        });
        let reason = self.reason.as_bytes();
        out.extend_from_slice(&reason[..reason.len().min(1024)]);
        out
    }

    pub fn decode(p: &[u8]) -> Option<Self> {
        let status = u16::from_be_bytes([*p.first()?, *p.get(1)?]);
        let shard_status = match *p.get(2)? {
            0 => None,
            1 => Some(ShardStatus::Draining),
            2 => Some(ShardStatus::Starting),
            _ => return None,
        };
        let reason = String::from_utf8_lossy(p.get(3..)?).into_owned();
        Some(Self {
            status,
            shard_status,
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn headers_round_trip_and_bad_ones_are_refused() {
        let mut b = BytesMut::new();
        put_header(&mut b, Kind::Data, 0x0102_0304, 300);
        assert_eq!(b.len(), HEADER_LEN);
        assert_eq!(parse_header(&b[..8]), Ok(None));
        assert_eq!(
            parse_header(&b),
            Ok(Some(Header {
                kind: Kind::Data,
                stream: 0x0102_0304,
                len: 300
            }))
        );
        let mut bad = b.to_vec();
        bad[0] = 9;
        assert_eq!(parse_header(&bad), Err(FrameError::Kind(9)));
        let mut long = BytesMut::new();
        long.put_u8(4);
        long.put_u32(1);
        long.put_u32(MAX_PAYLOAD as u32 + 1);
        assert_eq!(
            parse_header(&long),
            Err(FrameError::TooLong(MAX_PAYLOAD as u32 + 1))
        );
    }

    #[test]
    fn open_and_refusal_round_trip_and_garbage_is_none() {
        let o = Open {
            path: "/ws".into(),
            token: Some("abc".into()),
        };
        assert_eq!(Open::decode(&o.encode().unwrap()), Some(o.clone()));
        let anon = Open { token: None, ..o };
        assert_eq!(Open::decode(&anon.encode().unwrap()), Some(anon));
        assert_eq!(Open::decode(&[0, 9, b'/']), None);
        assert_eq!(Open::decode(&[]), None);
        let r = Refusal {
            status: 503,
            shard_status: Some(ShardStatus::Draining),
            reason: "shard draining".into(),
        };
        assert_eq!(Refusal::decode(&r.encode()), Some(r));
        assert_eq!(Refusal::decode(&[1, 247, 7]), None);
        assert_eq!(Refusal::decode(&[1]), None);
    }
}
