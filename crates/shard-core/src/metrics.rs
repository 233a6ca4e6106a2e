//! Metric names exported by a shard process (documented in `docs/runbook.md`), and the
//! per-shard handles resolved once so hot paths only do atomic adds.

use metrics::{Counter, Gauge};
use ws_protocol::ErrorCode;

/// Gauge: live WebSocket connections (slots taken), label `shard_id`.
pub const CONNECTIONS: &str = "ws_shard_connections";
/// Gauge: tier links from load balancers (`GET /mux`), label `shard_id`.
pub const TIER_LINKS: &str = "ws_shard_tier_links";
/// Gauge: slot capacity, label `shard_id`.
pub const MAX_CONNECTIONS: &str = "ws_shard_max_connections";
/// Counter: upgrades accepted, label `shard_id`.
pub const ACCEPTED: &str = "ws_shard_connections_accepted_total";
/// Counter: upgrades refused before upgrading, labels `shard_id`, `reason` (full, draining, bad_request).
pub const REJECTED: &str = "ws_shard_connections_rejected_total";
/// Counter: close frames sent, labels `shard_id`, `code`.
pub const CLOSES: &str = "ws_shard_closes_total";
/// Counter: connections closed as slow consumers, label `shard_id`.
pub const SLOW_CONSUMERS: &str = "ws_shard_slow_consumer_disconnects_total";
/// Counter: messages accepted from the source (once per message, not per shard).
pub const PUBLISHED: &str = "ws_shard_messages_published_total";
/// Counter: messages dropped by the registry as duplicates or out of order (per process).
pub const DUPLICATES: &str = "ws_shard_messages_duplicate_total";
/// Counter: messages enqueued to subscribers, label `shard_id`.
pub const DELIVERIES: &str = "ws_shard_deliveries_total";
/// Histogram: seconds from a message's source timestamp to the end of its fan-out.
pub const FANOUT_SECONDS: &str = "ws_shard_fanout_seconds";
/// Gauge: channels with state in the registry (published ones and placeholders).
pub const CHANNELS: &str = "ws_shard_channels";
/// Gauge: channels that left the registry and are kept only as a position (epoch, last seq).
pub const CHANNEL_POSITIONS: &str = "ws_shard_channel_positions";
/// Gauge: channels created by subscriptions that have carried no message (capped by
/// `max_empty_channels`).
pub const EMPTY_CHANNELS: &str = "ws_shard_empty_channels";
/// Gauge: bytes of history and channel bookkeeping counted against the budget.
pub const HISTORY_BYTES: &str = "ws_shard_history_bytes";
/// Gauge: the `history_budget` in bytes.
pub const HISTORY_BUDGET: &str = "ws_shard_history_budget_bytes";
/// Counter: history or channels evicted, label `cause` (`EvictionCause::label`).
pub const CHANNEL_EVICTIONS: &str = "ws_shard_channel_evictions_total";
/// Gauge: subscriptions across all connections.
pub const SUBSCRIPTIONS: &str = "ws_shard_subscriptions";
/// Counter: `error` replies sent, label `code`.
pub const ERROR_REPLIES: &str = "ws_shard_error_replies_total";
/// Counter: messages replayed to clients from history on `since` recovery.
pub const REPLAYED: &str = "ws_shard_replayed_total";
/// Counter: subscribe requests with `since`, label `recovered` (true/false).
pub const RECOVERIES: &str = "ws_shard_recoveries_total";

/// Counter: tokens refused by the shard's own verification (upgrade header or query,
/// `auth` and `refresh` messages), label `reason` (`auth::AuthFailure::label`).
pub const AUTH_FAILURES: &str = "ws_shard_auth_failures_total";
/// Counter: upgrade-token verifications by verified-token cache result, label `result`
/// (`hit`: seen before with the current keys, no signature check; `miss`: verified in full).
pub const AUTH_CACHE: &str = "ws_shard_auth_cache_lookups_total";

/// Every metric name this crate exports (for the docs and exported-metrics tests).
pub const ALL: &[&str] = &[
    CONNECTIONS,
    TIER_LINKS,
    MAX_CONNECTIONS,
    ACCEPTED,
    REJECTED,
    CLOSES,
    SLOW_CONSUMERS,
    PUBLISHED,
    DUPLICATES,
    DELIVERIES,
    FANOUT_SECONDS,
    CHANNELS,
    CHANNEL_POSITIONS,
    EMPTY_CHANNELS,
    HISTORY_BYTES,
    HISTORY_BUDGET,
    CHANNEL_EVICTIONS,
    SUBSCRIPTIONS,
    ERROR_REPLIES,
    REPLAYED,
    RECOVERIES,
    AUTH_FAILURES,
    AUTH_CACHE,
];

/// Why a shard refused an upgrade (`ws_shard_connections_rejected_total`, label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeRejection {
    /// Every slot is taken (503).
    Full,
    /// The shard is draining (503).
    Draining,
    /// The shard is still re-reading its history at start (503).
    Starting,
    /// Not a valid WebSocket upgrade request (400).
    BadRequest,
}

