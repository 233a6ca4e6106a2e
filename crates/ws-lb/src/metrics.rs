//! Metric names exported by ws-lb (documented in `docs/runbook.md`, used by the alerts and the
//! dashboard in deploy/), the label values as enums (`label()`, `ALL`), and
//! handles resolved once per shard so the per-connection path only does atomic adds.

use std::sync::OnceLock;

use lb_core::retry::MAX_SHARDS;
use lb_core::{
    AttemptKind, BreakerState, MemberState, PacingRejection, PoolObserver, ShardSnapshot,
    Transition,
};
use metrics::{Counter, Gauge, Histogram};

use crate::relay::RelayEnd;

/// Counter: handshake attempts made to a shard, label `shard_id`.
pub const HANDSHAKE_ATTEMPTS: &str = "ws_handshake_attempts_total";
/// Counter: successful shard handshakes, label `shard_id`.
pub const HANDSHAKE_SUCCESS: &str = "ws_handshake_success_total";
/// Counter: failed shard handshakes, label `shard_id`.
pub const HANDSHAKE_FAILURES: &str = "ws_handshake_failures_total";
/// Histogram: duration of shard handshakes (TCP connect to 101), label `shard_id`.
pub const HANDSHAKE_DURATION: &str = "ws_handshake_duration_seconds";
/// Counter: attempts by their rank within one client's handshake, label `attempt` (1 = first try).
pub const RETRY_COUNT: &str = "ws_handshake_retry_count";
/// Gauge: 1 for the breaker's current state, 0 for the others; labels `shard_id`, `state`.
pub const BREAKER_STATE: &str = "ws_circuit_breaker_state";
/// Counter: breaker transitions, labels `shard_id`, `from`, `to`.
pub const BREAKER_TRANSITIONS: &str = "ws_circuit_breaker_transitions_total";
/// Counter: failures recorded by a shard's breaker, label `shard_id`.
pub const BREAKER_FAILURES: &str = "ws_circuit_breaker_failures_total";
/// Gauge: health score in [0, 1], label `shard_id`.
pub const HEALTH_SCORE: &str = "ws_shard_health_score";
/// Gauge: utilization from the shard's /health, label `shard_id`.
pub const UTILIZATION: &str = "ws_shard_utilization";
/// Gauge: failed attempts in the sliding window, label `shard_id`.
pub const RECENT_FAILURES: &str = "ws_shard_recent_failures";
/// Gauge: clients currently relayed.
pub const ACTIVE: &str = "ws_lb_active_connections";
/// Gauge: clients waiting in the admission queue.
pub const QUEUE_LEN: &str = "ws_lb_admission_queue_length";
/// Histogram: time spent in the admission queue.
pub const ADMISSION_WAIT: &str = "ws_lb_admission_wait_seconds";
/// Counter: clients refused admission, label `reason` ([`Rejection::label`]).
pub const ADMISSION_REJECTIONS: &str = "ws_lb_admission_rejections_total";
/// Counter: close frames the LB itself sent to clients, label `code`.
pub const CLOSE_CODES: &str = "ws_lb_close_codes_total";
/// Counter: client connections by outcome, label `result` ([`ClientOutcome::label`]).
pub const CLIENT_CONNECTIONS: &str = "ws_lb_client_connections_total";
/// Counter: ended relays by how they ended, label `end` ([`RelayEnd::label`]).
pub const RELAY_ENDS: &str = "ws_lb_relay_ends_total";
/// Gauge: shards that would take a new client now (not draining, breaker admitting); 0 means
/// every new client gets 1012. Updated every `health_interval`.
pub const SHARDS_AVAILABLE: &str = "ws_lb_shards_available";
/// Counter: failed shard `/health` polls, label `shard_id`.
pub const HEALTH_POLL_FAILURES: &str = "ws_lb_health_poll_failures_total";
/// Counter: failed shard handshakes by kind, labels `shard_id`, `kind`.
pub const ATTEMPT_ERRORS: &str = "ws_lb_attempt_errors_total";

