//! Process plumbing shared by the two binaries' libraries (ws-lb, ws-shard): binding
//! listeners with the socket options a WebSocket tier needs, an accept loop that survives
//! descriptor exhaustion, HTTP/1 serving with header limits, shutdown signals, telemetry,
//! and the binaries' configuration loading.
//!
//! Policy and protocol live elsewhere; this crate only moves connections in and out.

pub mod accept;
pub mod cli;
pub mod config;
pub mod head;
pub mod http;
pub mod limits;
pub mod listener;
pub mod runtime_metrics;
pub mod shutdown;
pub mod telemetry;
pub mod upgrade;

pub use accept::{accept_loop, SocketOptions};
pub use http::{serve_connection, HttpLimits};
pub use listener::{bind, ListenOptions};
pub use shutdown::Shutdown;
