//! Typed, validated policy configuration. Built once by the binary; the core never reads the
//! environment itself.

use std::time::Duration;

pub use config_core::ConfigError;

fn bad(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::new(key, problem)
}

/// Circuit breaker settings (ws-lb also reads them from `CIRCUIT_BREAKER_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open a closed breaker.
    pub failure_threshold: u32,
    /// How long an open breaker refuses calls before letting trial calls through.
    pub open_timeout: Duration,
    /// Trial handshakes allowed at the same time while half-open.
    pub half_open_max_calls: u32,
    /// Successful trials that close a half-open breaker.
    pub success_threshold: u32,
}

impl BreakerConfig {
    /// Validates the settings.
    pub fn try_new(
        failure_threshold: u32,
        open_timeout: Duration,
        half_open_max_calls: u32,
        success_threshold: u32,
    ) -> Result<Self, ConfigError> {
        if failure_threshold == 0 {
            return Err(bad(
                "circuit_breaker_failure_threshold",
                "must be at least 1",
            ));
        }
        if open_timeout.is_zero() {
            return Err(bad("circuit_breaker_timeout", "must be positive"));
        }
        if half_open_max_calls == 0 {
            return Err(bad(
                "circuit_breaker_half_open_max_calls",
                "must be at least 1",
            ));
        }
        if success_threshold == 0 {
            return Err(bad(
                "circuit_breaker_success_threshold",
                "must be at least 1",
            ));
        }
        Ok(Self {
            failure_threshold,
            open_timeout,
            half_open_max_calls,
            success_threshold,
        })
    }
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 10,
            open_timeout: Duration::from_secs(30),
            half_open_max_calls: 5,
            success_threshold: 3,
        }
    }
}

/// Health-score settings: the sliding window of recent handshake attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreConfig {
    /// Attempts older than this no longer count.
    pub window: Duration,
    /// At most this many recent attempts are remembered per shard.
    pub window_len: usize,
}

impl ScoreConfig {
    /// Validates the settings.
    pub fn try_new(window: Duration, window_len: usize) -> Result<Self, ConfigError> {
        if window.is_zero() {
            return Err(bad("score_window", "must be positive"));
        }
        if window_len == 0 || window_len > 100_000 {
            return Err(bad("score_window_len", "must be between 1 and 100000"));
        }
        Ok(Self { window, window_len })
    }
}

impl Default for ScoreConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            window_len: 100,
        }
    }
}

/// Retry settings for one client's handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    /// Pause between two attempts on different shards.
    pub delay: Duration,
    /// Budget for the whole handshake, all attempts included.
    pub deadline: Duration,
    /// Budget for one attempt (TCP connect + WebSocket handshake with one shard).
    pub attempt_timeout: Duration,
}

impl RetryConfig {
    /// Validates the settings.
    pub fn try_new(
        delay: Duration,
        deadline: Duration,
        attempt_timeout: Duration,
    ) -> Result<Self, ConfigError> {
        if deadline.is_zero() {
            return Err(bad("handshake_deadline", "must be positive"));
        }
        if attempt_timeout.is_zero() {
            return Err(bad("attempt_timeout", "must be positive"));
        }
        if delay >= deadline {
            return Err(bad(
                "retry_delay",
                "must be shorter than handshake_deadline",
            ));
        }
        Ok(Self {
            delay,
            deadline,
            attempt_timeout,
        })
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(10),
            deadline: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(2),
        }
    }
}

/// Global admission pacing: new connections per second, FIFO queue bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacingConfig {
    /// Sustained admissions per second; 0 disables pacing.
    pub rate: u32,
    /// Admissions allowed back to back before pacing starts.
    pub burst: u32,
    /// Longest a client may wait in the queue; beyond it the client gets 1013.
    pub max_wait: Duration,
    /// Most clients waiting at once; beyond it the client gets 1013.
    pub max_queue: usize,
}

impl PacingConfig {
    /// Validates the settings.
    pub fn try_new(
        rate: u32,
        burst: u32,
        max_wait: Duration,
        max_queue: usize,
    ) -> Result<Self, ConfigError> {
        if rate > 0 && burst == 0 {
            return Err(bad(
                "admission_burst",
                "must be at least 1 when pacing is on",
            ));
        }
        if rate > 0 && max_queue == 0 {
            return Err(bad(
                "admission_max_queue",
                "must be at least 1 when pacing is on",
            ));
        }
        Ok(Self {
            rate,
            burst,
            max_wait,
            max_queue,
        })
    }
}

impl Default for PacingConfig {
    fn default() -> Self {
        Self {
            rate: 10_000,
            burst: 500,
            max_wait: Duration::from_secs(3),
            max_queue: 20_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_runbook() {
        let d = BreakerConfig::default();
        assert_eq!(
            BreakerConfig::try_new(
                d.failure_threshold,
                d.open_timeout,
                d.half_open_max_calls,
                d.success_threshold
            ),
            Ok(d)
        );
        assert_eq!(
            (
                d.failure_threshold,
                d.open_timeout.as_secs(),
                d.half_open_max_calls
            ),
            (10, 30, 5)
        );
        assert_eq!(RetryConfig::default().delay, Duration::from_millis(10));
    }

    #[test]
    fn rejects_nonsense() {
        assert_eq!(
            BreakerConfig::try_new(0, Duration::from_secs(1), 1, 1)
                .unwrap_err()
                .key,
            "circuit_breaker_failure_threshold"
        );
        assert!(BreakerConfig::try_new(1, Duration::ZERO, 1, 1).is_err());
        assert!(BreakerConfig::try_new(1, Duration::from_secs(1), 0, 1).is_err());
        assert!(ScoreConfig::try_new(Duration::from_secs(1), 0).is_err());
        assert!(RetryConfig::try_new(
            Duration::from_secs(6),
            Duration::from_secs(5),
            Duration::from_secs(1)
        )
        .is_err());
        assert!(PacingConfig::try_new(10, 0, Duration::from_secs(1), 10).is_err());
        assert!(PacingConfig::try_new(0, 0, Duration::ZERO, 0).is_ok());
    }
}
