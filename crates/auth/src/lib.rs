//! Who a connection belongs to and which channels it may read: JWT verification shared by
//! ws-lb (at the edge, before any shard is dialled) and ws-shard (again, at the upgrade, and
//! at every subscribe and refresh).
//!
//! Keys come from files named in [`AuthConfig`]: an HS256 secret file (one secret per line, so
//! a rotation can list the old and the new secret) and/or a JWKS file of RS256 / ES256 public
//! keys. [`Verifier::reload_if_changed`] re-reads them when their modification time changes;
//! a file that cannot be read or parsed then leaves the last good key set in place. At start,
//! [`Verifier::new`] refuses a configured file that is missing or invalid.
//!
//! The algorithm a token claims selects the key *family* before anything else: an HS256 token
//! is only ever checked against the HS256 secrets and an RS256/ES256 token only against JWKS
//! keys of that type, so an RSA public key can never be used as an HMAC secret (algorithm
//! confusion), and `alg: none` is refused by name. Authentication is off when no key file is
//! configured ([`AuthConfig::enabled`]); then every channel is public.

mod keys;
mod patterns;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use parking_lot::RwLock;
use serde::Deserialize;

pub use keys::{KeyError, KeySet};
pub use patterns::{ChannelPatterns, InvalidPattern, MAX_PATTERNS, MAX_PATTERN_LEN};

/// Default longest token accepted (bytes). Longer ones are refused before any parsing.
pub const DEFAULT_MAX_TOKEN_LEN: usize = 8 * 1024;

/// Authentication settings, as both binaries take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// HS256 secrets, one per line (at least 32 bytes each).
    pub hs256_secret_file: Option<PathBuf>,
    /// A JWKS document (`{"keys":[...]}`) with RSA (RS256) and P-256 (ES256) public keys.
    pub jwks_file: Option<PathBuf>,
    /// Required `aud` value; `None` accepts only tokens without `aud`.
    pub audience: Option<String>,
    /// Required `iss` value; `None` does not check `iss`.
    pub issuer: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// Longest token accepted, in bytes.
    pub max_token_len: usize,
    /// Channels anyone may subscribe to without a token. `None` means the default: every
    /// channel when authentication is off, none when it is on.
    pub public_channels: Option<String>,
    /// How often the key files' modification times are checked.
    pub reload_interval: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs256_secret_file: None,
            jwks_file: None,
            audience: None,
            issuer: None,
            leeway: Duration::from_secs(5),
            max_token_len: DEFAULT_MAX_TOKEN_LEN,
            public_channels: None,
            reload_interval: Duration::from_secs(2),
        }
    }
}

impl AuthConfig {
    /// Builds the config from the binaries' flat settings, where an empty string means
    /// "not set" and `public_channels = "auto"` means the default for the mode.
    #[allow(clippy::too_many_arguments)]
    pub fn from_settings(
        hs256_secret_file: &str,
        jwks_file: &str,
        audience: &str,
        issuer: &str,
        leeway: Duration,
        max_token_len: usize,
        public_channels: &str,
        reload_interval: Duration,
    ) -> Self {
        let set = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_owned());
        Self {
            hs256_secret_file: set(hs256_secret_file).map(PathBuf::from),
            jwks_file: set(jwks_file).map(PathBuf::from),
            audience: set(audience),
            issuer: set(issuer),
            leeway,
            max_token_len,
            public_channels: (public_channels.trim() != "auto").then(|| public_channels.to_owned()),
            reload_interval,
        }
    }

    /// Whether any key is configured; without one, authentication is off.
    pub fn enabled(&self) -> bool {
        self.hs256_secret_file.is_some() || self.jwks_file.is_some()
    }
}