/// Gauge: shards by membership state, label `state` (`lb_core::MemberState::label`).
pub const MEMBERS: &str = "ws_lb_members";
/// Counter: membership updates that changed the set of listed shards.
pub const MEMBERSHIP_UPDATES: &str = "ws_lb_membership_updates_total";
/// Gauge: Unix time of the last successful read of the membership source (0: static list).
pub const MEMBERSHIP_LAST_UPDATE: &str = "ws_lb_membership_last_update_timestamp_seconds";
/// Counter: failed reads of the membership source (the last good set was kept), label
/// `reason` ([`SourceError::label`]).
pub const MEMBERSHIP_SOURCE_ERRORS: &str = "ws_lb_membership_source_errors_total";
/// Gauge: this LB's handshakes in progress and relays per shard, label `shard_id`.
pub const SHARD_RELAYS: &str = "ws_lb_shard_relays";

/// Counter: tokens refused at the edge (the client got 4001), label `reason`
/// (`auth::AuthFailure::label`).
pub const AUTH_FAILURES: &str = "ws_lb_auth_failures_total";
/// Counter: token verifications by verified-token cache result, label `result` (`hit`: seen
/// before with the current keys, no signature check; `miss`: verified in full).
pub const AUTH_CACHE: &str = "ws_lb_auth_cache_lookups_total";
/// Counter: shard calls granted past an open breaker because every breaker was open
/// (panic routing, `lb_core::ShardPool::select`).
pub const PANIC_ROUTED: &str = "ws_lb_panic_routed_total";

/// Every metric name this crate exports (for docs and the exported-metrics test).
pub const ALL: &[&str] = &[
    HANDSHAKE_ATTEMPTS,
    HANDSHAKE_SUCCESS,
    HANDSHAKE_FAILURES,
    HANDSHAKE_DURATION,
    RETRY_COUNT,
    BREAKER_STATE,
    BREAKER_TRANSITIONS,
    BREAKER_FAILURES,
    HEALTH_SCORE,
    UTILIZATION,
    RECENT_FAILURES,
    ACTIVE,
    RELAY_ENDS,
    QUEUE_LEN,
    ADMISSION_WAIT,
    ADMISSION_REJECTIONS,
    CLOSE_CODES,
    CLIENT_CONNECTIONS,
    HEALTH_POLL_FAILURES,
    SHARDS_AVAILABLE,
    ATTEMPT_ERRORS,
    AUTH_FAILURES,
    AUTH_CACHE,
    MEMBERS,
    MEMBERSHIP_UPDATES,
    MEMBERSHIP_LAST_UPDATE,
    MEMBERSHIP_SOURCE_ERRORS,
    SHARD_RELAYS,
    PANIC_ROUTED,
];

/// Why the membership source could not be used (`ws_lb_membership_source_errors_total`,
/// label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceError {
    /// The file could not be read.
    Unreadable,
    /// A line or URL that is not a shard.
    Invalid,
    /// No shard at all (never applied): an empty file, a DNS name that does not exist
    /// (NXDOMAIN) or has no A/AAAA record.
    Empty,
    /// More shards than the pool's slots.
    TooMany,
    /// The DNS lookup did not answer within `membership_interval` (or the previous one is
    /// still running).
    DnsTimeout,
    /// The resolver reported a failure (SERVFAIL, its own timeout, no resolver).
    DnsError,
}

impl SourceError {
    /// Every reason, in index order.
    pub const ALL: [SourceError; 6] = [
        Self::Unreadable,
        Self::Invalid,
        Self::Empty,
        Self::TooMany,
        Self::DnsTimeout,
        Self::DnsError,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unreadable => "unreadable",
            Self::Invalid => "invalid",
            Self::Empty => "empty",
            Self::TooMany => "too_many",
            Self::DnsTimeout => "dns_timeout",
            Self::DnsError => "dns_error",
        }
    }
}

/// Why a client was refused before any shard was dialled (`ws_lb_admission_rejections_total`,
/// label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The admission queue was full (the client gets 1013).
    QueueFull,
    /// The admission wait would have exceeded its limit (1013).
    WaitTooLong,
    /// Over the per-IP rate (HTTP 429).
    PerIp,
    /// `Origin` not allowed (HTTP 403).
    Origin,
    /// The LB is draining (HTTP 503).
    Draining,
    /// `max_clients` reached (HTTP 503).
    ClientLimit,
    /// `max_connections_per_sub` reached for the token's subject (upgraded, closed 4003).
    SubjectLimit,
}

