//! Shard membership: which shards an LB may dial, and how a shard enters and leaves that
//! set while clients keep arriving.
//!
//! The pool ([`crate::pool::ShardPool`]) keeps one slot per shard URL, like HAProxy's
//! `server-template`: a shard keeps its slot (its index, `shard_id` in metrics, its breaker
//! and failure window) for as long as the process lives, unless the slot is needed for a new
//! URL after every slot has been used. A membership source (a file, DNS, the static list)
//! hands the pool the complete current list; the pool turns the difference into member
//! states:
//!
//! - **pending** — listed, not yet seen healthy: it gets no client until a `/health` poll
//!   answers ok (not draining);
//! - **warming** — admitted, within its slow start: its weight in the power-of-two-choices
//!   sample ramps linearly from [`MIN_WEIGHT`] to 1 over the slow-start window (Envoy's slow
//!   start with aggression 1), so an empty shard does not take every new client at once;
//! - **active** — admitted, full weight;
//! - **removed** — no longer listed: no new client is sent there, and nothing else happens.
//!   Clients already relayed to it keep running until the shard itself closes them (its
//!   drain on SIGTERM sends 1012 spread over the drain window); the LB never cuts a relay
//!   because a name disappeared.
//!
//! A shard that leaves and comes back within [`REJOIN_WINDOW`] (flapping DNS answers, a file
//! rewritten twice) returns as it was: same slot, breaker, failure window, admission and
//! ramp. After longer it must pass a health poll again (it may be a new VM that got the same
//! address), but keeps its slot and breaker history. A source that fails or returns an empty
//! list is not applied at all: the last good set stays (see ws-lb's `membership` module).

use std::time::Duration;

use tokio::time::Instant;

/// Weight of a shard at the very start of its slow start, as a fraction of a full member's
/// (Envoy's `min_weight_percent` default, 10 %).
pub const MIN_WEIGHT: f64 = 0.1;

/// A shard that leaves and rejoins within this time keeps its admission and ramp.
pub const REJOIN_WINDOW: Duration = Duration::from_secs(60);

/// A shard's place in the membership (`ws_lb_members`, label `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Listed, waiting for a healthy `/health` answer.
    Pending,
    /// Admitted, in slow start.
    Warming,
    /// Admitted, full weight.
    Active,
    /// No longer listed: no new clients; existing relays continue.
    Removed,
}

impl MemberState {
    /// Every state, in index order.
    pub const ALL: [MemberState; 4] = [Self::Pending, Self::Warming, Self::Active, Self::Removed];

    /// The `state` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Warming => "warming",
            Self::Active => "active",
            Self::Removed => "removed",
        }
    }

    /// Whether new clients may be sent to a shard in this state.
    pub fn takes_clients(self) -> bool {
        matches!(self, Self::Warming | Self::Active)
    }
}

/// The selection weight of a shard admitted at `ramp_from` (`None`: no slow start, e.g. the
/// members the process started with), `now`, for a slow start of `window`.
pub fn slow_start_weight(ramp_from: Option<Instant>, now: Instant, window: Duration) -> f64 {
    let Some(from) = ramp_from else { return 1.0 };
    if window.is_zero() {
        return 1.0;
    }
    let f = now.saturating_duration_since(from).as_secs_f64() / window.as_secs_f64();
    if f >= 1.0 {
        1.0
    } else {
        f.max(MIN_WEIGHT)
    }
}

/// What one membership update changed (slot indexes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    /// New URLs, in a fresh (or reused) slot, pending.
    pub added: Vec<usize>,
    /// URLs that were removed before and are listed again.
    pub rejoined: Vec<usize>,
    /// URLs no longer listed.
    pub removed: Vec<usize>,
}

impl Update {
    /// Whether the set of listed shards changed.
    pub fn changed(&self) -> bool {
        !(self.added.is_empty() && self.rejoined.is_empty() && self.removed.is_empty())
    }
}

/// Why a member list was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// No member at all: never applied, an empty pool would refuse every client.
    #[error("the member list is empty")]
    Empty,
    /// More members than slots.
    #[error("{0} members: a pool holds at most {max}", max = crate::retry::MAX_SHARDS)]
    TooMany(usize),
    /// A line that is not a member.
    #[error("line {line}: {problem}")]
    BadLine { line: usize, problem: String },
}

/// Parses a membership file: one shard URL per line; blank lines and `#` comments are
/// ignored; duplicates are dropped (the first wins). The URLs themselves are checked by the
/// caller, which knows how to dial them.
pub fn parse_list(text: &str) -> Result<Vec<String>, ListError> {
    let mut out: Vec<String> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        if line.split_whitespace().nth(1).is_some() {
            return Err(ListError::BadLine {
                line: n + 1,
                problem: "one URL per line".into(),
            });
        }
        if !out.iter().any(|u| u == line) {
            out.push(line.to_owned());
        }
    }
    check_len(out)
}

/// Checks a member list's size (1 to `MAX_SHARDS`).
pub fn check_len(list: Vec<String>) -> Result<Vec<String>, ListError> {
    match list.len() {
        0 => Err(ListError::Empty),
        n if n > crate::retry::MAX_SHARDS => Err(ListError::TooMany(n)),
        _ => Ok(list),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn slow_start_ramps_linearly_from_the_floor_to_one() {
        let t0 = Instant::now();
        let w = Duration::from_secs(30);
        assert_eq!(slow_start_weight(None, t0, w), 1.0);
        assert_eq!(slow_start_weight(Some(t0), t0, w), MIN_WEIGHT);
        let half = slow_start_weight(Some(t0), t0 + Duration::from_secs(15), w);
        assert!((half - 0.5).abs() < 1e-9, "{half}");
        assert_eq!(slow_start_weight(Some(t0), t0 + w, w), 1.0);
        assert_eq!(slow_start_weight(Some(t0), t0, Duration::ZERO), 1.0);
    }

    #[test]
    fn member_files_parse_with_comments_blanks_and_duplicates() {
        let text = "# shards\nws://10.0.0.1:3002/ws\n\n  ws://10.0.0.2:3002/ws  # b\nws://10.0.0.1:3002/ws\n";
        assert_eq!(
            parse_list(text).unwrap(),
            vec!["ws://10.0.0.1:3002/ws", "ws://10.0.0.2:3002/ws"]
        );
        assert_eq!(parse_list("# nothing\n\n"), Err(ListError::Empty));
        assert_eq!(parse_list(""), Err(ListError::Empty));
        assert!(matches!(
            parse_list("ws://a:1/ws ws://b:1/ws"),
            Err(ListError::BadLine { line: 1, .. })
        ));
        let many: String = (0..129).map(|i| format!("ws://h{i}:1/ws\n")).collect();
        assert_eq!(parse_list(&many), Err(ListError::TooMany(129)));
    }

    #[test]
    fn labels_are_distinct_and_in_index_order() {
        for (i, s) in MemberState::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
        let mut labels: Vec<_> = MemberState::ALL.iter().map(|s| s.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), MemberState::ALL.len());
        assert!(MemberState::Warming.takes_clients() && !MemberState::Pending.takes_clients());
    }
}
