//! Load-balancer policy for ws-lb, as pure logic on tokio's clock.
//!
//! This crate decides; it never touches a socket. ws-lb asks it which shard to dial
//! ([`pool::ShardPool::select`]), reports how the attempt went (an [`error::AttemptError`] or
//! success), and asks when to admit a new client ([`pacing::Pacer`]). Every time-dependent
//! rule reads `tokio::time::Instant`, so tests run with paused time.

pub mod breaker;
pub mod config;
pub mod error;
pub mod membership;
pub mod pacing;
pub mod pool;
pub mod retry;
pub mod score;
pub mod select;

pub use breaker::{BreakerState, CircuitBreaker, Transition};
pub use config::{BreakerConfig, ConfigError, PacingConfig, RetryConfig, ScoreConfig};
pub use error::{AttemptError, AttemptKind, FinalClose};
pub use membership::{MemberState, Update};
pub use pacing::{Pacer, PacingRejection};
pub use pool::{PoolObserver, RelayCount, Reported, ShardPool, ShardSnapshot};