/// Why a token was refused. Each variant is one label value of the auth-failure metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthFailure {
    /// No token where one is required (private channel, or no public channels at all).
    Missing,
    /// Longer than `max_token_len`; not parsed.
    TooLong,
    /// Not a JWT, undecodable header or claims, or claims of the wrong shape.
    Malformed,
    /// `alg: none` (an unsigned token).
    AlgNone,
    /// An algorithm no configured key serves, or a key whose type does not match the
    /// algorithm (e.g. HS256 against an RSA public key).
    Algorithm,
    /// The signature matches no configured key.
    Signature,
    /// `exp` has passed.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `aud` does not match the configured audience.
    Audience,
    /// `iss` does not match the configured issuer.
    Issuer,
    /// A refresh carried a token for another subject.
    SubjectChanged,
    /// The first message (auth) did not arrive in time, or was not an auth message.
    NoAuthMessage,
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for AuthFailure {}

impl AuthFailure {
    /// The close reason or error message sent to the client (short: a close reason has at
    /// most 123 bytes). It names the check that failed, never key material or claims.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "token required",
            Self::TooLong => "token too long",
            Self::Malformed => "malformed token",
            Self::AlgNone => "unsigned token (alg none) refused",
            Self::Algorithm => "token algorithm or key not accepted",
            Self::Signature => "invalid token signature",
            Self::Expired => "token expired",
            Self::NotYetValid => "token not yet valid",
            Self::Audience => "wrong token audience",
            Self::Issuer => "wrong token issuer",
            Self::SubjectChanged => "refresh token is for another subject",
            Self::NoAuthMessage => "no auth message",
        }
    }

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::TooLong => "too_long",
            Self::Malformed => "malformed",
            Self::AlgNone => "alg_none",
            Self::Algorithm => "algorithm",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Audience => "audience",
            Self::Issuer => "issuer",
            Self::SubjectChanged => "subject_changed",
            Self::NoAuthMessage => "no_auth_message",
        }
    }

    /// Every value, registered once per metric.
    pub const ALL: [AuthFailure; 12] = [
        Self::Missing,
        Self::TooLong,
        Self::Malformed,
        Self::AlgNone,
        Self::Algorithm,
        Self::Signature,
        Self::Expired,
        Self::NotYetValid,
        Self::Audience,
        Self::Issuer,
        Self::SubjectChanged,
        Self::NoAuthMessage,
    ];

    /// Index into [`Self::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

/// A verified token: who, until when, and which channels beyond the public ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub sub: String,
    /// Seconds since the Unix epoch.
    pub exp: u64,
    pub channels: ChannelPatterns,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    channels: Vec<String>,
}

/// Verifies tokens against the current key set; cheap to share (`Arc`).
#[derive(Debug)]
pub struct Verifier {
    cfg: AuthConfig,
    keys: RwLock<Arc<KeySet>>,
    public: ChannelPatterns,
}

/// A configuration the verifier cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("public channels: {0}")]
    Public(#[from] InvalidPattern),
    #[error("max_token_len must be positive")]
    MaxTokenLen,
}

impl Verifier {
    /// Loads the configured key files; a missing or invalid one is an error (refuse to start).
    pub fn new(cfg: AuthConfig) -> Result<Self, StartError> {
        if cfg.max_token_len == 0 {
            return Err(StartError::MaxTokenLen);
        }
        let public = match (&cfg.public_channels, cfg.enabled()) {
            (Some(list), _) => ChannelPatterns::parse_list(list)?,
            (None, false) => ChannelPatterns::any(),
            (None, true) => ChannelPatterns::none(),
        };
        let keys = KeySet::load(cfg.hs256_secret_file.as_deref(), cfg.jwks_file.as_deref())?;
        Ok(Self {
            keys: RwLock::new(Arc::new(keys)),
            public,
            cfg,
        })
    }

    /// Whether tokens are checked at all.
    pub fn enabled(&self) -> bool {
        self.cfg.enabled()
    }

    /// The settings this verifier was built from.
    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    /// Channels that need no token.
    pub fn public_channels(&self) -> &ChannelPatterns {
        &self.public
    }

    /// Whether some channel is public, i.e. a connection without a token is useful.
    pub fn allows_anonymous(&self) -> bool {
        !self.public.is_empty()
    }

