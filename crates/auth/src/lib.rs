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

mod cache;
mod keys;
mod patterns;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use parking_lot::RwLock;
use serde::Deserialize;

pub use keys::{KeyError, KeySet};
pub use patterns::{ChannelPatterns, InvalidPattern, MAX_PATTERNS, MAX_PATTERN_LEN};

/// Default longest token accepted (bytes). Longer ones are refused before any parsing.
pub const DEFAULT_MAX_TOKEN_LEN: usize = 8 * 1024;
/// Default bound of the verified-token cache, in entries.
pub const DEFAULT_CACHE_ENTRIES: usize = 65_536;
/// Default bound of the verified-token cache, in bytes.
pub const DEFAULT_CACHE_BYTES: usize = 32 * 1024 * 1024;

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
    /// Most tokens kept in the verified-token cache (0: no cache).
    pub cache_entries: usize,
    /// Most bytes the verified-token cache holds (0: no cache).
    pub cache_bytes: usize,
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
            cache_entries: DEFAULT_CACHE_ENTRIES,
            cache_bytes: DEFAULT_CACHE_BYTES,
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
            ..Self::default()
        }
    }

    /// The same config with the verified-token cache bounded by `entries` and `bytes`
    /// (either 0: no cache).
    pub fn with_cache(self, entries: usize, bytes: usize) -> Self {
        Self {
            cache_entries: entries,
            cache_bytes: bytes,
            ..self
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
    /// Read the way jsonwebtoken's validation reads it (a number; anything else is not
    /// checked there, so it is not checked on a cache hit either).
    #[serde(default)]
    nbf: Option<serde_json::Value>,
    /// `aud` and `iss` as jsonwebtoken's validation reads them: a string or an array of
    /// strings; any other value counts as absent there, and so it does here.
    #[serde(default)]
    aud: Option<serde_json::Value>,
    #[serde(default)]
    iss: Option<serde_json::Value>,
    #[serde(default)]
    channels: Vec<String>,
}

/// A key set and the cache of the tokens verified with it: replaced together on a reload,
/// so a cached result never outlives the keys that produced it.
#[derive(Debug)]
struct Epoch {
    keys: KeySet,
    cache: cache::TokenCache,
}

/// Verified-token cache counters (since start, over every key set).
#[derive(Debug, Default)]
struct CacheCounters {
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Where a verification's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The token was in the verified-token cache: only the time, audience and issuer were
    /// checked again.
    Hit,
    /// Not in the cache: verified in full (and cached if it passed).
    Miss,
    /// The cache was not consulted (no cache, or a token refused before any parsing).
    None,
}

impl Lookup {
    /// The metric label value (`None` is not counted).
    pub fn label(self) -> Option<&'static str> {
        match self {
            Self::Hit => Some("hit"),
            Self::Miss => Some("miss"),
            Self::None => None,
        }
    }
}

/// What the verified-token cache did so far (for the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Tokens found in the cache (then checked against the time, audience and issuer only).
    pub hits: u64,
    /// Tokens not found: verified in full (the successful ones were then cached).
    pub misses: u64,
    /// Entries held now.
    pub entries: usize,
    /// Bytes held now (approximate, from above).
    pub bytes: usize,
}

/// The jsonwebtoken validation of one algorithm, built once.
#[derive(Debug)]
struct Validations {
    hs256: Validation,
    rs256: Validation,
    es256: Validation,
}

impl Validations {
    fn new(cfg: &AuthConfig) -> Self {
        let make = |alg| {
            let mut validation = Validation::new(alg);
            validation.leeway = cfg.leeway.as_secs();
            validation.validate_nbf = true;
            validation.set_required_spec_claims(&["exp", "sub"]);
            match &cfg.audience {
                Some(aud) => {
                    validation.set_audience(&[aud]);
                    validation.required_spec_claims.insert("aud".into());
                }
                // Tokens meant for some other service (with an `aud`) are not accepted here.
                None => validation.aud = None,
            }
            if let Some(iss) = &cfg.issuer {
                validation.set_issuer(&[iss]);
                validation.required_spec_claims.insert("iss".into());
            }
            validation
        };
        Self {
            hs256: make(Algorithm::HS256),
            rs256: make(Algorithm::RS256),
            es256: make(Algorithm::ES256),
        }
    }

    fn of(&self, alg: Algorithm) -> &Validation {
        match alg {
            Algorithm::RS256 => &self.rs256,
            Algorithm::ES256 => &self.es256,
            _ => &self.hs256,
        }
    }
}

