//! Why a handshake attempt with a shard failed, and what the client is told when all fail.
//!
//! The error carries the facts the policy needs (which phase failed, the HTTP status) so the
//! breaker, the retry loop and the final close code are decided from data, not strings.

use std::time::Duration;

use crate::pool::Reported;

/// One failed attempt to open a WebSocket to a shard.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    /// TCP connect refused or unreachable: the shard process is down.
    #[error("connect refused: {0}")]
    ConnectRefused(String),
    /// TCP connect did not finish within the attempt budget.
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// Connected, but the WebSocket handshake did not finish in time.
    #[error("handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    /// The shard answered the upgrade with a non-101 status (503 = full).
    #[error("shard answered HTTP {0}")]
    HttpStatus(u16),
    /// The shard answered 503 saying it is draining or starting (ws-protocol's
    /// `SHARD_STATUS_HEADER`): alive and not full, just not taking clients yet or any more.
    /// Not held against its breaker or score; the pool takes the status as if a `/health`
    /// poll had said it (see [`crate::pool::ShardPool`]).
    #[error("shard is {}", .0.as_str())]
    NotReady(Reported),
    /// The connection broke during the handshake (reset, EOF).
    #[error("connection lost during handshake: {0}")]
    ConnectionLost(String),
    /// The shard spoke something that is not a valid WebSocket handshake.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// This process could not even open a socket (out of file descriptors or local
    /// ports): not the shard's fault, so it never counts against its breaker or score, and
    /// another shard would fail the same way.
    #[error("local resources exhausted: {0}")]
    LocalResources(String),
}

impl AttemptError {
    /// Whether the failure is a sign of overload (busy or slow) rather than absence.
    pub fn is_overload(&self) -> bool {
        match self {
            Self::ConnectTimeout(_) | Self::HandshakeTimeout(_) | Self::LocalResources(_) => true,
            Self::HttpStatus(s) => matches!(s, 429 | 503),
            _ => false,
        }
    }

    /// What kind of failure this is (a metric label).
    pub fn kind(&self) -> AttemptKind {
        match self {
            Self::ConnectRefused(_) => AttemptKind::Refused,
            Self::ConnectTimeout(_) => AttemptKind::ConnectTimeout,
            Self::HandshakeTimeout(_) => AttemptKind::HandshakeTimeout,
            Self::HttpStatus(503) => AttemptKind::Http503,
            Self::NotReady(_) => AttemptKind::NotReady,
            Self::HttpStatus(_) => AttemptKind::HttpOther,
            Self::ConnectionLost(_) => AttemptKind::ConnectionLost,
            Self::Protocol(_) => AttemptKind::Protocol,
            Self::LocalResources(_) => AttemptKind::LocalResources,
        }
    }

    /// Every failure the shard caused counts against its breaker and score: a full shard
    /// that keeps answering 503 should be skipped for a while just like a dead one. Running
    /// out of descriptors here says nothing about the shard, and a shard that says it is
    /// draining or starting is neither broken nor full: a refused half-open trial would
    /// otherwise keep its breaker open another `circuit_breaker_timeout` after it is ready.
    pub fn counts_against_shard(&self) -> bool {
        !matches!(self, Self::LocalResources(_) | Self::NotReady(_))
    }

    /// Whether this process, not the shard, failed (out of descriptors or ports): every
    /// other shard would fail the same way.
    pub fn is_local(&self) -> bool {
        matches!(self, Self::LocalResources(_))
    }
}

/// The kinds of [`AttemptError`], a bounded set of metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptKind {
    Refused,
    ConnectTimeout,
    HandshakeTimeout,
    Http503,
    HttpOther,
    ConnectionLost,
    Protocol,
    LocalResources,
    NotReady,
}

impl AttemptKind {
    /// Every kind, in label order (index with `as usize`).
    pub const ALL: [AttemptKind; 9] = [
        Self::Refused,
        Self::ConnectTimeout,
        Self::HandshakeTimeout,
        Self::Http503,
        Self::HttpOther,
        Self::ConnectionLost,
        Self::Protocol,
        Self::LocalResources,
        Self::NotReady,
    ];

    /// The `kind` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::ConnectTimeout => "connect_timeout",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::Http503 => "http_503",
            Self::HttpOther => "http_other",
            Self::ConnectionLost => "connection_lost",
            Self::Protocol => "protocol",
            Self::LocalResources => "local_resources",
            Self::NotReady => "not_ready",
        }
    }
}

/// The close frame sent to a client when no shard could take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinalClose {
    pub code: u16,
    pub reason: &'static str,
}

/// 1013: at least one shard was reachable but busy or slow.
pub const OVERLOADED: FinalClose = FinalClose {
    code: 1013,
    reason: "Server temporarily overloaded, please retry",
};
/// 1012: no shard could be reached or admitted at all.
pub const UNAVAILABLE: FinalClose = FinalClose {
    code: 1012,
    reason: "All backend servers temporarily unavailable",
};

impl FinalClose {
    /// Decides the close for a client whose attempts all failed. No attempt at all (every
    /// breaker open, every shard draining) or only "down" and "not ready" failures → 1012;
    /// any sign of overload, or the handshake deadline running out → 1013.
    pub fn decide(errors: &[AttemptError], deadline_expired: bool) -> FinalClose {
        if deadline_expired || errors.iter().any(AttemptError::is_overload) {
            OVERLOADED
        } else {
            UNAVAILABLE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_listed_in_index_order() {
        for (i, k) in AttemptKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        assert_eq!(AttemptError::HttpStatus(503).kind().label(), "http_503");
        assert_eq!(AttemptError::HttpStatus(502).kind(), AttemptKind::HttpOther);
    }

    #[test]
    fn close_decision() {
        assert_eq!(FinalClose::decide(&[], false), UNAVAILABLE);
        let down = [
            AttemptError::ConnectRefused("x".into()),
            AttemptError::ConnectionLost("y".into()),
        ];
        assert_eq!(FinalClose::decide(&down, false), UNAVAILABLE);
        let slow = [
            AttemptError::ConnectRefused("x".into()),
            AttemptError::HandshakeTimeout(Duration::from_secs(1)),
        ];
        assert_eq!(FinalClose::decide(&slow, false), OVERLOADED);
        assert_eq!(
            FinalClose::decide(&[AttemptError::HttpStatus(503)], false),
            OVERLOADED
        );
        assert_eq!(FinalClose::decide(&down, true), OVERLOADED);
        // Shards that say they are restarting: reconnect (1012), not back off.
        let restarting = [
            AttemptError::NotReady(Reported::Starting),
            AttemptError::NotReady(Reported::Draining),
            AttemptError::ConnectRefused("x".into()),
        ];
        assert_eq!(FinalClose::decide(&restarting, false), UNAVAILABLE);
        assert!(!restarting[0].counts_against_shard() && !restarting[0].is_local());
        assert_eq!(restarting[1].to_string(), "shard is draining");
        assert_eq!(restarting[0].kind().label(), "not_ready");
    }
}