impl Rejection {
    /// Every reason, in index order.
    pub const ALL: [Rejection; 7] = [
        Self::QueueFull,
        Self::WaitTooLong,
        Self::PerIp,
        Self::Origin,
        Self::Draining,
        Self::ClientLimit,
        Self::SubjectLimit,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::WaitTooLong => "wait_too_long",
            Self::PerIp => "per_ip",
            Self::Origin => "origin",
            Self::Draining => "draining",
            Self::ClientLimit => "client_limit",
            Self::SubjectLimit => "subject_limit",
        }
    }
}

impl From<PacingRejection> for Rejection {
    fn from(r: PacingRejection) -> Self {
        match r {
            PacingRejection::QueueFull => Self::QueueFull,
            PacingRejection::WaitTooLong => Self::WaitTooLong,
        }
    }
}

/// What became of a client connection (`ws_lb_client_connections_total`, label `result`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientOutcome {
    /// Relayed to a shard.
    Relayed,
    /// Upgraded and closed with 1012: no shard could be reached.
    Closed1012,
    /// Upgraded and closed with 1013: overloaded.
    Closed1013,
    /// Refused before the upgrade (an HTTP error status).
    Rejected,
    /// Upgraded and closed with 4001: token missing or refused.
    Closed4001,
    /// Upgraded and closed with 4003: too many connections for the token's subject.
    Closed4003,
}

impl ClientOutcome {
    /// Every outcome, in index order.
    pub const ALL: [ClientOutcome; 6] = [
        Self::Relayed,
        Self::Closed1012,
        Self::Closed1013,
        Self::Rejected,
        Self::Closed4001,
        Self::Closed4003,
    ];

    /// The `result` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Relayed => "relayed",
            Self::Closed1012 => "closed_1012",
            Self::Closed1013 => "closed_1013",
            Self::Rejected => "rejected",
            Self::Closed4001 => "closed_4001",
            Self::Closed4003 => "closed_4003",
        }
    }
}

/// The close codes the LB sends itself (`ws_lb_close_codes_total`, label `code`).
const LB_CLOSE_CODES: [u16; 4] = [
    ws_protocol::close::SERVICE_RESTART,
    ws_protocol::close::TRY_AGAIN_LATER,
    ws_protocol::close::UNAUTHORIZED,
    ws_protocol::close::TOO_MANY_CONNECTIONS,
];

/// Handles for one shard.
#[derive(Debug)]
pub struct ShardHandles {
    pub attempts: Counter,
    pub success: Counter,
    pub failures: Counter,
    pub duration: Histogram,
    pub breaker_failures: Counter,
    /// `ws_lb_health_poll_failures_total`.
    pub health_poll_failures: Counter,
    /// `ws_lb_attempt_errors_total` by [`AttemptKind`] (index `kind as usize`).
    attempt_errors: Vec<Counter>,
    score: Gauge,
    utilization: Gauge,
    recent_failures: Gauge,
    relays: Gauge,
    state: [Gauge; 3],
    /// `ws_circuit_breaker_transitions_total` by [`TRANSITIONS`] index.
    transitions: [Counter; 4],
    /// The URL now in this slot, for log lines.
    url: parking_lot::Mutex<String>,
}

impl ShardHandles {
    fn new(shard: usize) -> Self {
        let id = shard.to_string();
        let transitions = TRANSITIONS.map(|(from, to)| {
            let c = metrics::counter!(BREAKER_TRANSITIONS, "shard_id" => id.clone(), "from" => from.as_str(), "to" => to.as_str());
            c.increment(0);
            c
        });
        let state = BreakerState::ALL.map(
            |s| metrics::gauge!(BREAKER_STATE, "shard_id" => id.clone(), "state" => s.as_str()),
        );
        let h = Self {
            attempts: metrics::counter!(HANDSHAKE_ATTEMPTS, "shard_id" => id.clone()),
            success: metrics::counter!(HANDSHAKE_SUCCESS, "shard_id" => id.clone()),
            failures: metrics::counter!(HANDSHAKE_FAILURES, "shard_id" => id.clone()),
            duration: metrics::histogram!(HANDSHAKE_DURATION, "shard_id" => id.clone()),
            breaker_failures: metrics::counter!(BREAKER_FAILURES, "shard_id" => id.clone()),
            health_poll_failures: metrics::counter!(HEALTH_POLL_FAILURES, "shard_id" => id.clone()),
            attempt_errors: AttemptKind::ALL
                .iter()
                .map(|k| metrics::counter!(ATTEMPT_ERRORS, "shard_id" => id.clone(), "kind" => k.label()))
                .collect(),
            score: metrics::gauge!(HEALTH_SCORE, "shard_id" => id.clone()),
            utilization: metrics::gauge!(UTILIZATION, "shard_id" => id.clone()),
            recent_failures: metrics::gauge!(RECENT_FAILURES, "shard_id" => id.clone()),
            relays: metrics::gauge!(SHARD_RELAYS, "shard_id" => id),
            state,
            transitions,
            url: parking_lot::Mutex::new(String::new()),
        };
        h.set_state(BreakerState::Closed);
        h.health_poll_failures.increment(0);
        for c in &h.attempt_errors {
            c.increment(0);
        }
        h
    }

