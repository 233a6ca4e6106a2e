//! Tokens for servers with authentication on: one given token, a file of tokens, or tokens
//! minted here (HS256 / RS256 / ES256), one per attempt with its own `sub`, so that a
//! per-subject connection limit (`max_connections_per_sub`) is not what a run measures.
//!
//! Minting happens before the schedule starts, never on the measured path: an RS256
//! signature costs around a millisecond of CPU, which at 1,000 attempts per second would be
//! half of a 2-core machine taken from the servers being measured. Each process mints only
//! the attempts it performs (a worker its share), on all cores.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::ValueEnum;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

use crate::schedule::Slot;

/// Where a connection presents its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenPlace {
    /// `?token=` on the upgrade request (`&token=` when the URL has a query).
    Query,
    /// A first WebSocket message `{"type":"auth","token":...}` right after the 101.
    Message,
}

/// The signing algorithm of minted tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SignAlg {
    /// HMAC-SHA256; the key file holds the secret (its first line).
    #[value(name = "HS256")]
    Hs256,
    /// RSA PKCS#1 v1.5 with SHA-256; the key file is a PEM private key.
    #[value(name = "RS256")]
    Rs256,
    /// ECDSA P-256 with SHA-256; the key file is a PKCS#8 PEM private key.
    #[value(name = "ES256")]
    Es256,
}

impl SignAlg {
    pub fn name(self) -> &'static str {
        match self {
            Self::Hs256 => "HS256",
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        }
    }
}

/// How tokens are minted: the key and the claims every token carries besides its own `sub`.
#[derive(Clone)]
pub struct Minter {
    pub alg: SignAlg,
    pub key_file: PathBuf,
    key: EncodingKey,
    header: Header,
    /// The `channels` claim (entitlement patterns).
    pub channels: Vec<String>,
    pub ttl: Duration,
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs and panics.
        f.debug_struct("Minter")
            .field("alg", &self.alg)
            .field("key_file", &self.key_file)
            .field("kid", &self.header.kid)
            .field("channels", &self.channels)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Minter {
    /// Loads the key; `channels` is a comma list of entitlement patterns.
    pub fn new(
        alg: SignAlg,
        key_file: &Path,
        kid: Option<String>,
        channels: &str,
        ttl: Duration,
        audience: Option<String>,
        issuer: Option<String>,
    ) -> anyhow::Result<Self> {
        let bytes =
            std::fs::read(key_file).with_context(|| format!("reading {}", key_file.display()))?;
        let key = match alg {
            SignAlg::Hs256 => {
                let text = String::from_utf8(bytes)
                    .with_context(|| format!("{} is not UTF-8", key_file.display()))?;
                let secret = text.lines().next().unwrap_or("").trim().to_owned();
                if secret.len() < 32 {
                    bail!(
                        "the HS256 secret in {} is shorter than 32 bytes",
                        key_file.display()
                    );
                }
                EncodingKey::from_secret(secret.as_bytes())
            }
            SignAlg::Rs256 => EncodingKey::from_rsa_pem(&bytes)
                .with_context(|| format!("{} is not an RSA private key PEM", key_file.display()))?,
            SignAlg::Es256 => EncodingKey::from_ec_pem(&bytes).with_context(|| {
                format!("{} is not a PKCS#8 EC private key PEM", key_file.display())
            })?,
        };
        let mut header = Header::new(match alg {
            SignAlg::Hs256 => Algorithm::HS256,
            SignAlg::Rs256 => Algorithm::RS256,
            SignAlg::Es256 => Algorithm::ES256,
        });
        header.kid = kid;
        let channels = channels
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        let minter = Self {
            alg,
            key_file: key_file.to_owned(),
            key,
            header,
            channels,
            ttl,
            audience,
            issuer,
        };
        minter.mint(0, unix_s())?;
        Ok(minter)
    }

    /// The token of global attempt `g`: `sub` = `loadtest-<g>`, issued at `now`.
    pub fn mint(&self, g: u64, now: u64) -> anyhow::Result<String> {
        let mut claims = serde_json::json!({
            "sub": format!("loadtest-{g}"),
            "iat": now,
            "exp": now + self.ttl.as_secs().max(1),
            "channels": self.channels,
        });
        if let Some(aud) = &self.audience {
            claims["aud"] = aud.as_str().into();
        }
        if let Some(iss) = &self.issuer {
            claims["iss"] = iss.as_str().into();
        }
        encode(&self.header, &claims, &self.key).context("signing a token")
    }

    /// A generous estimate of how long minting `count` tokens on this machine takes (one
    /// token timed, all cores used), so that a parent can give its workers that head start.
    pub fn estimate(&self, count: u64) -> Duration {
        let started = std::time::Instant::now();
        let _ = self.mint(0, unix_s());
        let one = started.elapsed();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_core = count.div_ceil(u64::try_from(cores).unwrap_or(1));
        one.saturating_mul(u32::try_from(per_core).unwrap_or(u32::MAX)) * 2
    }
}

/// Where a run's tokens come from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// The same token for every connection.
    Fixed(Arc<str>),
    /// Tokens read from a file, one per line; attempt `g` uses line `g mod lines`.
    List(Arc<[Arc<str>]>),
    /// One token minted per attempt.
    Mint(Box<Minter>),
}