/// Verifies tokens against the current key set; cheap to share (`Arc`).
#[derive(Debug)]
pub struct Verifier {
    cfg: AuthConfig,
    keys: RwLock<Arc<Epoch>>,
    public: ChannelPatterns,
    validations: Validations,
    counters: CacheCounters,
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
            keys: RwLock::new(Arc::new(Self::epoch(&cfg, keys))),
            public,
            validations: Validations::new(&cfg),
            counters: CacheCounters::default(),
            cfg,
        })
    }

    fn epoch(cfg: &AuthConfig, keys: KeySet) -> Epoch {
        Epoch {
            keys,
            cache: cache::TokenCache::new(cfg.cache_entries, cfg.cache_bytes),
        }
    }

    /// The verified-token cache's counters and size.
    pub fn cache_stats(&self) -> CacheStats {
        let (entries, bytes) = self.keys.read().cache.usage();
        CacheStats {
            hits: self.counters.hits.load(Ordering::Relaxed),
            misses: self.counters.misses.load(Ordering::Relaxed),
            entries,
            bytes,
        }
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
    /// The verified-token cache starts empty with the new keys: a token verified with a
    /// key that is gone (or a secret that changed) is verified again in full.
    pub fn reload_if_changed(&self) -> Result<bool, KeyError> {
        let current = self.keys.read().clone();
        let Some(next) = current.keys.reload_if_changed(
            self.cfg.hs256_secret_file.as_deref(),
            self.cfg.jwks_file.as_deref(),
        )?
        else {
            return Ok(false);
        };
        *self.keys.write() = Arc::new(Self::epoch(&self.cfg, next));
        Ok(true)
    }

    /// Verifies `token` now: from the verified-token cache when this token was verified
    /// before with the current keys (then only `exp`, `nbf`, `aud` and `iss` are checked
    /// again), else in full (and cached when it passes).
    pub fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        self.verify_at(token, unix_now()).0
    }

    /// [`Self::verify`], and whether the answer came from the cache (for the metrics).
    pub fn verify_traced(&self, token: &str) -> (Result<Identity, AuthFailure>, Lookup) {
        self.verify_at(token, unix_now())
    }

    /// [`Self::verify`] with a cache hit checked at `now` (Unix seconds; a full verification
    /// uses the clock).
    fn verify_at(&self, token: &str, now: u64) -> (Result<Identity, AuthFailure>, Lookup) {
        if token.len() > self.cfg.max_token_len {
            return (Err(AuthFailure::TooLong), Lookup::None);
        }
        let epoch = self.keys.read().clone();
        if !epoch.cache.enabled() {
            let r = self.verify_full(&epoch.keys, token).map(|v| v.identity);
            return (r, Lookup::None);
        }
        let key = cache::key_of(token);
        if let Some(hit) = epoch.cache.get(&key) {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            let r = self.recheck(&hit, now).map(|()| hit.identity.clone());
            return (r, Lookup::Hit);
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let r = self.verify_full(&epoch.keys, token).map(|verified| {
            let identity = verified.identity.clone();
            epoch.cache.insert(key, verified);
            identity
        });
        (r, Lookup::Miss)
    }

    /// The checks of a full verification that depend on the time and the configuration,
    /// with the same rules (jsonwebtoken's: `exp` and `nbf` with the leeway; `aud` required
    /// and matching when configured, absent otherwise; `iss` matching when configured).
    fn recheck(&self, v: &cache::Verified, now: u64) -> Result<(), AuthFailure> {
        let leeway = self.cfg.leeway.as_secs();
        if v.identity.exp < now.saturating_sub(leeway) {
            return Err(AuthFailure::Expired);
        }
        if v.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(AuthFailure::NotYetValid);
        }
        match &self.cfg.audience {
            Some(aud) if !v.aud.contains(aud) => return Err(AuthFailure::Audience),
            None if v.aud != cache::Values::None => return Err(AuthFailure::Audience),
            _ => {}
        }
        if let Some(iss) = &self.cfg.issuer {
            if !v.iss.contains(iss) {
                return Err(AuthFailure::Issuer);
            }
        }
        Ok(())
    }

    /// Header, key, signature and claims: everything.
    fn verify_full(&self, keys: &KeySet, token: &str) -> Result<cache::Verified, AuthFailure> {
        let (alg, kid) = header(token)?;
        let candidates = keys.candidates(alg, kid.as_deref());
        if candidates.is_empty() {
            return Err(AuthFailure::Algorithm);
        }
        let validation = self.validations.of(alg);
        let mut last = AuthFailure::Signature;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => return verified(data.claims),
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

fn verified(c: Claims) -> Result<cache::Verified, AuthFailure> {
    if c.sub.is_empty() || c.sub.len() > 256 {
        return Err(AuthFailure::Malformed);
    }
    let channels = ChannelPatterns::parse(&c.channels).map_err(|_| AuthFailure::Malformed)?;
    Ok(cache::Verified {
        identity: Identity {
            sub: c.sub,
            exp: c.exp,
            channels,
        },
        nbf: c.nbf.as_ref().and_then(numeric),
        aud: cache::Values::of(c.aud),
        iss: cache::Values::of(c.iss),
    })
}

/// A `nbf` value as jsonwebtoken reads it: a u64, or a finite non-negative float rounded.
fn numeric(v: &serde_json::Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.round() as u64)
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
