//! Typed, validated shard-core settings. The binary builds them from flags/env/file once.

use std::time::Duration;

pub use config_core::ConfigError;

fn bad(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::new(key, problem)
}

/// Per-connection limits and timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Largest client frame or message; beyond it the connection is closed with 1009.
    pub max_message_size: usize,
    /// Frames waiting for a connection beyond which it is closed as a slow consumer (4000).
    pub outbound_queue: usize,
    /// Idle time after which the server sends a ping.
    pub ping_interval: Duration,
    /// Silence after which the connection is considered dead and closed.
    pub idle_timeout: Duration,
    /// How long to wait for the peer's close frame after sending ours.
    pub close_timeout: Duration,
    /// Most channels one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Sustained client frames per second (data and pings); beyond it: close 1008.
    pub rate_per_sec: u32,
    /// Client frames allowed in a burst before the rate applies.
    pub rate_burst: u32,
    /// On drain, each connection is closed with 1012 at a random moment in this window.
    pub drain_window: Duration,
    /// How long deliveries for an idle connection wait for more to share their write (zero:
    /// written at once). Trades latency for fewer, larger writes.
    pub write_delay: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_message_size: 64 * 1024,
            outbound_queue: 1024,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            close_timeout: Duration::from_secs(5),
            max_subscriptions: 256,
            rate_per_sec: 100,
            rate_burst: 200,
            drain_window: Duration::from_secs(10),
            write_delay: Duration::ZERO,
        }
    }
}

impl SessionConfig {
    /// Default message limit on `/echo`: Autobahn's largest cases send 16 MiB messages.
    pub const ECHO_MAX_MESSAGE_SIZE: usize = 16 << 20;

    /// Largest `write_delay` accepted.
    pub const MAX_WRITE_DELAY: Duration = Duration::from_secs(1);

    /// The settings of an `/echo` session derived from these: `max_message_size` as given,
    /// no rate limit (conformance cases send thousands of frames at once).
    pub fn echo(self, max_message_size: usize) -> Self {
        Self {
            max_message_size,
            rate_per_sec: 0,
            ..self
        }
    }

    /// Checks the relations between the settings.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.max_message_size < 125 {
            return Err(bad("max_message_size", "must be at least 125 bytes"));
        }
        if self.outbound_queue == 0 {
            return Err(bad("outbound_queue", "must be at least 1"));
        }
        if self.ping_interval.is_zero() || self.ping_interval >= self.idle_timeout {
            return Err(bad(
                "ping_interval",
                "must be positive and shorter than idle_timeout",
            ));
        }
        if self.close_timeout.is_zero() {
            return Err(bad("close_timeout", "must be positive"));
        }
        if self.max_subscriptions == 0 {
            return Err(bad("max_subscriptions", "must be at least 1"));
        }
        if self.write_delay > Self::MAX_WRITE_DELAY {
            return Err(bad("write_delay", "must be at most 1s"));
        }
        if self.rate_per_sec > 0 && self.rate_burst == 0 {
            return Err(bad(
                "client_rate_burst",
                "must be at least 1 when a rate is set",
            ));
        }
        Ok(self)
    }
}

/// Registry settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubConfig {
    /// Messages kept per channel for `since` recovery.
    pub history_len: usize,
    /// Bytes of history and channel bookkeeping the process may hold; beyond it the least
    /// recently used history is evicted.
    pub history_budget: usize,
    /// A channel without subscribers that carried no message for this long leaves the
    /// registry (its position is kept while the budget allows).
    pub channel_idle_timeout: Duration,
    /// Most channels created by subscriptions that have carried no message yet; a
    /// subscription that would create one more is refused.
    pub max_empty_channels: usize,
}

/// Smallest `history_budget` accepted: room for a few thousand channels.
pub const MIN_HISTORY_BUDGET: usize = 1 << 20;

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            history_len: 1000,
            history_budget: 1 << 30,
            channel_idle_timeout: Duration::from_secs(300),
            max_empty_channels: 100_000,
        }
    }
}

impl HubConfig {
    /// Checks the settings.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.history_len > 1_000_000 {
            return Err(bad("history_len", "must be at most 1000000"));
        }
        if self.history_budget < MIN_HISTORY_BUDGET {
            return Err(bad(
                "history_budget",
                format!("must be at least {MIN_HISTORY_BUDGET} bytes"),
            ));
        }
        if self.channel_idle_timeout.is_zero() {
            return Err(bad("channel_idle_timeout", "must be positive"));
        }
        if self.max_empty_channels == 0 {
            return Err(bad("max_empty_channels", "must be at least 1"));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_do_not() {
        assert!(SessionConfig::default().validate().is_ok());
        assert!(HubConfig::default().validate().is_ok());
        let bad_ping = SessionConfig {
            ping_interval: Duration::from_secs(60),
            ..SessionConfig::default()
        };
        assert_eq!(bad_ping.validate().unwrap_err().key, "ping_interval");
        assert!(SessionConfig {
            write_delay: Duration::from_millis(1001),
            ..SessionConfig::default()
        }
        .validate()
        .is_err());
        assert!(SessionConfig {
            outbound_queue: 0,
            ..SessionConfig::default()
        }
        .validate()
        .is_err());
        for bad in [
            HubConfig {
                history_len: 2_000_000,
                ..HubConfig::default()
            },
            HubConfig {
                history_budget: MIN_HISTORY_BUDGET - 1,
                ..HubConfig::default()
            },
            HubConfig {
                channel_idle_timeout: Duration::ZERO,
                ..HubConfig::default()
            },
            HubConfig {
                max_empty_channels: 0,
                ..HubConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
