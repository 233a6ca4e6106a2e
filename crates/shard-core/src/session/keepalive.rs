//! Keepalive and the client's message rate: the two per-connection policies that depend only
//! on time and on what arrives.

use std::time::Duration;

use tokio::time::Instant;

/// Pings a silent client once after `ping_interval`, and gives up on it after
/// `idle_timeout`; any byte from the client counts as life.
#[derive(Debug)]
pub(crate) struct Keepalive {
    last_inbound: Instant,
    ping_sent: bool,
}

/// What the keepalive asks for when its deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    Nothing,
    Ping,
    /// Silent for `idle_timeout`: the peer is gone.
    Dead,
}

impl Keepalive {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            last_inbound: now,
            ping_sent: false,
        }
    }

    /// Bytes arrived.
    pub(crate) fn on_inbound(&mut self, now: Instant) {
        self.last_inbound = now;
        self.ping_sent = false;
    }

    /// When [`Self::on_timer`] has something to do.
    pub(crate) fn deadline(&self, ping_interval: Duration, idle_timeout: Duration) -> Instant {
        let dead = self.last_inbound + idle_timeout;
        if self.ping_sent {
            dead
        } else {
            dead.min(self.last_inbound + ping_interval)
        }
    }

    pub(crate) fn on_timer(
        &mut self,
        now: Instant,
        ping_interval: Duration,
        idle_timeout: Duration,
    ) -> Due {
        let idle = now.saturating_duration_since(self.last_inbound);
        if idle >= idle_timeout {
            Due::Dead
        } else if idle >= ping_interval && !self.ping_sent {
            self.ping_sent = true;
            Due::Ping
        } else {
            Due::Nothing
        }
    }
}

/// A token bucket over the client's frames (data and pings).
#[derive(Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens.
    pub(crate) fn new(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            refilled: now,
        }
    }

    /// Takes a token at `rate` per second (0: unlimited) up to `burst`; false when empty.
    pub(crate) fn take(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        if rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PING: Duration = Duration::from_secs(25);
    const IDLE: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn one_ping_then_dead_and_any_byte_restarts_the_clock() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(t0);
        assert_eq!(k.deadline(PING, IDLE), t0 + PING);
        assert_eq!(k.on_timer(t0 + PING, PING, IDLE), Due::Ping);
        assert_eq!(k.deadline(PING, IDLE), t0 + IDLE, "one ping only");
        assert_eq!(k.on_timer(t0 + PING, PING, IDLE), Due::Nothing);
        k.on_inbound(t0 + Duration::from_secs(30));
        assert_eq!(k.deadline(PING, IDLE), t0 + Duration::from_secs(55));
        assert_eq!(
            k.on_timer(t0 + Duration::from_secs(90), PING, IDLE),
            Due::Dead
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, t0);
        assert!((0..3).all(|_| b.take(t0, 10, 3)));
        assert!(!b.take(t0, 10, 3));
        assert!(b.take(t0 + Duration::from_millis(100), 10, 3));
        assert!(!b.take(t0 + Duration::from_millis(100), 10, 3));
        assert!((0..100).all(|_| b.take(t0, 0, 3)), "0 = unlimited");
    }
}
