//! `--workers N`: beyond one process's 20,000 descriptors, run N copies of this binary and
//! merge their reports.
//!
//! Each child gets the parent's arguments plus `--worker-index i --worker-count N --json
//! <tmp> --start-at-unix-ms T` (later flags override earlier ones). All children start their
//! schedule at the same wall-clock instant T and perform the interleaved attempts
//! `g % N == i`, so together they follow exactly the single-process schedule, their timelines
//! line up second by second, and source addresses and channels are assigned as in one
//! process. Children print one JSON progress line per second on stdout; the parent sums them.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::progress::{Line, Progress};
use crate::report::{Report, ScheduleReport, TimelinePoint, SCHEMA};
use crate::run::unix_ms;
use crate::stats::Histograms;

/// Head start given to the children before the common schedule begins, plus a little per
/// child, so that process start-up is not measured as schedule lag.
const START_DELAY_MS: u64 = 500;
const START_DELAY_PER_WORKER_MS: u64 = 25;

/// How to launch the children of one run.
#[derive(Debug, Clone)]
pub struct WorkerPlan {
    pub exe: PathBuf,
    /// The parent's arguments, without the program name.
    pub args: Vec<OsString>,
    pub count: u32,
    /// Extra arguments for this run (find-max puts the step's rate here).
    pub overrides: Vec<String>,
    /// Children still running after this long are killed (their report is then missing).
    pub deadline: Duration,
    /// Extra time before the common start: what the children need to mint their tokens.
    pub head_start: Duration,
}

/// Runs the children, relays their progress and merges their reports.
pub async fn run_workers(plan: &WorkerPlan, progress: &Progress) -> anyhow::Result<Report> {
    let dir = std::env::temp_dir().join(format!("loadtest-{}-{}", std::process::id(), unix_ms()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = supervise(plan, &dir, progress).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn supervise(plan: &WorkerPlan, dir: &Path, progress: &Progress) -> anyhow::Result<Report> {
    let head_start = u64::try_from(plan.head_start.as_millis()).unwrap_or(u64::MAX);
    let start_at =
        unix_ms() + START_DELAY_MS + START_DELAY_PER_WORKER_MS * u64::from(plan.count) + head_start;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Line)>();
    let mut children: Vec<(Child, PathBuf)> = Vec::new();
    for i in 0..plan.count {
        let json = dir.join(format!("worker-{i}.json"));
        let mut child = Command::new(&plan.exe)
            .args(&plan.args)
            .args(&plan.overrides)
            .args([
                "--worker-index",
                &i.to_string(),
                "--worker-count",
                &plan.count.to_string(),
            ])
            .args(["--start-at-unix-ms", &start_at.to_string()])
            .arg("--json")
            .arg(&json)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting worker {i} ({})", plan.exe.display()))?;
        if let Some(out) = child.stdout.take() {
            let tx = tx.clone();
            let index = usize::try_from(i).unwrap_or(0);
            // A plain thread: the child's stdout is a blocking pipe.
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(l) = serde_json::from_str::<Line>(&line) {
                        let _ = tx.send((index, l));
                    }
                }
            });
        }
        children.push((child, json));
    }
    drop(tx);

    let give_up = Instant::now() + plan.deadline + plan.head_start;
    let mut latest = vec![Line::default(); children.len()];
    let mut statuses = vec![None; children.len()];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while statuses.iter().any(Option::is_none) {
        tokio::select! {
            Some((i, line)) = rx.recv() => {
                if let Some(slot) = latest.get_mut(i) {
                    *slot = line;
                }
            }
            _ = tick.tick() => {
                progress.text(&format!("{} ({} workers)", Line::sum(&latest).text(), plan.count));
                for ((child, _), status) in children.iter_mut().zip(statuses.iter_mut()) {
                    if status.is_none() {
                        *status = child.try_wait().context("waiting for a worker")?;
                    }
                }
                if Instant::now() > give_up {
                    for ((child, _), status) in children.iter_mut().zip(statuses.iter_mut()) {
                        if status.is_none() {
                            tracing::error!(pid = child.id(), "worker overran its deadline; killing it");
                            let _ = child.kill();
                            *status = child.wait().ok();
                        }
                    }
                }
            }
        }
    }
    let mut reports = Vec::new();
    for (i, ((_, json), status)) in children.iter().zip(&statuses).enumerate() {
        let ok = status.is_some_and(|s| s.success());
        let text = std::fs::read_to_string(json);
        match (ok, text) {
            (true, Ok(text)) => reports
                .push(serde_json::from_str(&text).with_context(|| format!("worker {i} report"))?),
            (_, _) => bail!("worker {i} failed ({status:?}); see its stderr above"),
        }
    }
    merge(&reports)
}

