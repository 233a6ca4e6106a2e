//! odin-ws load tool: scheduled WebSocket connection ramps against any `ws://` URL.
//!
//! A run dials `--connections` clients at `--rate` per second on an absolute schedule
//! ([`schedule`]), each with a light hand-written client ([`handshake`], [`frames`],
//! [`conn`]), measures handshake and delivery latency and the generator's own lag
//! ([`stats`]), and reports a summary, a mergeable JSON report ([`report`]) and an SVG chart
//! ([`chart`]). [`publish`] drives the embedded bus; [`workers`] splits a run over processes;
//! [`findmax`] searches for the highest sustainable connection rate. The binary is a thin
//! wrapper around [`execute`].

pub mod app;
pub mod chart;
pub mod cli;
pub mod config;
pub mod conn;
pub mod findmax;
pub mod frames;
pub mod handshake;
pub mod kafka;
pub mod outcome;
pub mod progress;
pub mod publish;
pub mod report;
pub mod run;
pub mod schedule;
pub mod spec;
pub mod stats;
pub mod stream;
pub mod summary;
pub mod token;
pub mod workers;

pub use app::execute;
pub use cli::Cli;
pub use config::RunConfig;
pub use progress::Progress;
pub use report::Report;
pub use run::run;