impl UpgradeRejection {
    /// Every reason, in index order.
    pub const ALL: [UpgradeRejection; 4] =
        [Self::Full, Self::Draining, Self::Starting, Self::BadRequest];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Draining => "draining",
            Self::Starting => "starting",
            Self::BadRequest => "bad_request",
        }
    }
}

/// Handles for one shard.
#[derive(Debug, Clone)]
pub struct ShardMetrics {
    pub shard_id: u32,
    pub connections: Gauge,
    pub links: Gauge,
    pub accepted: Counter,
    pub slow_consumers: Counter,
    pub deliveries: Counter,
    /// `ws_shard_connections_rejected_total` by [`UpgradeRejection`] index.
    rejections: Vec<Counter>,
    /// `ws_shard_closes_total` by code, for the codes this system sends.
    closes: Vec<(u16, Counter)>,
    /// `ws_shard_closes_total{code="other"}`: codes echoed from clients (bounded labels).
    close_other: Counter,
    /// `ws_shard_error_replies_total` by code, in `ErrorCode::ALL` order (process-wide).
    error_replies: Vec<Counter>,
    /// `ws_shard_recoveries_total{recovered="true"}`, then `"false"` (process-wide).
    recoveries: [Counter; 2],
    /// `ws_shard_auth_failures_total` by `AuthFailure::index` (process-wide).
    auth_failures: Vec<Counter>,
    /// `ws_shard_auth_cache_lookups_total{result="hit"}`, then `"miss"` (process-wide).
    auth_cache: [Counter; 2],
}

impl ShardMetrics {
    /// Registers the handles of shard `shard_id`, and its labelled counters at zero so that
    /// `rate()` and alerts see a series from the start.
    pub fn new(shard_id: u32) -> Self {
        let id = shard_id.to_string();
        let zero = |c: Counter| {
            c.increment(0);
            c
        };
        let closes = ws_protocol::close::SENT_CODES
            .iter()
            .map(|(code, _)| {
                (
                    *code,
                    metrics::counter!(CLOSES, "shard_id" => id.clone(), "code" => code.to_string()),
                )
            })
            .collect();
        Self {
            shard_id,
            connections: metrics::gauge!(CONNECTIONS, "shard_id" => id.clone()),
            links: metrics::gauge!(TIER_LINKS, "shard_id" => id.clone()),
            accepted: metrics::counter!(ACCEPTED, "shard_id" => id.clone()),
            slow_consumers: metrics::counter!(SLOW_CONSUMERS, "shard_id" => id.clone()),
            deliveries: metrics::counter!(DELIVERIES, "shard_id" => id.clone()),
            rejections: UpgradeRejection::ALL
                .iter()
                .map(|r| zero(metrics::counter!(REJECTED, "shard_id" => id.clone(), "reason" => r.label())))
                .collect(),
            closes,
            close_other: metrics::counter!(CLOSES, "shard_id" => id, "code" => "other"),
            error_replies: ErrorCode::ALL
                .iter()
                .map(|c| zero(metrics::counter!(ERROR_REPLIES, "code" => c.as_str())))
                .collect(),
            auth_failures: auth::AuthFailure::ALL
                .iter()
                .map(|f| zero(metrics::counter!(AUTH_FAILURES, "reason" => f.label())))
                .collect(),
            recoveries: ["true", "false"]
                .map(|r| zero(metrics::counter!(RECOVERIES, "recovered" => r))),
            auth_cache: ["hit", "miss"].map(|r| zero(metrics::counter!(AUTH_CACHE, "result" => r))),
        }
    }

    /// Counts a refused upgrade.
    pub fn rejected(&self, reason: UpgradeRejection) {
        if let Some(c) = self.rejections.get(reason as usize) {
            c.increment(1);
        }
    }

    /// Counts a close frame sent.
    pub fn close_sent(&self, code: u16) {
        match self.closes.iter().find(|(c, _)| *c == code) {
            Some((_, counter)) => counter.increment(1),
            // A code echoed from a client (3000-4999 and the like): one bounded label.
            None => self.close_other.increment(1),
        }
    }

    /// Counts an `error` reply.
    pub fn error_reply(&self, code: ErrorCode) {
        let i = ErrorCode::ALL.iter().position(|c| *c == code);
        if let Some(c) = i.and_then(|i| self.error_replies.get(i)) {
            c.increment(1);
        }
    }

    /// Counts a verified-token cache lookup of an upgrade's token.
    pub fn auth_lookup(&self, lookup: auth::Lookup) {
        match lookup {
            auth::Lookup::Hit => self.auth_cache[0].increment(1),
            auth::Lookup::Miss => self.auth_cache[1].increment(1),
            auth::Lookup::None => {}
        }
    }

    /// Counts a token refused by this shard.
    pub fn auth_failure(&self, failure: auth::AuthFailure) {
        if let Some(c) = self.auth_failures.get(failure.index()) {
            c.increment(1);
        }
    }

    /// Counts a subscription with `since`, by whether it recovered everything.
    pub fn recovery(&self, recovered: bool) {
        self.recoveries[usize::from(!recovered)].increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_listed_at_their_index() {
        for (i, r) in UpgradeRejection::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
