//! What the binary does with its parsed flags: pick the mode (publish, worker, find-max,
//! multi-process, plain run), run it, print the summary and write the JSON and SVG outputs.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

use crate::chart::write_chart;
use crate::cli::{Cli, Command};
use crate::config::{FindMaxConfig, PublishConfig, RunConfig};
use crate::findmax::{find_max, Runner};
use crate::progress::Progress;
use crate::summary;
use crate::token::TokenSource;
use crate::workers::WorkerPlan;

/// Runs the command line `cli`; `raw_args` (including the program name) are what worker
/// processes are started with.
pub async fn execute(cli: Cli, raw_args: Vec<OsString>) -> anyhow::Result<()> {
    if let Some(Command::KafkaProduce(args)) = &cli.command {
        let a = args.clone();
        let report = tokio::task::spawn_blocking(move || crate::kafka::produce(&a)).await??;
        println!(
            "kafka-produce: {} records at {}/s, {} failed, {:.3} s behind schedule",
            report.records, report.rate, report.failed, report.behind_s
        );
        if let Some(path) = &args.json {
            write_json(path, &report)?;
        }
        return Ok(());
    }
    if let Some(Command::KafkaConsume(args)) = &cli.command {
        let a = args.clone();
        let report = tokio::task::spawn_blocking(move || crate::kafka::consume(&a)).await??;
        let l = &report.latency_us;
        println!(
            "kafka-consume: {} records; latency p50 {} us, p99 {} us, max {} us",
            report.records, l.p50, l.p99, l.max
        );
        if let Some(path) = &args.json {
            write_json(path, &report)?;
        }
        return Ok(());
    }
    if let Some(Command::KafkaBroker(args)) = &cli.command {
        return crate::kafka::broker(args).await;
    }
    if let Some(Command::Publish(args)) = &cli.command {
        let cfg = PublishConfig::from_args(args)?;
        let progress = Progress::new(args.quiet, false);
        let report = crate::publish::publish(&cfg, &progress).await?;
        progress.finish();
        print!("{}", summary::render_publish(&report));
        if let Some(path) = &args.json {
            write_json(path, &report)?;
        }
        return Ok(());
    }
    let cfg = RunConfig::from_args(&cli.run)?;
    if cfg.slot.is_worker() {
        // A worker reports to its parent only: JSON progress lines and the JSON file.
        let report = crate::run::run(&cfg, &Progress::Worker).await?;
        let path = cli.run.json.as_deref().context("a worker needs --json")?;
        return write_json(path, &report);
    }
    let progress = Progress::new(cfg.quiet, false);
    let runner = if cli.run.workers > 1 {
        Runner::Workers(WorkerPlan {
            exe: std::env::current_exe().context("locating this binary for --workers")?,
            args: raw_args.into_iter().skip(1).collect(),
            count: cli.run.workers,
            overrides: Vec::new(),
            deadline: worker_deadline(&cfg),
            head_start: mint_head_start(&cfg),
        })
    } else {
        Runner::InProcess
    };
    let report = if cli.run.find_max {
        find_max(
            &cfg,
            &FindMaxConfig::from_args(&cli.run)?,
            &runner,
            &progress,
        )
        .await?
    } else {
        runner.run(&cfg, &progress).await?
    };
    progress.finish();
    print!("{}", summary::render(&report));
    if let Some(path) = &cli.run.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &cli.run.chart {
        write_chart(path, &report)?;
    }
    Ok(())
}

/// The longest a worker of `cfg` can legitimately take: ramp, resolution, hold, drain, and a
/// generous margin for a loaded machine.
fn worker_deadline(cfg: &RunConfig) -> Duration {
    let ramp = Duration::from_secs_f64(cfg.connections as f64 / cfg.rate);
    ramp + cfg.hold + cfg.handshake_timeout * 4 + cfg.settle + Duration::from_secs(60)
}

/// How long the workers need to mint their tokens, if they mint any: they do it at once on
/// the same cores, so it is the time to mint every token of the run.
fn mint_head_start(cfg: &RunConfig) -> Duration {
    match cfg.tokens.as_ref().map(|t| &t.source) {
        Some(TokenSource::Mint(m)) => m.estimate(cfg.connections),
        _ => Duration::ZERO,
    }
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(value)?;
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}
