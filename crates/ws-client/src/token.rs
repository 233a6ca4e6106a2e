//! Tokens: the provider the application gives the client, and the expiry read from a JWT
//! without verifying it (the client only needs to know when to ask for a new one; the server
//! verifies).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// Why the provider is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenReason {
    /// First connection.
    Connect,
    /// The current token nears its `exp`; the new one is sent on the open connection.
    Refresh,
    /// The server closed with 4002 (token expired).
    Expired,
    /// The server closed with 4001 (token refused).
    Unauthorized,
}

/// What a provider returns: a token, none (connect without one), or why it could not.
pub type TokenResult = Result<Option<String>, Box<dyn std::error::Error + Send + Sync>>;

/// The future a provider returns.
pub type TokenFuture = Pin<Box<dyn Future<Output = TokenResult> + Send>>;

/// Supplies tokens. Implemented for every `Fn(TokenReason) -> impl Future<Output = TokenResult>`.
pub trait TokenProvider: Send + Sync + 'static {
    /// A token to use from now on.
    fn token(&self, reason: TokenReason) -> TokenFuture;
}

impl<F, Fut> TokenProvider for F
where
    F: Fn(TokenReason) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = TokenResult> + Send + 'static,
{
    fn token(&self, reason: TokenReason) -> TokenFuture {
        Box::pin(self(reason))
    }
}

/// Where the token goes on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenTransport {
    /// `?token=` on the upgrade request (what a browser can do).
    #[default]
    Query,
    /// A first message `{"type":"auth","token":"..."}`.
    Message,
}

/// The times of a JWT, as durations since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenTimes {
    pub exp: Duration,
    pub iat: Option<Duration>,
}

/// `exp` and `iat` of a JWT; `None` when it is not a JWT or has no numeric `exp`.
pub fn token_times(token: &str) -> Option<TokenTimes> {
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let secs = |v: &serde_json::Value| {
        v.as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64)
    };
    Some(TokenTimes {
        exp: secs(claims.get("exp")?)?,
        iat: claims.get("iat").and_then(secs),
    })
}

/// How long from `now` until the refresh: `margin` before expiry, but not before half-way
/// through the token's life, and not in the past.
pub fn refresh_in(t: TokenTimes, now: Duration, margin: Duration) -> Duration {
    let mut at = t.exp.saturating_sub(margin);
    if let Some(iat) = t.iat.filter(|i| *i < t.exp) {
        at = at.max(iat + (t.exp - iat) / 2);
    }
    at.saturating_sub(now)
}

/// Time since the Unix epoch (token claims are wall-clock times).
pub fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            e.encode(br#"{"alg":"HS256"}"#),
            e.encode(claims)
        )
    }

    #[test]
    fn reads_exp_and_iat() {
        assert_eq!(token_times("opaque"), None);
        assert_eq!(token_times("a.b.c.d"), None);
        assert_eq!(token_times(&jwt(r#"{"sub":"x"}"#)), None);
        assert_eq!(
            token_times(&jwt(r#"{"exp":100,"iat":40}"#)),
            Some(TokenTimes {
                exp: Duration::from_secs(100),
                iat: Some(Duration::from_secs(40))
            })
        );
    }

    #[test]
    fn refresh_honours_margin_and_half_life() {
        let s = Duration::from_secs;
        let t = |exp, iat| TokenTimes {
            exp: s(exp),
            iat: Some(s(iat)),
        };
        assert_eq!(refresh_in(t(60, 0), s(0), s(30)), s(30));
        assert_eq!(refresh_in(t(20, 0), s(0), s(30)), s(10));
        assert_eq!(refresh_in(t(20, 0), s(15), s(30)), s(0));
    }
}
