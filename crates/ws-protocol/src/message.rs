//! The JSON messages exchanged over a client WebSocket.
//!
//! Client → server: `subscribe` (optionally with `since` positions), `unsubscribe`, `ping`,
//! `auth` (the token as the first message) and `refresh` (a new token before `exp`).
//! Server → client: `subscribed`, `message`, `unsubscribed`, `pong`, `refreshed`, `error`.
//! Decoding is total: any byte string yields either a message or a [`DecodeError`] whose
//! [`ErrorCode`] says what was wrong, never a panic.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;

/// A point in a channel's stream: `seq` increases strictly within one `epoch`, and a `seq`
/// from another epoch is never compared with the current one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    pub epoch: String,
    pub seq: u64,
}

/// A message a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Subscribe to channels; `since` asks for the messages after a known position.
    Subscribe {
        channels: Vec<String>,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        since: BTreeMap<String, Position>,
    },
    /// Stop receiving the channels.
    Unsubscribe { channels: Vec<String> },
    /// Application-level ping; the server answers `pong` with the same id.
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// The connection's token, as the first message (for clients that cannot put it in the
    /// URL).
    Auth { token: String },
    /// A new token for the same subject, sent before the current one expires.
    Refresh { token: String },
}

/// Why a client frame could not be decoded, with the code to reply with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct DecodeError {
    pub code: ErrorCode,
    pub message: String,
}

impl DecodeError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct SubscribeBody {
    channels: Vec<String>,
    #[serde(default)]
    since: BTreeMap<String, Position>,
}

#[derive(Deserialize)]
struct UnsubscribeBody {
    channels: Vec<String>,
}

#[derive(Deserialize)]
struct TokenBody {
    token: String,
}

#[derive(Deserialize)]
struct PingBody {
    #[serde(default)]
    id: Option<u64>,
}

impl ClientMessage {
    /// Decodes one text frame. Unknown fields are ignored so clients can be newer than
    /// servers; an unknown `type` is an error.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let envelope: Envelope<'_> = serde_json::from_slice(bytes).map_err(|e| {
            if e.is_data() {
                DecodeError::new(ErrorCode::InvalidMessage, "expected a JSON object")
            } else {
                DecodeError::new(ErrorCode::InvalidJson, format!("invalid JSON: {e}"))
            }
        })?;
        let shape =
            |e: serde_json::Error| DecodeError::new(ErrorCode::InvalidMessage, e.to_string());
        match envelope.kind.as_deref() {
            Some("subscribe") => {
                let b: SubscribeBody = serde_json::from_slice(bytes).map_err(shape)?;
                Ok(Self::Subscribe {
                    channels: b.channels,
                    since: b.since,
                })
            }
            Some("unsubscribe") => {
                let b: UnsubscribeBody = serde_json::from_slice(bytes).map_err(shape)?;
                Ok(Self::Unsubscribe {
                    channels: b.channels,
                })
            }
            Some("ping") => {
                let b: PingBody = serde_json::from_slice(bytes).map_err(shape)?;
                Ok(Self::Ping { id: b.id })
            }
            Some("auth") => {
                let b: TokenBody = serde_json::from_slice(bytes).map_err(shape)?;
                Ok(Self::Auth { token: b.token })
            }
            Some("refresh") => {
                let b: TokenBody = serde_json::from_slice(bytes).map_err(shape)?;
                Ok(Self::Refresh { token: b.token })
            }
            Some(other) => Err(DecodeError::new(
                ErrorCode::UnknownType,
                format!("unknown message type {:?}", truncate(other, 64)),
            )),
            None => Err(DecodeError::new(
                ErrorCode::InvalidMessage,
                "missing \"type\" field",
            )),
        }
    }

    /// Encodes the message as the JSON text a client sends.
    pub fn to_json(&self) -> String {
        // Serializing a plain enum of strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

/// A message the server sends. Servers build `message` frames with [`encode_message`]
/// (the payload is already JSON and is copied, not re-parsed); clients decode everything with
/// [`ServerMessage::decode`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Subscription confirmed; `epoch`/`seq` are the channel's position at that moment.
    /// `recovered` says whether every message after the requested `since` was replayed.
    Subscribed {
        channel: String,
        epoch: String,
        seq: u64,
        recovered: bool,
    },
    /// A published message.
    Message {
        channel: String,
        epoch: String,
        seq: u64,
        data: serde_json::Value,
    },
    Unsubscribed {
        channel: String,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// A `refresh` was accepted: the connection now expires at `exp` (seconds since the
    /// Unix epoch) and the new token's entitlements apply to later subscribes.
    Refreshed {
        exp: u64,
    },
    /// The request was refused; the connection stays open.
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
    },
}