/// Merges worker reports: counts and maps add up, histograms are added and percentiles
/// recomputed, timelines add second by second (p99: highest), the schedule window spans all.
pub fn merge(reports: &[Report]) -> anyhow::Result<Report> {
    let first = reports.first().context("no reports to merge")?;
    let mut out = Report {
        schema: SCHEMA,
        config: first.config.clone(),
        ..Report::default()
    };
    let mut hists = Histograms::empty();
    let mut timeline: BTreeMap<u64, TimelinePoint> = BTreeMap::new();
    let mut window: Option<(f64, f64)> = None;
    let add_map = |into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>| {
        for (k, v) in from {
            *into.entry(k.clone()).or_default() += v;
        }
    };
    for r in reports {
        out.processes += r.processes;
        out.started_unix_ms = match out.started_unix_ms {
            0 => r.started_unix_ms,
            s => s.min(r.started_unix_ms),
        };
        out.duration_s = out.duration_s.max(r.duration_s);
        out.counts.add(&r.counts);
        add_map(&mut out.failures, &r.failures);
        add_map(&mut out.disconnects, &r.disconnects);
        add_map(&mut out.reconnect_failures, &r.reconnect_failures);
        add_map(&mut out.per_channel, &r.per_channel);
        out.deliveries_per_s += r.deliveries_per_s;
        for p in &r.timeline {
            let t = timeline.entry(p.second).or_insert(TimelinePoint {
                second: p.second,
                ..TimelinePoint::default()
            });
            t.active += p.active;
            t.attempts += p.attempts;
            t.established += p.established;
            t.failures += p.failures;
            t.deliveries += p.deliveries;
            t.handshake_p99_us = t.handshake_p99_us.max(p.handshake_p99_us);
            t.delivery_p99_us = t.delivery_p99_us.max(p.delivery_p99_us);
        }
        hists.add(&r.histograms.decode()?)?;
        if r.counts.attempted > 0 {
            let (f, l) = (r.schedule.first_attempt_s, r.schedule.last_attempt_s);
            window = Some(window.map_or((f, l), |(a, b)| (a.min(f), b.max(l))));
        }
        if out.publisher.is_none() {
            out.publisher.clone_from(&r.publisher);
        }
    }
    out.schedule = ScheduleReport::new(first.config.rate, out.counts.attempted, window, &hists.lag);
    out.timeline = timeline.into_values().collect();
    out.set_histograms(&hists)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Counts;
    use crate::stats::new_histogram;

    fn report(
        handshakes: &[(u64, u64)],
        attempted: u64,
        window: (f64, f64),
        second_p99: u64,
    ) -> Report {
        let mut h = Histograms::empty();
        for &(value, n) in handshakes {
            h.handshake.record_n(value, n).unwrap();
        }
        h.lag = new_histogram();
        h.lag.record(50).unwrap();
        let mut r = Report {
            processes: 1,
            config: crate::config::ConfigEcho {
                rate: 100.0,
                ..Default::default()
            },
            counts: Counts {
                attempted,
                established: attempted - 1,
                failed: 1,
                ..Counts::default()
            },
            failures: BTreeMap::from([("http_503".to_owned(), 1)]),
            timeline: vec![TimelinePoint {
                second: 1,
                active: 5,
                attempts: 5,
                handshake_p99_us: Some(second_p99),
                ..TimelinePoint::default()
            }],
            ..Report::default()
        };
        r.schedule.first_attempt_s = window.0;
        r.schedule.last_attempt_s = window.1;
        r.set_histograms(&h).unwrap();
        r
    }

    #[test]
    fn merges_counts_histograms_and_timelines() {
        let a = report(&[(1_000, 99)], 100, (0.0, 0.99), 1_200);
        let b = report(&[(100_000, 1)], 101, (0.005, 1.0), 900);
        // Round-trip through JSON as the parent does.
        let a: Report = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        let m = merge(&[a, b]).unwrap();
        assert_eq!(m.processes, 2);
        assert_eq!(m.counts.attempted, 201);
        assert_eq!(m.counts.failed, 2);
        assert_eq!(m.failures["http_503"], 2);
        assert_eq!(m.handshake_us.count, 100);
        // 99 fast handshakes and one slow one: p50 is fast, max is the slow one.
        assert!(
            (995..=1_005).contains(&m.handshake_us.p50),
            "{:?}",
            m.handshake_us
        );
        assert!(m.handshake_us.max >= 99_900, "{:?}", m.handshake_us);
        assert_eq!(m.timeline.len(), 1);
        assert_eq!((m.timeline[0].active, m.timeline[0].attempts), (10, 10));
        assert_eq!(m.timeline[0].handshake_p99_us, Some(1_200));
        assert_eq!(
            (m.schedule.first_attempt_s, m.schedule.last_attempt_s),
            (0.0, 1.0)
        );
        assert!((m.schedule.achieved_rate - 200.0).abs() < 1e-9);
        assert_eq!(m.schedule.lag_us.count, 2);
        assert!(merge(&[]).is_err());
    }
}
