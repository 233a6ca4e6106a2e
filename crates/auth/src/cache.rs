//! Recently verified tokens, so that a client presenting a token again (a reconnect after a
//! shard or network failure, a reconnect storm) costs a hash and a lookup instead of a
//! signature check.
//!
//! - The key is the SHA-256 of the whole token: a different token (one changed byte anywhere,
//!   signature included) is a different key, and nobody can make a token that collides with
//!   a cached one.
//! - Only tokens that passed verification are inserted, so a flood of distinct bad tokens
//!   neither fills the cache nor evicts good entries.
//! - An entry holds what verification produced (the identity) and the claims the time and
//!   scope checks need (`exp`, `nbf`, `aud`, `iss`); a hit is checked again against the
//!   current time and configuration, with the same rules as a full verification.
//! - Each key set has its own cache ([`crate::Verifier`] keeps them together): a reload of the
//!   key files (a JWKS rotation, a changed HS256 secret) starts an empty cache, so a key that
//!   was removed never validates a cached token again, and a verification that started with
//!   the old keys can only fill the old, discarded cache.
//! - Bounded in entries and in bytes: two generations of at most half the budget each; when
//!   the young one is full it becomes the old one and the previous old one is dropped. A hit
//!   in the old generation moves the entry to the young one, so tokens still in use survive
//!   (an approximate LRU at O(1) per operation).

use std::collections::HashMap;
use std::mem::size_of;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::Identity;

/// SHA-256 of a token.
pub(crate) type TokenKey = [u8; 32];

pub(crate) fn key_of(token: &str) -> TokenKey {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

/// A token's `aud` or `iss` claim: one string or several (anything else: none, as in
/// jsonwebtoken's validation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Values {
    None,
    One(Box<str>),
    Many(Box<[Box<str>]>),
}

impl Values {
    pub(crate) fn of(claim: Option<serde_json::Value>) -> Self {
        match claim {
            Some(serde_json::Value::String(s)) => Self::One(s.into()),
            Some(serde_json::Value::Array(items)) => {
                let strings: Option<Box<[Box<str>]>> = items
                    .into_iter()
                    .map(|v| match v {
                        serde_json::Value::String(s) => Some(s.into_boxed_str()),
                        _ => None,
                    })
                    .collect();
                strings.map_or(Self::None, Self::Many)
            }
            _ => Self::None,
        }
    }

    pub(crate) fn contains(&self, wanted: &str) -> bool {
        match self {
            Self::None => false,
            Self::One(a) => &**a == wanted,
            Self::Many(all) => all.iter().any(|a| &**a == wanted),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::None => 0,
            Self::One(a) => a.len(),
            Self::Many(all) => all.iter().map(|a| a.len() + size_of::<Box<str>>()).sum(),
        }
    }
}

/// What a successful verification produced, and the claims a hit is checked against again.
#[derive(Debug)]
pub(crate) struct Verified {
    pub(crate) identity: Identity,
    pub(crate) nbf: Option<u64>,
    pub(crate) aud: Values,
    pub(crate) iss: Values,
}

impl Verified {
    /// Memory an entry holds (heap and table slot, approximately from above).
    fn bytes(&self) -> usize {
        const SLOT: usize = size_of::<TokenKey>() + size_of::<Arc<Verified>>() + 16;
        SLOT + size_of::<Verified>()
            + 16 // Arc counts
            + self.identity.sub.len()
            + self.identity.channels.heap_bytes()
            + self.aud.bytes()
            + self.iss.bytes()
    }
}

#[derive(Default)]
struct Generation {
    map: HashMap<TokenKey, Arc<Verified>>,
    bytes: usize,
}

impl Generation {
    fn insert(&mut self, key: TokenKey, v: Arc<Verified>, bytes: usize) {
        if let Some(old) = self.map.insert(key, v) {
            self.bytes = self.bytes.saturating_sub(old.bytes());
        }
        self.bytes += bytes;
    }
}

/// Bounded map from token hash to its verification result (one per key set).
pub(crate) struct TokenCache {
    /// Entries per generation (half the configured total).
    half_entries: usize,
    /// Bytes per generation (half the configured total).
    half_bytes: usize,
    inner: Mutex<(Generation, Generation)>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (entries, bytes) = self.usage();
        f.debug_struct("TokenCache")
            .field("entries", &entries)
            .field("bytes", &bytes)
            .finish()
    }
}

impl TokenCache {
    /// A cache of at most `entries` entries and `bytes` bytes; either 0 disables it.
    pub(crate) fn new(entries: usize, bytes: usize) -> Self {
        Self {
            half_entries: entries / 2,
            half_bytes: bytes / 2,
            inner: Mutex::new(Default::default()),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.half_entries > 0 && self.half_bytes > 0
    }

    pub(crate) fn get(&self, key: &TokenKey) -> Option<Arc<Verified>> {
        if !self.enabled() {
            return None;
        }
        let mut g = self.inner.lock();
        let (young, old) = &mut *g;
        if let Some(v) = young.map.get(key) {
            return Some(v.clone());
        }
        let v = old.map.remove(key)?;
        let bytes = v.bytes();
        old.bytes = old.bytes.saturating_sub(bytes);
        Self::insert_locked(
            &mut g,
            self.half_entries,
            self.half_bytes,
            *key,
            v.clone(),
            bytes,
        );
        Some(v)
    }

    pub(crate) fn insert(&self, key: TokenKey, v: Verified) {
        if !self.enabled() {
            return;
        }
        let bytes = v.bytes();
        if bytes > self.half_bytes {
            return;
        }
        let mut g = self.inner.lock();
        Self::insert_locked(
            &mut g,
            self.half_entries,
            self.half_bytes,
            key,
            Arc::new(v),
            bytes,
        );
    }

    fn insert_locked(
        g: &mut (Generation, Generation),
        half_entries: usize,
        half_bytes: usize,
        key: TokenKey,
        v: Arc<Verified>,
        bytes: usize,
    ) {
        let (young, old) = g;
        if !young.map.contains_key(&key)
            && (young.map.len() >= half_entries || young.bytes + bytes > half_bytes)
        {
            // The young generation is full: it becomes the old one; the old one goes. The
            // same key may sit in the old generation too: remove it there so each key is
            // counted once.
            *old = std::mem::take(young);
        }
        if let Some(stale) = old.map.remove(&key) {
            old.bytes = old.bytes.saturating_sub(stale.bytes());
        }
        young.insert(key, v, bytes);
    }

    /// Entries and bytes held now.
    pub(crate) fn usage(&self) -> (usize, usize) {
        let g = self.inner.lock();
        (g.0.map.len() + g.1.map.len(), g.0.bytes + g.1.bytes)
    }
}