/// Token settings of a run.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    pub source: TokenSource,
    pub place: TokenPlace,
}

impl TokenConfig {
    /// What the report records (never a token or a key).
    pub fn describe(&self) -> String {
        let place = match self.place {
            TokenPlace::Query => "query",
            TokenPlace::Message => "message",
        };
        match &self.source {
            TokenSource::Fixed(_) => format!("one token, in the {place}"),
            TokenSource::List(l) => format!("{} tokens from a file, in the {place}", l.len()),
            TokenSource::Mint(m) => format!(
                "minted {} per attempt (sub loadtest-<n>, channels {:?}, ttl {} s), in the {place}",
                m.alg.name(),
                m.channels.join(","),
                m.ttl.as_secs()
            ),
        }
    }
}

/// Reads a token file: one token per non-empty line.
pub fn read_token_file(path: &Path) -> anyhow::Result<Arc<[Arc<str>]>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let tokens: Vec<Arc<str>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(Arc::from)
        .collect();
    if tokens.is_empty() {
        bail!("{} holds no token", path.display());
    }
    Ok(tokens.into())
}

/// The tokens of this process's attempts, ready before its schedule starts.
#[derive(Debug, Clone)]
pub struct AttemptTokens {
    pub place: TokenPlace,
    tokens: Arc<[Arc<str>]>,
    /// Minted tokens are stored per local attempt (`g / stride`); listed ones by `g mod len`.
    stride: Option<u64>,
}

impl AttemptTokens {
    /// Prepares the tokens of `slot`'s share of `total` attempts (minting them if asked).
    pub fn prepare(cfg: &TokenConfig, slot: Slot, total: u64) -> anyhow::Result<Self> {
        let (tokens, stride) = match &cfg.source {
            TokenSource::Fixed(t) => (Arc::from(vec![t.clone()]), None),
            TokenSource::List(l) => (l.clone(), None),
            TokenSource::Mint(m) => (
                mint_all(m, slot.indices(total).collect())?,
                Some(u64::from(slot.count.max(1))),
            ),
        };
        Ok(Self {
            place: cfg.place,
            tokens,
            stride,
        })
    }

    /// The token of global attempt `g`.
    pub fn for_attempt(&self, g: u64) -> Option<&str> {
        let len = self.tokens.len() as u64;
        if len == 0 {
            return None;
        }
        let i = match self.stride {
            Some(stride) => g / stride,
            None => g % len,
        };
        self.tokens.get(usize::try_from(i).ok()?).map(|t| &**t)
    }
}

/// Mints the tokens of attempts `ids` on every core.
fn mint_all(m: &Minter, ids: Vec<u64>) -> anyhow::Result<Arc<[Arc<str>]>> {
    let now = unix_s();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = ids.len().div_ceil(cores).max(1);
    let parts = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|&g| m.mint(g, now).map(Arc::from))
                        .collect::<anyhow::Result<Vec<Arc<str>>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a minting thread panicked"))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    Ok(parts.into_iter().flatten().collect())
}

