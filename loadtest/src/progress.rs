//! The live progress line: an indicatif spinner on a terminal, plain periodic lines on a pipe
//! or in CI, JSON lines on stdout when running as a worker (the parent sums them into one
//! line), or nothing with `--quiet`.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

/// What one progress update shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub elapsed_s: f64,
    pub attempted: u64,
    pub established: u64,
    pub active: i64,
    pub failed: u64,
    pub attempts_per_s: f64,
    /// Whole-run handshake p99 so far, microseconds.
    pub p99_us: u64,
    pub deliveries_per_s: f64,
}

impl Line {
    /// The human form.
    pub fn text(&self) -> String {
        format!(
            "[{:>6.1}s] attempted {} established {} active {} failed {} | {:.0} att/s | handshake p99 {} | {:.0} msg/s",
            self.elapsed_s,
            self.attempted,
            self.established,
            self.active,
            self.failed,
            self.attempts_per_s,
            fmt_us(self.p99_us),
            self.deliveries_per_s,
        )
    }

    /// Adds the lines of several workers: counts and rates add up, p99 takes the highest
    /// (an upper bound; the exact merged value is in the final report).
    pub fn sum<'a>(lines: impl IntoIterator<Item = &'a Line>) -> Line {
        lines.into_iter().fold(Line::default(), |acc, l| Line {
            elapsed_s: acc.elapsed_s.max(l.elapsed_s),
            attempted: acc.attempted + l.attempted,
            established: acc.established + l.established,
            active: acc.active + l.active,
            failed: acc.failed + l.failed,
            attempts_per_s: acc.attempts_per_s + l.attempts_per_s,
            p99_us: acc.p99_us.max(l.p99_us),
            deliveries_per_s: acc.deliveries_per_s + l.deliveries_per_s,
        })
    }
}

/// Formats microseconds with a unit a person reads at a glance.
pub fn fmt_us(us: u64) -> String {
    match us {
        0..=999 => format!("{us} us"),
        1_000..=999_999 => format!("{:.2} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// Where progress goes.
#[derive(Debug)]
pub enum Progress {
    Quiet,
    Plain,
    Bar(ProgressBar),
    /// JSON lines on stdout for the parent process.
    Worker,
}

impl Progress {
    /// Picks the form for this process.
    pub fn new(quiet: bool, worker: bool) -> Self {
        if worker {
            Progress::Worker
        } else if quiet {
            Progress::Quiet
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(250));
            Progress::Bar(bar)
        } else {
            Progress::Plain
        }
    }

    /// Shows a connection-run update.
    pub fn line(&self, line: &Line) {
        match self {
            Progress::Worker => {
                if let Ok(json) = serde_json::to_string(line) {
                    let mut out = std::io::stdout().lock();
                    // A parent that stopped reading is not a reason to fail the run.
                    let _ = writeln!(out, "{json}");
                    let _ = out.flush();
                }
            }
            other => other.text(&line.text()),
        }
    }

    /// Shows a free-form update (publisher, find-max steps, worker parent).
    pub fn text(&self, text: &str) {
        match self {
            Progress::Quiet | Progress::Worker => {}
            Progress::Plain => eprintln!("{text}"),
            Progress::Bar(bar) => bar.set_message(text.to_owned()),
        }
    }

    /// Prints a line that stays (a finished find-max step) above the live one.
    pub fn println(&self, text: &str) {
        match self {
            Progress::Quiet | Progress::Worker => {}
            Progress::Plain => eprintln!("{text}"),
            Progress::Bar(bar) => bar.println(text),
        }
    }

    /// Removes the live line before the summary is printed.
    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_sums() {
        assert_eq!(fmt_us(999), "999 us");
        assert_eq!(fmt_us(1500), "1.50 ms");
        assert_eq!(fmt_us(2_500_000), "2.50 s");
        let a = Line {
            attempted: 3,
            active: 2,
            p99_us: 10,
            attempts_per_s: 1.5,
            ..Line::default()
        };
        let b = Line {
            attempted: 4,
            active: 1,
            p99_us: 30,
            attempts_per_s: 2.0,
            ..Line::default()
        };
        let s = Line::sum([&a, &b]);
        assert_eq!(
            (s.attempted, s.active, s.p99_us, s.attempts_per_s),
            (7, 3, 30, 3.5)
        );
        assert!(s.text().contains("attempted 7"));
    }
}