    /// Counts a failed handshake attempt of `kind`.
    pub fn attempt_error(&self, kind: AttemptKind) {
        if let Some(c) = self.attempt_errors.get(kind as usize) {
            c.increment(1);
        }
    }

    fn set_state(&self, current: BreakerState) {
        for (s, g) in BreakerState::ALL.iter().zip(&self.state) {
            g.set(if *s == current { 1.0 } else { 0.0 });
        }
    }
}

/// Per-slot handles, registered when a shard first takes the slot (at start for the
/// initial shards, on a membership update for later ones), then only read.
#[derive(Debug)]
pub struct ShardTable {
    slots: Box<[OnceLock<ShardHandles>]>,
}

impl ShardTable {
    /// An empty table with a place for every pool slot.
    pub fn new() -> Self {
        Self {
            slots: (0..MAX_SHARDS).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The handles of slot `shard` (registered now if they were not yet).
    pub fn get(&self, shard: usize) -> Option<&ShardHandles> {
        self.slots
            .get(shard)
            .map(|s| s.get_or_init(|| ShardHandles::new(shard)))
    }

    /// Registers slot `shard` for the shard at `url`.
    pub fn register(&self, shard: usize, url: &str) {
        if let Some(h) = self.get(shard) {
            let mut name = h.url.lock();
            name.clear();
            name.push_str(url);
        }
    }
}

impl Default for ShardTable {
    fn default() -> Self {
        Self::new()
    }
}

/// All of the LB's metric handles.
#[derive(Debug)]
pub struct LbMetrics {
    shards: std::sync::Arc<ShardTable>,
    /// `ws_handshake_retry_count` by attempt rank (index 0 = first attempt).
    attempt_rank: Box<[OnceLock<Counter>]>,
    /// `ws_lb_members` by `MemberState` index.
    members: [Gauge; 4],
    membership_updates: Counter,
    membership_last_update: Gauge,
    /// By [`SourceError`] index.
    source_errors: Vec<Counter>,
    pub active: Gauge,
    pub queue_len: Gauge,
    pub admission_wait: Histogram,
    pub shards_available: Gauge,
    /// By [`Rejection`], [`ClientOutcome`] and [`RelayEnd`] index, and by LB close code.
    rejections: Vec<Counter>,
    outcomes: Vec<Counter>,
    relay_ends: Vec<Counter>,
    lb_closes: Vec<(u16, Counter)>,
    /// By `auth::AuthFailure::index`.
    auth_failures: Vec<Counter>,
    /// Verified-token cache hits and misses.
    auth_cache: [Counter; 2],
    /// `ws_lb_panic_routed_total`.
    pub panic_routed: Counter,
}

impl LbMetrics {
    /// Registers handles for the `urls` the LB starts with (slots `0..n`), and every
    /// labelled counter at zero so that `rate()` and alerts see a series from the start
    /// rather than an absent one.
    pub fn new(shards: std::sync::Arc<ShardTable>, urls: &[String]) -> Self {
        let zero = |c: Counter| {
            c.increment(0);
            c
        };
        let n = urls.len();
        for (i, url) in urls.iter().enumerate() {
            shards.register(i, url);
        }
        let m = Self {
            shards,
            attempt_rank: (0..MAX_SHARDS).map(|_| OnceLock::new()).collect(),
            members: MemberState::ALL.map(|s| metrics::gauge!(MEMBERS, "state" => s.label())),
            membership_updates: zero(metrics::counter!(MEMBERSHIP_UPDATES)),
            membership_last_update: metrics::gauge!(MEMBERSHIP_LAST_UPDATE),
            source_errors: SourceError::ALL
                .iter()
                .map(|r| zero(metrics::counter!(MEMBERSHIP_SOURCE_ERRORS, "reason" => r.label())))
                .collect(),
            active: metrics::gauge!(ACTIVE),
            queue_len: metrics::gauge!(QUEUE_LEN),
            admission_wait: metrics::histogram!(ADMISSION_WAIT),
            shards_available: {
                // Until the first poll every shard counts as available (the pool starts
                // with closed breakers).
                let g = metrics::gauge!(SHARDS_AVAILABLE);
                g.set(n as f64);
                g
            },
            // Every labelled counter is registered at zero so that `rate()` and alerts see a
            // series from the start rather than an absent one.
            rejections: Rejection::ALL
                .iter()
                .map(|r| zero(metrics::counter!(ADMISSION_REJECTIONS, "reason" => r.label())))
                .collect(),
            outcomes: ClientOutcome::ALL
                .iter()
                .map(|o| zero(metrics::counter!(CLIENT_CONNECTIONS, "result" => o.label())))
                .collect(),
            relay_ends: RelayEnd::ALL
                .iter()
                .map(|e| zero(metrics::counter!(RELAY_ENDS, "end" => e.label())))
                .collect(),
            auth_failures: auth::AuthFailure::ALL
                .iter()
                .map(|f| zero(metrics::counter!(AUTH_FAILURES, "reason" => f.label())))
                .collect(),
            panic_routed: zero(metrics::counter!(PANIC_ROUTED)),
            auth_cache: [auth::Lookup::Hit, auth::Lookup::Miss]
                .map(|l| zero(metrics::counter!(AUTH_CACHE, "result" => l.label().unwrap_or("")))),
            lb_closes: LB_CLOSE_CODES
                .iter()
                .map(|c| {
                    (
                        *c,
                        zero(metrics::counter!(CLOSE_CODES, "code" => c.to_string())),
                    )
                })
                .collect(),
        };
        for a in 0..n {
            m.attempt_rank(a);
        }
        m
    }

    /// The handles of shard (slot) `i`.
    pub fn shard(&self, i: usize) -> Option<&ShardHandles> {
        self.shards.get(i)
    }

    /// Registers slot `i` for the shard at `url` (a membership update gave it the slot).
    pub fn register_shard(&self, i: usize, url: &str) {
        self.shards.register(i, url);
    }

    /// `ws_handshake_retry_count` of the attempt of rank `attempt` (0 = first).
    pub fn attempt_rank(&self, attempt: usize) -> Option<&Counter> {
        let slot = self.attempt_rank.get(attempt)?;
        Some(slot.get_or_init(|| {
            let c = metrics::counter!(RETRY_COUNT, "attempt" => (attempt + 1).to_string());
            c.increment(0);
            c
        }))
    }

    /// Counts a membership update that changed the listed shards.
    pub fn membership_update(&self) {
        self.membership_updates.increment(1);
    }

    /// Records a successful read of the membership source, now.
    pub fn membership_read_ok(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.membership_last_update.set(now);
    }

    /// Counts a failed read of the membership source.
    pub fn source_error(&self, reason: SourceError) {
        if let Some(c) = self.source_errors.get(reason as usize) {
            c.increment(1);
        }
    }

    /// Counts a verified-token cache lookup.
    pub fn auth_lookup(&self, lookup: auth::Lookup) {
        match lookup {
            auth::Lookup::Hit => self.auth_cache[0].increment(1),
            auth::Lookup::Miss => self.auth_cache[1].increment(1),
            auth::Lookup::None => {}
        }
    }

    /// Counts a token refused at the edge.
    pub fn auth_failure(&self, failure: auth::AuthFailure) {
        if let Some(c) = self.auth_failures.get(failure.index()) {
            c.increment(1);
        }
    }

    /// Counts a client refused before any shard was dialled.
    pub fn rejected(&self, reason: Rejection) {
        if let Some(c) = self.rejections.get(reason as usize) {
            c.increment(1);
        }
    }

    /// The counter of `reason`, for a caller without access to `LbMetrics`.
    pub fn rejection_counter(&self, reason: Rejection) -> Counter {
        self.rejections
            .get(reason as usize)
            .cloned()
            .unwrap_or_else(Counter::noop)
    }

    /// Counts what became of a client connection.
    pub fn client(&self, outcome: ClientOutcome) {
        if let Some(c) = self.outcomes.get(outcome as usize) {
            c.increment(1);
        }
    }

    /// The counter of `outcome`, for a caller without access to `LbMetrics`.
    pub fn outcome_counter(&self, outcome: ClientOutcome) -> Counter {
        self.outcomes
            .get(outcome as usize)
            .cloned()
            .unwrap_or_else(Counter::noop)
    }

    /// Counts an ended relay.
    pub fn relay_end(&self, end: RelayEnd) {
        if let Some(c) = self.relay_ends.get(end.index()) {
            c.increment(1);
        }
    }

    /// Counts a close frame the LB sent a client itself.
    pub fn lb_close(&self, code: u16) {
        if let Some((_, c)) = self.lb_closes.iter().find(|(c, _)| *c == code) {
            c.increment(1);
        }
    }

    /// Copies a pool snapshot into the per-shard gauges and the member counts.
    pub fn update(&self, snapshot: &[ShardSnapshot]) {
        let mut members = [0usize; 4];
        for s in snapshot {
            if let Some(m) = members.get_mut(s.member as usize) {
                *m += 1;
            }
            if let Some(h) = self.shards.get(s.shard_id) {
                h.score.set(s.score);
                h.utilization.set(s.utilization);
                h.recent_failures.set(s.recent_failures as f64);
                h.relays.set(s.relays as f64);
                h.set_state(s.breaker);
            }
        }
        for (g, n) in self.members.iter().zip(members) {
            g.set(n as f64);
        }
    }
}

/// The breaker transitions that can happen, in the order of
/// [`TransitionRecorder`]'s handles.
const TRANSITIONS: [(BreakerState, BreakerState); 4] = [
    (BreakerState::Closed, BreakerState::Open),
    (BreakerState::Open, BreakerState::HalfOpen),
    (BreakerState::HalfOpen, BreakerState::Closed),
    (BreakerState::HalfOpen, BreakerState::Open),
];

/// Turns breaker transitions into metrics and log lines. Transitions happen on a client's
/// handshake path, so their series are resolved when the shard takes its slot (and
/// registered at zero).
#[derive(Debug)]
pub struct TransitionRecorder {
    shards: std::sync::Arc<ShardTable>,
}

impl TransitionRecorder {
    /// Records into the handles of `shards`.
    pub fn new(shards: std::sync::Arc<ShardTable>) -> Self {
        Self { shards }
    }
}

impl PoolObserver for TransitionRecorder {
    fn transition(&self, shard: usize, t: Transition) {
        let Some(h) = self.shards.get(shard) else {
            return;
        };
        let counter = TRANSITIONS
            .iter()
            .position(|&(from, to)| (from, to) == (t.from, t.to))
            .and_then(|i| h.transitions.get(i));
        match counter {
            Some(c) => c.increment(1),
            // Not a transition the breaker makes today; still counted.
            None => metrics::counter!(
                BREAKER_TRANSITIONS,
                "shard_id" => shard.to_string(),
                "from" => t.from.as_str(),
                "to" => t.to.as_str()
            )
            .increment(1),
        }
        h.set_state(t.to);
        let url = h.url.lock().clone();
        tracing::info!(
            shard_id = shard,
            backend = url,
            from = t.from.as_str(),
            to = t.to.as_str(),
            "circuit breaker transition"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_enums_list_every_value_once_at_its_index() {
        for (i, r) in Rejection::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, o) in ClientOutcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
        for (i, e) in RelayEnd::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
        }
        // Distinct labels (dedup only drops adjacent repeats: sort first).
        fn distinct(mut labels: Vec<&str>) -> usize {
            labels.sort_unstable();
            labels.dedup();
            labels.len()
        }
        assert_eq!(
            distinct(Rejection::ALL.iter().map(|r| r.label()).collect()),
            Rejection::ALL.len()
        );
        assert_eq!(
            distinct(ClientOutcome::ALL.iter().map(|o| o.label()).collect()),
            ClientOutcome::ALL.len()
        );
        assert_eq!(
            distinct(RelayEnd::ALL.iter().map(|e| e.label()).collect()),
            RelayEnd::ALL.len()
        );
        for (i, r) in SourceError::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        assert_eq!(
            distinct(SourceError::ALL.iter().map(|r| r.label()).collect()),
            SourceError::ALL.len()
        );
        assert_eq!(
            Rejection::from(PacingRejection::WaitTooLong),
            Rejection::WaitTooLong
        );
    }
}
