//! What the client does after a connection ends, per close code, and how long it waits.
//!
//! The same rules as the TypeScript client (`clients/js/src/policy.ts`), documented in
//! `docs/clients.md` ("Reconnecting"). Pure functions: the driver feeds them a code and a
//! count and gets an action and a delay back.

use std::time::Duration;

/// Reconnect timing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reconnect {
    /// Base of the backoff, and the window a prompt reconnect is spread over (500 ms).
    pub min_delay: Duration,
    /// Cap of every backoff (20 s, as centrifuge-js: a client is back at most ~20 s after
    /// its server is).
    pub max_delay: Duration,
    /// Base of the backoff after an overload close, 1013 or 4003 (2 s).
    pub overload_delay: Duration,
    /// Growth per consecutive failed attempt (2).
    pub factor: f64,
    /// Fraction of each backoff taken off at random, 0 to 1 (0.5).
    pub jitter: f64,
    /// Consecutive 4001 closes after which the client stops and reports (3).
    pub max_auth_failures: u32,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(20),
            overload_delay: Duration::from_secs(2),
            factor: 2.0,
            jitter: 0.5,
            max_auth_failures: 3,
        }
    }
}

/// A reconnect setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid reconnect settings: {0}")]
pub struct InvalidReconnect(&'static str);

impl Reconnect {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), InvalidReconnect> {
        if self.max_delay < self.min_delay {
            return Err(InvalidReconnect("max_delay below min_delay"));
        }
        if !(self.factor >= 1.0 && self.factor.is_finite()) {
            return Err(InvalidReconnect("factor must be >= 1"));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(InvalidReconnect("jitter must be in [0, 1]"));
        }
        Ok(())
    }
}

/// How a close is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseAction {
    /// The connection ended for a reason that is not the client's: reconnect soon.
    Reconnect,
    /// The server is overloaded (1013, 4003): exponential backoff from `overload_delay`.
    Overload,
    /// The token was refused (4001): fresh token, backoff, give up after `max_auth_failures`.
    Unauthorized,
    /// The token expired (4002): fresh token, reconnect soon.
    Expired,
    /// The client broke the protocol or a limit (1002, 1003, 1007-1010): no retry.
    Fatal,
}

/// The action for a close code (1006: the connection was lost without a close frame).
pub fn close_action(code: u16) -> CloseAction {
    match code {
        1002 | 1003 | 1007..=1010 => CloseAction::Fatal,
        1013 | 4003 => CloseAction::Overload,
        4001 => CloseAction::Unauthorized,
        4002 => CloseAction::Expired,
        // 1000 (unasked), 1001, 1005, 1006, 1011, 1012, 4000 and codes this client does not
        // know: the path or the server went away; the position makes reconnecting safe.
        _ => CloseAction::Reconnect,
    }
}

/// Delay before the next attempt. `failures` counts consecutive attempts that ended before a
/// shard answered (this one included); 0 means the connection that just ended was healthy.
/// `r` is a random number in [0, 1).
pub fn reconnect_delay(action: CloseAction, failures: u32, o: &Reconnect, r: f64) -> Duration {
    let r = r.clamp(0.0, 1.0);
    if failures == 0 && matches!(action, CloseAction::Reconnect | CloseAction::Expired) {
        // A healthy connection ended: come back at once, spread over min_delay so that the
        // clients of a lost shard do not all arrive in the same millisecond.
        return o.min_delay.mul_f64(r);
    }
    let (_, hi) = bounds(action, failures, o);
    hi.mul_f64(1.0 - o.jitter * r)
}

/// The range [`reconnect_delay`] draws from.
pub fn bounds(action: CloseAction, failures: u32, o: &Reconnect) -> (Duration, Duration) {
    if failures == 0 && matches!(action, CloseAction::Reconnect | CloseAction::Expired) {
        return (Duration::ZERO, o.min_delay);
    }
    let base = if action == CloseAction::Overload {
        o.overload_delay
    } else {
        o.min_delay
    };
    let n = failures.max(1) - 1;
    let grown = base.as_secs_f64() * o.factor.powi(i32::try_from(n.min(64)).unwrap_or(64));
    let ceiling = Duration::from_secs_f64(grown.min(o.max_delay.as_secs_f64()));
    (ceiling.mul_f64(1.0 - o.jitter), ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(d: Duration) -> u128 {
        d.as_millis()
    }

    #[test]
    fn codes_map_to_the_documented_actions() {
        for c in [1002, 1003, 1007, 1008, 1009, 1010] {
            assert_eq!(close_action(c), CloseAction::Fatal, "{c}");
        }
        for c in [1000, 1001, 1005, 1006, 1011, 1012, 4000, 4999] {
            assert_eq!(close_action(c), CloseAction::Reconnect, "{c}");
        }
        assert_eq!(close_action(1013), CloseAction::Overload);
        assert_eq!(close_action(4003), CloseAction::Overload);
        assert_eq!(close_action(4001), CloseAction::Unauthorized);
        assert_eq!(close_action(4002), CloseAction::Expired);
    }

    #[test]
    fn backoff_grows_to_the_cap_within_its_jitter() {
        let o = Reconnect::default();
        let seq: Vec<_> = (1..=8)
            .map(|n| ms(reconnect_delay(CloseAction::Overload, n, &o, 0.0)))
            .collect();
        assert_eq!(seq, [2000, 4000, 8000, 16000, 20000, 20000, 20000, 20000]);
        let lost: Vec<_> = (1..=4)
            .map(|n| ms(reconnect_delay(CloseAction::Reconnect, n, &o, 0.0)))
            .collect();
        assert_eq!(lost, [500, 1000, 2000, 4000]);
        assert_eq!(ms(reconnect_delay(CloseAction::Overload, 2, &o, 1.0)), 2000);
        assert_eq!(
            ms(reconnect_delay(CloseAction::Reconnect, 0, &o, 0.5)),
            250,
            "prompt reconnect spread over min_delay"
        );
        assert_eq!(
            bounds(CloseAction::Overload, 100, &o),
            (Duration::from_secs(10), Duration::from_secs(20))
        );
    }

    #[test]
    fn invalid_settings_are_refused() {
        let bad = Reconnect {
            jitter: 2.0,
            ..Reconnect::default()
        };
        assert!(bad.validate().is_err());
        assert!(Reconnect::default().validate().is_ok());
    }
}
