//! The key set: HS256 secrets and JWKS public keys read from files, with the modification
//! times they were read at so a reload happens only when a file changed.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Shortest HS256 secret accepted (RFC 7518 §3.2: a key of the hash's size or larger).
pub const MIN_SECRET_LEN: usize = 32;
/// Largest key file read; anything bigger is refused rather than read into memory.
const MAX_FILE_LEN: u64 = 1024 * 1024;

/// A key file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key file {path}: {problem}")]
pub struct KeyError {
    pub path: PathBuf,
    pub problem: String,
}

impl KeyError {
    fn new(path: &Path, problem: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            problem: problem.into(),
        }
    }
}

struct JwksKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The keys in use at one moment.
pub struct KeySet {
    hs256: Vec<DecodingKey>,
    jwks: Vec<JwksKey>,
    hs256_mtime: Option<SystemTime>,
    jwks_mtime: Option<SystemTime>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("KeySet")
            .field("hs256_secrets", &self.hs256.len())
            .field("jwks_keys", &self.jwks.len())
            .finish()
    }
}

impl KeySet {
    /// Reads the files that are configured.
    pub fn load(hs256: Option<&Path>, jwks: Option<&Path>) -> Result<Self, KeyError> {
        let (hs256_keys, hs256_mtime) = match hs256 {
            Some(p) => {
                let (text, mtime) = read(p)?;
                (parse_secrets(p, &text)?, Some(mtime))
            }
            None => (Vec::new(), None),
        };
        let (jwks_keys, jwks_mtime) = match jwks {
            Some(p) => {
                let (text, mtime) = read(p)?;
                (parse_jwks(p, &text)?, Some(mtime))
            }
            None => (Vec::new(), None),
        };
        Ok(Self {
            hs256: hs256_keys,
            jwks: jwks_keys,
            hs256_mtime,
            jwks_mtime,
        })
    }

    /// A new key set if a file's modification time differs from the one it was read at.
    pub fn reload_if_changed(
        &self,
        hs256: Option<&Path>,
        jwks: Option<&Path>,
    ) -> Result<Option<Self>, KeyError> {
        let changed = |p: Option<&Path>, seen: Option<SystemTime>| {
            p.is_some_and(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok() != seen)
        };
        if !changed(hs256, self.hs256_mtime) && !changed(jwks, self.jwks_mtime) {
            return Ok(None);
        }
        Self::load(hs256, jwks).map(Some)
    }

    /// The keys a token signed with `alg` may be checked against: the HS256 secrets for
    /// HS256, the JWKS keys of that algorithm otherwise (only the one with `kid` if the token
    /// names one).
    pub(crate) fn candidates(&self, alg: Algorithm, kid: Option<&str>) -> Vec<&DecodingKey> {
        if alg == Algorithm::HS256 {
            return self.hs256.iter().collect();
        }
        self.jwks
            .iter()
            .filter(|k| k.alg == alg)
            .filter(|k| match kid {
                Some(kid) => k.kid.as_deref() == Some(kid),
                None => true,
            })
            .map(|k| &k.key)
            .collect()
    }

    /// Number of keys (secrets and public keys), for logs.
    pub fn len(&self) -> usize {
        self.hs256.len() + self.jwks.len()
    }

    /// Whether the set holds no key at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn read(path: &Path) -> Result<(String, SystemTime), KeyError> {
    let meta = std::fs::metadata(path).map_err(|e| KeyError::new(path, e.to_string()))?;
    if meta.len() > MAX_FILE_LEN {
        return Err(KeyError::new(path, "larger than 1 MiB"));
    }
    let mtime = meta
        .modified()
        .map_err(|e| KeyError::new(path, e.to_string()))?;
    let text = std::fs::read_to_string(path).map_err(|e| KeyError::new(path, e.to_string()))?;
    Ok((text, mtime))
}

fn parse_secrets(path: &Path, text: &str) -> Result<Vec<DecodingKey>, KeyError> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.len() < MIN_SECRET_LEN {
            return Err(KeyError::new(
                path,
                format!(
                    "line {}: an HS256 secret must be at least {MIN_SECRET_LEN} bytes",
                    i + 1
                ),
            ));
        }
        keys.push(DecodingKey::from_secret(line.as_bytes()));
    }
    if keys.is_empty() {
        return Err(KeyError::new(path, "no secret in the file"));
    }
    Ok(keys)
}

fn parse_jwks(path: &Path, text: &str) -> Result<Vec<JwksKey>, KeyError> {
    let set: JwkSet = serde_json::from_str(text)
        .map_err(|e| KeyError::new(path, format!("not a JWKS document: {e}")))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let bad = |p: &str| KeyError::new(path, format!("key {i}: {p}"));
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            _ => {
                return Err(bad(
                    "only RSA (RS256) and EC P-256 (ES256) keys are accepted",
                ))
            }
        };
        let declared = jwk.common.key_algorithm;
        let ok = match declared {
            None => true,
            Some(KeyAlgorithm::RS256) => alg == Algorithm::RS256,
            Some(KeyAlgorithm::ES256) => alg == Algorithm::ES256,
            Some(_) => false,
        };
        if !ok {
            return Err(bad("its \"alg\" does not match its key type"));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(&e.to_string()))?;
        keys.push(JwksKey {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    if keys.is_empty() {
        return Err(KeyError::new(path, "no key in the JWKS document"));
    }
    Ok(keys)
}
