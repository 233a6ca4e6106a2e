//! Machine-readable codes carried by `{"type":"error"}` replies.
//!
//! An error reply never closes the connection; the codes tell a client program what it did
//! wrong without parsing the human message.

use serde::{Deserialize, Serialize};

/// The `code` field of an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not valid JSON.
    InvalidJson,
    /// Valid JSON, but not an object with the fields its `type` requires.
    InvalidMessage,
    /// The `type` field named no known message.
    UnknownType,
    /// A channel name broke the naming rules.
    InvalidChannel,
    /// The subscription would exceed the per-connection limit.
    TooManySubscriptions,
    /// The connection is already subscribed to the channel.
    AlreadySubscribed,
    /// Unsubscribe for a channel the connection is not subscribed to.
    NotSubscribed,
    /// A binary frame was sent; the protocol is JSON text only.
    BinaryNotSupported,
    /// The shard holds as many channels that carry nothing as it allows
    /// (`max_empty_channels`); the subscription would create one more.
    TooManyChannels,
    /// The channel is neither public nor among the token's entitlements (or the connection
    /// has no token). Only that channel is refused; the connection stays open.
    Forbidden,
    /// A `refresh` (or a late `auth`) carried a token that failed verification, or one for
    /// another subject. The connection keeps its current token until that one expires.
    InvalidToken,
}

impl ErrorCode {
    /// The snake_case string used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidMessage => "invalid_message",
            Self::UnknownType => "unknown_type",
            Self::InvalidChannel => "invalid_channel",
            Self::TooManySubscriptions => "too_many_subscriptions",
            Self::AlreadySubscribed => "already_subscribed",
            Self::NotSubscribed => "not_subscribed",
            Self::BinaryNotSupported => "binary_not_supported",
            Self::TooManyChannels => "too_many_channels",
            Self::Forbidden => "forbidden",
            Self::InvalidToken => "invalid_token",
        }
    }

    /// Every code, for documentation tests.
    pub const ALL: [ErrorCode; 11] = [
        Self::InvalidJson,
        Self::InvalidMessage,
        Self::UnknownType,
        Self::InvalidChannel,
        Self::TooManySubscriptions,
        Self::AlreadySubscribed,
        Self::NotSubscribed,
        Self::BinaryNotSupported,
        Self::TooManyChannels,
        Self::Forbidden,
        Self::InvalidToken,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_form_matches_as_str() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
