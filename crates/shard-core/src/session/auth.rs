//! A session's identity: the verified token (if any), when it expires on the session's
//! clock, and the checks made with it at every subscribe, `auth` and `refresh`.
//!
//! The shard verifies every token itself with the same keys as ws-lb (the `Authorization`
//! header ws-lb forwards, `?token=` or an `auth` message from a direct client): nothing that
//! crosses the tier boundary is trusted without a signature check.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use auth::{AuthFailure, Identity, Verifier};
use tokio::time::Instant;

/// How a session starts, decided at the upgrade.
#[derive(Debug, Clone)]
pub enum Admission {
    /// No token: public channels only (an `auth` message may still come).
    Anonymous,
    /// A verified token (boxed: every session future holds an `Admission`, most of them
    /// anonymous).
    Authenticated(Box<Identity>),
    /// A token that failed: the session closes with 4001 at once.
    Refused(AuthFailure),
}

impl Admission {
    /// Checks the token presented with the upgrade (if any); the verified-token cache
    /// lookup it made is counted in `metrics`.
    pub fn of(
        verifier: &Verifier,
        metrics: &crate::metrics::ShardMetrics,
        token: Option<&str>,
    ) -> Self {
        if !verifier.enabled() {
            return Self::Anonymous;
        }
        match token {
            None => Self::Anonymous,
            Some(t) => {
                let (r, lookup) = verifier.verify_traced(t);
                metrics.auth_lookup(lookup);
                match r {
                    Ok(id) => Self::Authenticated(Box::new(id)),
                    Err(f) => Self::Refused(f),
                }
            }
        }
    }
}

/// What an `auth` or `refresh` message led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenOutcome {
    /// Authentication is off: nothing to do, nothing to answer.
    Ignored,
    /// The first token of an anonymous session was accepted (no reply).
    Authenticated,
    /// A new token for the same subject: reply `refreshed` with this `exp`.
    Refreshed { exp: u64 },
    /// An anonymous session's `auth` failed: close with 4001.
    Unauthorized(AuthFailure),
    /// A refresh failed: reply `invalid_token`; the current token stays until it expires.
    RefreshRefused(AuthFailure),
}

#[derive(Debug)]
pub(crate) struct SessionAuth {
    verifier: Arc<Verifier>,
    /// Boxed to keep anonymous sessions (and every session future) small.
    identity: Option<Box<Identity>>,
    expires_at: Option<Instant>,
}

impl SessionAuth {
    pub(crate) fn new(verifier: Arc<Verifier>, admission: &Admission, now: Instant) -> Self {
        let identity = match admission {
            Admission::Authenticated(id) => Some(id.clone()),
            Admission::Anonymous | Admission::Refused(_) => None,
        };
        let expires_at = identity.as_ref().map(|id| instant_of(id.exp, now));
        Self {
            verifier,
            identity,
            expires_at,
        }
    }

    /// When the token expires (the session closes with 4002 then).
    pub(crate) fn expires_at(&self) -> Option<Instant> {
        self.expires_at
    }

    pub(crate) fn may_subscribe(&self, channel: &str) -> bool {
        self.verifier
            .may_subscribe(self.identity.as_deref(), channel)
    }

    /// Handles `{"type":"auth"}` or `{"type":"refresh"}` with `token`.
    pub(crate) fn on_token(&mut self, token: &str, now: Instant) -> TokenOutcome {
        if !self.verifier.enabled() {
            return TokenOutcome::Ignored;
        }
        match &self.identity {
            None => match self.verifier.verify(token) {
                Ok(id) => {
                    self.expires_at = Some(instant_of(id.exp, now));
                    self.identity = Some(Box::new(id));
                    TokenOutcome::Authenticated
                }
                Err(f) => TokenOutcome::Unauthorized(f),
            },
            Some(current) => match self.verifier.verify_refresh(token, &current.sub) {
                Ok(id) => {
                    let exp = id.exp;
                    self.expires_at = Some(instant_of(exp, now));
                    self.identity = Some(Box::new(id));
                    TokenOutcome::Refreshed { exp }
                }
                Err(f) => TokenOutcome::RefreshRefused(f),
            },
        }
    }

    /// Whether a refresh arrived on an anonymous session (there is nothing to refresh).
    pub(crate) fn is_anonymous(&self) -> bool {
        self.identity.is_none()
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.verifier.enabled()
    }
}

/// `exp` (Unix seconds) on the session's clock, measured from `now`.
fn instant_of(exp: u64, now: Instant) -> Instant {
    let unix_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let left = Duration::from_secs(exp).saturating_sub(unix_now);
    now + left
}