    /// Whether `identity` (or an anonymous connection, `None`) may subscribe to `channel`.
    pub fn may_subscribe(&self, identity: Option<&Identity>, channel: &str) -> bool {
        self.public.allows(channel) || identity.is_some_and(|i| i.channels.allows(channel))
    }

    /// Re-reads the key files if one of them changed. `Ok(true)` when a new key set is in
    /// use; on error the previous key set stays.
    pub fn reload_if_changed(&self) -> Result<bool, KeyError> {
        let current = self.keys.read().clone();
        let Some(next) = current.reload_if_changed(
            self.cfg.hs256_secret_file.as_deref(),
            self.cfg.jwks_file.as_deref(),
        )?
        else {
            return Ok(false);
        };
        *self.keys.write() = Arc::new(next);
        Ok(true)
    }

    /// Verifies `token` now.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        if token.len() > self.cfg.max_token_len {
            return Err(AuthFailure::TooLong);
        }
        let (alg, kid) = header(token)?;
        let keys = self.keys.read().clone();
        let candidates = keys.candidates(alg, kid.as_deref());
        if candidates.is_empty() {
            return Err(AuthFailure::Algorithm);
        }
        let mut validation = Validation::new(alg);
        validation.leeway = self.cfg.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &self.cfg.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            // Tokens meant for some other service (with an `aud`) are not accepted here.
            None => validation.aud = None,
        }
        if let Some(iss) = &self.cfg.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        let mut last = AuthFailure::Signature;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, key, &validation) {
                Ok(data) => return identity(data.claims),
                Err(e) => {
                    last = classify(e.kind());
                    // Only a signature mismatch can be cured by another key.
                    if last != AuthFailure::Signature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    /// Verifies a refresh: a valid token for the same subject.
    pub fn verify_refresh(&self, token: &str, current_sub: &str) -> Result<Identity, AuthFailure> {
        let id = self.verify(token)?;
        if id.sub != current_sub {
            return Err(AuthFailure::SubjectChanged);
        }
        Ok(id)
    }
}

fn identity(c: Claims) -> Result<Identity, AuthFailure> {
    if c.sub.is_empty() || c.sub.len() > 256 {
        return Err(AuthFailure::Malformed);
    }
    let channels = ChannelPatterns::parse(&c.channels).map_err(|_| AuthFailure::Malformed)?;
    Ok(Identity {
        sub: c.sub,
        exp: c.exp,
        channels,
    })
}

/// The header's `alg`, with `none` (in any case) told apart from garbage, and its `kid`.
fn header(token: &str) -> Result<(Algorithm, Option<String>), AuthFailure> {
    #[derive(Deserialize)]
    struct RawHeader {
        alg: String,
        kid: Option<String>,
    }
    let header_b64 = token.split('.').next().unwrap_or("");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header_b64.trim_end_matches('='))
        .map_err(|_| AuthFailure::Malformed)?;
    let raw: RawHeader = serde_json::from_slice(&bytes).map_err(|_| AuthFailure::Malformed)?;
    if raw.alg.eq_ignore_ascii_case("none") {
        return Err(AuthFailure::AlgNone);
    }
    if token.split('.').count() != 3 {
        return Err(AuthFailure::Malformed);
    }
    let alg = match raw.alg.as_str() {
        "HS256" => Algorithm::HS256,
        "RS256" => Algorithm::RS256,
        "ES256" => Algorithm::ES256,
        _ => return Err(AuthFailure::Algorithm),
    };
    Ok((alg, raw.kid))
}

fn classify(kind: &ErrorKind) -> AuthFailure {
    match kind {
        ErrorKind::InvalidSignature | ErrorKind::Crypto(_) => AuthFailure::Signature,
        ErrorKind::ExpiredSignature => AuthFailure::Expired,
        ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
        ErrorKind::InvalidAudience => AuthFailure::Audience,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthFailure::Audience,
        ErrorKind::InvalidIssuer => AuthFailure::Issuer,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthFailure::Issuer,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthFailure::Algorithm,
        _ => AuthFailure::Malformed,
    }
}

#[cfg(test)]
mod tests;
