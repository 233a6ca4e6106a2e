//! The shard health report served at `GET /health` on every shard port.
//!
//! ws-lb polls it to compute utilization (`connections / max_connections`) and to stop
//! sending new clients to a draining shard.

use serde::{Deserialize, Serialize};

/// Whether a shard takes new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardStatus {
    /// Accepting connections.
    Ok,
    /// Shutting down: refuses new connections and is closing existing ones with 1012.
    Draining,
    /// Just started: its message source is still re-reading the recent history that
    /// reconnecting clients ask for with `since`. Load balancers place no new client on it
    /// until it turns `ok` (HTTP 503 until then); an upgrade that arrives anyway waits up to
    /// a second for the warm-up to end, then is refused (503, [`SHARD_STATUS_HEADER`]).
    Starting,
}

/// The header a shard adds to the 503 it answers an upgrade with while it is `draining` or
/// `starting` (the value is that status, as in `/health`). It tells a load balancer "this
/// shard is not ready: try another, and hold nothing against it" apart from a plain 503
/// ("full"), without waiting for its next `/health` poll.
pub const SHARD_STATUS_HEADER: &str = "x-odin-shard-status";

impl ShardStatus {
    /// The status as written in `/health` and in [`SHARD_STATUS_HEADER`].
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Draining => "draining",
            Self::Starting => "starting",
        }
    }

    /// Reads a [`SHARD_STATUS_HEADER`] value (exact, case-insensitive); `None` for anything
    /// else.
    pub fn from_header(value: &[u8]) -> Option<Self> {
        [Self::Ok, Self::Draining, Self::Starting]
            .into_iter()
            .find(|s| value.eq_ignore_ascii_case(s.as_str().as_bytes()))
    }
}

/// State of the process's message source (embedded bus or Kafka consumer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceHealth {
    /// `embedded` or `kafka`.
    pub kind: String,
    /// Whether the source currently delivers messages (for Kafka: broker reachable).
    pub connected: bool,
    /// Total records behind the partition high-water marks (Kafka only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
}

/// Body of `GET /health` on a shard port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardHealth {
    /// Index of the shard inside its process (port = base port + id).
    pub shard_id: u32,
    pub status: ShardStatus,
    /// Live WebSocket connections (slots taken).
    pub connections: u64,
    /// Slot capacity.
    pub max_connections: u64,
    /// Message source state, shared by every shard of the process.
    pub source: SourceHealth,
}

impl ShardHealth {
    /// `connections / max_connections`, in [0, 1]; a shard without capacity counts as full.
    pub fn utilization(&self) -> f64 {
        if self.max_connections == 0 {
            return 1.0;
        }
        (self.connections as f64 / self.max_connections as f64).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_header_values_round_trip_and_match_the_json() {
        for s in [
            ShardStatus::Ok,
            ShardStatus::Draining,
            ShardStatus::Starting,
        ] {
            assert_eq!(ShardStatus::from_header(s.as_str().as_bytes()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(
            ShardStatus::from_header(b"Starting"),
            Some(ShardStatus::Starting)
        );
        assert_eq!(ShardStatus::from_header(b"start"), None);
        assert_eq!(ShardStatus::from_header(b""), None);
    }

    #[test]
    fn round_trips_and_computes_utilization() {
        let h = ShardHealth {
            shard_id: 2,
            status: ShardStatus::Draining,
            connections: 150,
            max_connections: 600,
            source: SourceHealth {
                kind: "embedded".into(),
                connected: true,
                lag: None,
            },
        };
        let json = serde_json::to_string(&h).unwrap();
        assert!(json.contains("\"status\":\"draining\""), "{json}");
        let back: ShardHealth = serde_json::from_str(&json).unwrap();
        assert_eq!(back, h);
        assert!((h.utilization() - 0.25).abs() < 1e-9);
        let empty = ShardHealth {
            max_connections: 0,
            ..h
        };
        assert_eq!(empty.utilization(), 1.0);
    }
}
