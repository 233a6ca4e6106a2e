//! `--find-max`: successive short ramps at increasing rates, each closing all of its
//! connections before the next, until a step fails; the answer is the highest rate that
//! passed.
//!
//! A step passes when at least `--min-success` of its attempts were established, its
//! handshake p99 stayed within `--max-p99`, and the load generator kept to its schedule. The
//! last condition matters as much as the other two: a step the generator could not offer is
//! a measurement of the generator, so the search stops there instead of crediting the server.

use serde::{Deserialize, Serialize};

use crate::config::{FindMaxConfig, RunConfig};
use crate::progress::{fmt_us, Progress};
use crate::report::{Report, TimelinePoint};
use crate::workers::{run_workers, WorkerPlan};

/// One step's outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub rate: f64,
    pub attempted: u64,
    pub established: u64,
    pub success_ratio: f64,
    pub handshake_p50_us: u64,
    pub handshake_p99_us: u64,
    pub achieved_rate: f64,
    pub lag_p99_us: u64,
    pub generator_behind: bool,
    pub passed: bool,
    /// Why the step failed, when it did.
    pub reason: Option<String>,
}

/// The search as recorded in the JSON report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FindMaxReport {
    pub connections_per_step: u64,
    pub max_p99_us: u64,
    pub min_success: f64,
    pub steps: Vec<Step>,
    /// The highest rate whose step passed; `None` when the first step already failed.
    pub highest_sustained_rate: Option<f64>,
}

/// How a run (or a step) is executed: here, or split over worker processes.
#[derive(Debug, Clone)]
pub enum Runner {
    InProcess,
    Workers(WorkerPlan),
}

impl Runner {
    /// Runs `cfg` once.
    pub async fn run(&self, cfg: &RunConfig, progress: &Progress) -> anyhow::Result<Report> {
        match self {
            Runner::InProcess => crate::run::run(cfg, progress).await,
            Runner::Workers(plan) => {
                let mut plan = plan.clone();
                plan.overrides
                    .extend(["--rate".to_owned(), cfg.rate.to_string()]);
                run_workers(&plan, progress).await
            }
        }
    }
}

/// Judges one step's report.
pub fn judge(rate: f64, r: &Report, fm: &FindMaxConfig) -> Step {
    let max_p99_us = u64::try_from(fm.max_p99.as_micros()).unwrap_or(u64::MAX);
    let success_ratio = r.success_ratio();
    // The step only says something about the server if the generator offered the rate: most
    // attempts on time (lag within the latency bar, or 10 ms if that is tighter) and the
    // achieved rate within 5 % of the target.
    let lag_limit = max_p99_us.max(10_000);
    let behind = r.schedule.lag_us.p99 > lag_limit || r.schedule.achieved_rate < 0.95 * rate;
    let reason = if behind {
        Some(format!(
            "load generator fell behind (achieved {:.0}/s, lag p99 {})",
            r.schedule.achieved_rate,
            fmt_us(r.schedule.lag_us.p99)
        ))
    } else if success_ratio < fm.min_success {
        let top = r
            .failures
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(k, n)| format!(", mostly {k} x{n}"));
        Some(format!(
            "success {:.3}% < {:.3}%{}",
            success_ratio * 100.0,
            fm.min_success * 100.0,
            top.unwrap_or_default()
        ))
    } else if r.handshake_us.p99 > max_p99_us {
        Some(format!(
            "handshake p99 {} > {}",
            fmt_us(r.handshake_us.p99),
            fmt_us(max_p99_us)
        ))
    } else {
        None
    };
    Step {
        rate,
        attempted: r.counts.attempted,
        established: r.counts.established,
        success_ratio,
        handshake_p50_us: r.handshake_us.p50,
        handshake_p99_us: r.handshake_us.p99,
        achieved_rate: r.schedule.achieved_rate,
        lag_p99_us: r.schedule.lag_us.p99,
        generator_behind: behind,
        passed: reason.is_none(),
        reason,
    }
}

/// Runs the search. The returned report describes the highest passing step (or the first
/// step when none passed), its timeline is every step's timeline end to end, and `find_max`
/// holds the step table.
pub async fn find_max(
    base: &RunConfig,
    fm: &FindMaxConfig,
    runner: &Runner,
    progress: &Progress,
) -> anyhow::Result<Report> {
    let mut steps = Vec::new();
    let mut timeline: Vec<TimelinePoint> = Vec::new();
    let mut best: Option<Report> = None;
    let mut first: Option<Report> = None;
    for (i, &rate) in fm.rates.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(fm.pause).await;
        }
        let cfg = RunConfig {
            rate,
            ..base.clone()
        };
        let report = runner.run(&cfg, progress).await?;
        let step = judge(rate, &report, fm);
        progress.println(&step_line(&step));
        let offset = timeline.last().map_or(0, |p| p.second);
        timeline.extend(report.timeline.iter().map(|p| TimelinePoint {
            second: p.second + offset,
            ..*p
        }));
        let passed = step.passed;
        steps.push(step);
        if first.is_none() {
            first = Some(report.clone());
        }
        if !passed {
            break;
        }
        best = Some(report);
    }
    let highest_sustained_rate = best.as_ref().map(|r| r.config.rate);
    let mut out = best.or(first).unwrap_or_default();
    out.timeline = timeline;
    out.find_max = Some(FindMaxReport {
        connections_per_step: base.connections,
        max_p99_us: u64::try_from(fm.max_p99.as_micros()).unwrap_or(u64::MAX),
        min_success: fm.min_success,
        steps,
        highest_sustained_rate,
    });
    Ok(out)
}

/// One row of the step table.
pub fn step_line(s: &Step) -> String {
    format!(
        "{:>9.0}/s  {:>7}/{:<7} {:>8.3}%  p50 {:>9}  p99 {:>9}  achieved {:>8.0}/s  lag p99 {:>9}  {}",
        s.rate,
        s.established,
        s.attempted,
        s.success_ratio * 100.0,
        fmt_us(s.handshake_p50_us),
        fmt_us(s.handshake_p99_us),
        s.achieved_rate,
        fmt_us(s.lag_p99_us),
        s.reason.as_deref().unwrap_or("pass"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fm() -> FindMaxConfig {
        FindMaxConfig {
            rates: vec![],
            max_p99: Duration::from_millis(10),
            min_success: 0.999,
            pause: Duration::ZERO,
        }
    }

    #[test]
    fn judges_steps() {
        let mut r = Report::default();
        r.counts.attempted = 1000;
        r.counts.established = 1000;
        r.handshake_us.p99 = 9_000;
        r.schedule.achieved_rate = 500.0;
        assert!(judge(500.0, &r, &fm()).passed);
        r.handshake_us.p99 = 11_000;
        assert!(judge(500.0, &r, &fm()).reason.unwrap().contains("p99"));
        r.handshake_us.p99 = 1_000;
        r.counts.established = 998;
        r.failures.insert("http_503".into(), 2);
        let s = judge(500.0, &r, &fm());
        assert!(
            !s.passed && s.reason.as_deref().unwrap().contains("http_503"),
            "{s:?}"
        );
        r.counts.established = 1000;
        r.schedule.lag_us.p99 = 12_000;
        assert!(judge(500.0, &r, &fm())
            .reason
            .unwrap()
            .contains("generator"));
        r.schedule.lag_us.p99 = 100;
        r.schedule.achieved_rate = 400.0;
        assert!(judge(500.0, &r, &fm())
            .reason
            .unwrap()
            .contains("generator"));
        r.schedule.achieved_rate = 500.0;
        assert!(judge(500.0, &r, &fm()).passed);
    }
}
