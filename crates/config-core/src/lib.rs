//! The one validation error of odin-ws configs.
//!
//! Every library config (`lb_core::BreakerConfig`, `shard_core::SessionConfig`,
//! `ws_lb::LbConfig`, ...) checks itself in `try_new`/`validate` and reports a value outside
//! its range as a [`ConfigError`] that names the setting by its key (the TOML key, the flag
//! `--key-with-dashes`, the environment variable's suffix), so the binaries report every
//! such mistake the same way and tests can branch on the key rather than on message text.
//! The crate has no dependencies beyond `thiserror`, so the policy crates can use it without
//! taking on any I/O.

/// A configuration value outside its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {key}: {problem}")]
pub struct ConfigError {
    /// The setting's key, as written in docs/runbook.md.
    pub key: &'static str,
    /// What is wrong with it, as a sentence fragment ("must be positive").
    pub problem: String,
}

impl ConfigError {
    /// An error for `key`.
    pub fn new(key: &'static str, problem: impl Into<String>) -> Self {
        Self {
            key,
            problem: problem.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_key() {
        let e = ConfigError::new("close_timeout", "must be positive");
        assert_eq!(e.to_string(), "invalid close_timeout: must be positive");
        assert_eq!(e.key, "close_timeout");
    }
}