impl ServerMessage {
    /// Decodes a server frame (client side: tests, loadtest).
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Encodes the message as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Builds the JSON of a `message` frame around `data_json`, which must already be one valid
/// JSON value (the sources validate it once at ingestion).
pub fn encode_message(channel: &str, epoch: &str, seq: u64, data_json: &str) -> String {
    let mut out = String::with_capacity(64 + channel.len() + epoch.len() + data_json.len());
    out.push_str(r#"{"type":"message","channel":"#);
    push_json_str(&mut out, channel);
    out.push_str(r#","epoch":"#);
    push_json_str(&mut out, epoch);
    let _ = write!(out, r#","seq":{seq},"data":"#);
    out.push_str(data_json);
    out.push('}');
    out
}

fn push_json_str(out: &mut String, s: &str) {
    // Channel names never need escaping, but epochs and mapped names might; serde_json does
    // it correctly for every string.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_the_documented_examples() {
        let m = ClientMessage::decode(
            br#"{"type":"subscribe","channels":["trades.BTC-USD"],"since":{"trades.BTC-USD":{"epoch":"e1","seq":41}}}"#,
        )
        .unwrap();
        let mut since = BTreeMap::new();
        since.insert(
            "trades.BTC-USD".to_owned(),
            Position {
                epoch: "e1".into(),
                seq: 41,
            },
        );
        assert_eq!(
            m,
            ClientMessage::Subscribe {
                channels: vec!["trades.BTC-USD".into()],
                since
            }
        );
        assert_eq!(
            ClientMessage::decode(br#"{"type":"unsubscribe","channels":["a"]}"#).unwrap(),
            ClientMessage::Unsubscribe {
                channels: vec!["a".into()]
            }
        );
        assert_eq!(
            ClientMessage::decode(br#"{"type":"ping","id":7}"#).unwrap(),
            ClientMessage::Ping { id: Some(7) }
        );
        assert_eq!(
            ClientMessage::decode(br#"{"id":1,"type":"ping","extra":[1,2]}"#).unwrap(),
            ClientMessage::Ping { id: Some(1) }
        );
    }

    #[test]
    fn classifies_bad_input() {
        let code = |b: &[u8]| ClientMessage::decode(b).unwrap_err().code;
        assert_eq!(code(b"{not json"), ErrorCode::InvalidJson);
        assert_eq!(code(b""), ErrorCode::InvalidJson);
        assert_eq!(code(b"[1,2]"), ErrorCode::InvalidMessage);
        assert_eq!(code(b"{}"), ErrorCode::InvalidMessage);
        assert_eq!(code(br#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(br#"{"type":"subscribe"}"#), ErrorCode::InvalidMessage);
        assert_eq!(
            code(br#"{"type":"subscribe","channels":"a"}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(code(br#"{"type":7}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(br#"{"type":"auth"}"#), ErrorCode::InvalidMessage);
        assert_eq!(
            code(br#"{"type":"refresh","token":7}"#),
            ErrorCode::InvalidMessage
        );
    }

    #[test]
    fn encoded_message_decodes_back() {
        let json = encode_message("trades.BTC-USD", "e\"1", 42, r#"{"px":"1.5","q":[1,2]}"#);
        let back = ServerMessage::decode(json.as_bytes()).unwrap();
        assert_eq!(
            back,
            ServerMessage::Message {
                channel: "trades.BTC-USD".into(),
                epoch: "e\"1".into(),
                seq: 42,
                data: serde_json::json!({"px":"1.5","q":[1,2]}),
            }
        );
    }

    #[test]
    fn server_replies_have_the_documented_shape() {
        let e = ServerMessage::Error {
            code: ErrorCode::InvalidChannel,
            message: "bad".into(),
            channel: Some("x y".into()),
        };
        assert_eq!(
            e.to_json(),
            r#"{"type":"error","code":"invalid_channel","message":"bad","channel":"x y"}"#
        );
        assert_eq!(
            ServerMessage::Pong { id: Some(7) }.to_json(),
            r#"{"type":"pong","id":7}"#
        );
        assert_eq!(
            ServerMessage::Refreshed { exp: 1700000000 }.to_json(),
            r#"{"type":"refreshed","exp":1700000000}"#
        );
        let forbidden = ServerMessage::Error {
            code: ErrorCode::Forbidden,
            message: "not entitled".into(),
            channel: Some("orders.u1".into()),
        };
        assert_eq!(
            forbidden.to_json(),
            r#"{"type":"error","code":"forbidden","message":"not entitled","channel":"orders.u1"}"#
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ClientMessage::decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_jsonish_text(s in r#"[{}\[\]":,a-z0-9 \\]{0,200}"#) {
            let _ = ClientMessage::decode(s.as_bytes());
        }

        #[test]
        fn client_messages_round_trip(
            channels in proptest::collection::vec("[a-z.]{1,20}", 0..5),
            seq in any::<u64>(),
            id in proptest::option::of(any::<u64>()),
        ) {
            let mut since = BTreeMap::new();
            if let Some(c) = channels.first() {
                since.insert(c.clone(), Position { epoch: "e".into(), seq });
            }
            for m in [
                ClientMessage::Subscribe { channels: channels.clone(), since },
                ClientMessage::Unsubscribe { channels },
                ClientMessage::Ping { id },
                ClientMessage::Auth { token: "a.b.c".into() },
                ClientMessage::Refresh { token: "d.e.f".into() },
            ] {
                prop_assert_eq!(ClientMessage::decode(m.to_json().as_bytes()).unwrap(), m);
            }
        }
    }
}