/// `path` with `token=<token>` added to its query. Bytes outside RFC 3986's unreserved set
/// are percent-encoded (a JWT has none), so a file of arbitrary test tokens still makes a
/// valid request line.
pub fn with_query_token(path: &str, token: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut out = String::with_capacity(path.len() + token.len() + 7);
    out.push_str(path);
    out.push(sep);
    out.push_str("token=");
    for b in token.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "loadtest-test-secret-0123456789abcdef";

    fn minter() -> (tempfile::TempDir, Minter) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("secret");
        std::fs::write(
            &key,
            format!("{SECRET}\nold-secret-that-is-not-used-for-signing\n"),
        )
        .unwrap();
        let m = Minter::new(
            SignAlg::Hs256,
            &key,
            None,
            "orders.*, trades.S1",
            Duration::from_secs(600),
            Some("odin".into()),
            None,
        )
        .unwrap();
        (dir, m)
    }

    #[test]
    fn minted_tokens_verify_and_carry_one_subject_per_attempt() {
        let (_dir, m) = minter();
        let cfg = TokenConfig {
            source: TokenSource::Mint(Box::new(m)),
            place: TokenPlace::Query,
        };
        // Worker 1 of 3 performs attempts 1, 4, 7.
        let t = AttemptTokens::prepare(&cfg, Slot { index: 1, count: 3 }, 9).unwrap();
        for g in [1, 4, 7] {
            let token = t.for_attempt(g).unwrap();
            let mut v = jsonwebtoken::Validation::new(Algorithm::HS256);
            v.set_audience(&["odin"]);
            let data = jsonwebtoken::decode::<serde_json::Value>(
                token,
                &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
                &v,
            )
            .unwrap();
            assert_eq!(data.claims["sub"], format!("loadtest-{g}"));
            assert_eq!(
                data.claims["channels"],
                serde_json::json!(["orders.*", "trades.S1"])
            );
        }
        assert_eq!(t.for_attempt(10), None, "beyond this worker's share");
        assert!(cfg.describe().contains("HS256"));
        assert!(!cfg.describe().contains(SECRET));
    }

    #[test]
    fn listed_tokens_repeat_and_a_fixed_token_is_shared() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "a.b.c\n\n d.e.f \n").unwrap();
        let cfg = TokenConfig {
            source: TokenSource::List(read_token_file(&file).unwrap()),
            place: TokenPlace::Message,
        };
        let t = AttemptTokens::prepare(&cfg, Slot::SOLO, 5).unwrap();
        let got: Vec<_> = (0..4).map(|g| t.for_attempt(g).unwrap()).collect();
        assert_eq!(got, ["a.b.c", "d.e.f", "a.b.c", "d.e.f"]);
        std::fs::write(&file, "\n").unwrap();
        assert!(read_token_file(&file).is_err());
        let fixed = TokenConfig {
            source: TokenSource::Fixed("x.y.z".into()),
            place: TokenPlace::Query,
        };
        let t = AttemptTokens::prepare(&fixed, Slot::SOLO, 5).unwrap();
        assert_eq!(t.for_attempt(3), Some("x.y.z"));
    }

    #[test]
    fn short_secrets_and_wrong_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        std::fs::write(&key, "short").unwrap();
        let new = |alg| Minter::new(alg, &key, None, "*", Duration::from_secs(60), None, None);
        assert!(new(SignAlg::Hs256).is_err());
        assert!(new(SignAlg::Rs256).is_err());
        assert!(new(SignAlg::Es256).is_err());
        assert!(Minter::new(
            SignAlg::Hs256,
            &dir.path().join("missing"),
            None,
            "*",
            Duration::from_secs(60),
            None,
            None
        )
        .is_err());
    }

    #[test]
    fn query_tokens_are_appended_and_escaped() {
        assert_eq!(with_query_token("/ws", "a.b-c_d"), "/ws?token=a.b-c_d");
        assert_eq!(with_query_token("/ws?x=1", "a.b"), "/ws?x=1&token=a.b");
        assert_eq!(with_query_token("/", "a b&c"), "/?token=a%20b%26c");
    }
}
