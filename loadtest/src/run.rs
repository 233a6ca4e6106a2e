//! One process's connection run: ramp on schedule, wait for every attempt to resolve, hold
//! (publishing if asked), close everything, and turn the measurements into a [`Report`].
//!
//! A once-per-second sampler runs beside the phases in the same task; it feeds the progress
//! line and records the timeline.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::{open_file_limit, RunConfig};
use crate::conn::{run_connection, Ctx};
use crate::handshake::Target;
use crate::progress::{Line, Progress};
use crate::report::{Counts, Report, ScheduleReport, TimelinePoint, SCHEMA};
use crate::schedule::{ramp, Schedule};
use crate::stats::{Snapshot, Stats};
use crate::stream::Tls;
use crate::token::AttemptTokens;

/// Descriptors a process needs besides its connections (runtime, stdio, publisher).
const FD_RESERVE: u64 = 64;

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Runs this process's share of `cfg` and reports on it.
pub async fn run(cfg: &RunConfig, progress: &Progress) -> anyhow::Result<Report> {
    let mut targets = Vec::with_capacity(cfg.targets.len());
    for url in &cfg.targets {
        let addr = url.resolve().await?;
        if let Some(ip) = cfg
            .source_ips
            .iter()
            .find(|ip| ip.is_ipv4() != addr.is_ipv4())
        {
            bail!("source address {ip} is not of the same family as the target {addr}");
        }
        targets.push(Target {
            addr,
            authority: url.authority.clone(),
            path: url.path.clone(),
            tls: (url.scheme == "wss")
                .then(|| Tls::new(cfg.ca_file.as_deref(), &url.host))
                .transpose()?,
        });
    }
    let share = cfg.slot.share(cfg.connections);
    if let Some(limit) = open_file_limit().filter(|l| share + FD_RESERVE > *l) {
        tracing::warn!(
            share,
            limit,
            "this process may run out of file descriptors; failures will show as local_fd_limit (use --workers)"
        );
    }
    // Tokens are ready (minted, if asked) before the schedule starts: signing is never on
    // the measured path.
    let tokens = match cfg.tokens.clone() {
        Some(t) => {
            let (slot, total) = (cfg.slot, cfg.connections);
            Some(
                tokio::task::spawn_blocking(move || AttemptTokens::prepare(&t, slot, total))
                    .await??,
            )
        }
        None => None,
    };
    let (t0, started_unix_ms) = match cfg.start_at_unix_ms {
        Some(at) => (
            Instant::now() + Duration::from_millis(at.saturating_sub(unix_ms())),
            at,
        ),
        None => (Instant::now(), unix_ms()),
    };
    let stats = Arc::new(Stats::new(t0, cfg.channels.len()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        targets,
        stats: stats.clone(),
        channels: cfg.channels.iter().map(|c| Arc::from(c.as_str())).collect(),
        channels_per_conn: cfg.channels_per_conn,
        source_ips: cfg.source_ips.clone(),
        stride: u64::from(cfg.slot.count.max(1)),
        handshake_timeout: cfg.handshake_timeout,
        settle: cfg.settle,
        reconnect: cfg.reconnect,
        tls_resume: cfg.tls_resume,
        reconnect_delay: cfg.reconnect_delay,
        lifetime: cfg.lifetime,
        max_message: cfg.max_message,
        tokens,
        stop: stop_rx,
    });
    let (done_tx, done_rx) = watch::channel(false);
    let phases = async {
        let r = phases(cfg, ctx, t0, share, stop_tx).await;
        let _ = done_tx.send(true);
        r
    };
    let (timeline, phased) = tokio::join!(sample(&stats, t0, progress, done_rx), phases);
    let phased = phased?;

    let h = stats.histograms();
    let window = stats
        .attempt_window()
        .map(|(a, b)| (a.as_secs_f64(), b.as_secs_f64()));
    let c = &stats.c;
    let attempted = c.attempted.load(Relaxed);
    let per_process_rate = cfg.rate / f64::from(cfg.slot.count.max(1));
    let mut report = Report {
        schema: SCHEMA,
        config: cfg.echo(cfg.slot.count),
        started_unix_ms,
        duration_s: Instant::now().saturating_duration_since(t0).as_secs_f64(),
        processes: 1,
        counts: Counts {
            attempted,
            established: c.established.load(Relaxed),
            failed: c.failed.load(Relaxed),
            active_end_of_ramp: phased.active_end_of_ramp,
            active_end_of_hold: phased.active_end_of_hold,
            disconnects: c.disconnects.load(Relaxed),
            reconnect_attempts: c.reconnect_attempts.load(Relaxed),
            reconnects: c.reconnects.load(Relaxed),
            recovered_false: c.recovered_false.load(Relaxed),
            deliveries: c.deliveries.load(Relaxed),
            gaps: c.gaps.load(Relaxed),
            gap_messages: c.gap_messages.load(Relaxed),
            duplicates: c.duplicates.load(Relaxed),
            epoch_changes: c.epoch_changes.load(Relaxed),
            server_errors: c.server_errors.load(Relaxed),
            undecodable: c.undecodable.load(Relaxed),
            pings_answered: c.pings_answered.load(Relaxed),
            tls_full_handshakes: c.tls_full.load(Relaxed),
            tls_resumed_handshakes: c.tls_resumed.load(Relaxed),
        },
        failures: stats.failures(),
        disconnects: stats.disconnect_causes(),
        reconnect_failures: stats.reconnect_failures(),
        deliveries_per_s: phased.deliveries_per_s,
        schedule: ScheduleReport::new(per_process_rate, attempted, window, &h.lag),
        per_channel: cfg
            .channels
            .iter()
            .cloned()
            .zip(stats.per_channel())
            .collect(),
        timeline,
        publisher: phased.publisher,
        ..Report::default()
    };
    report.set_histograms(&h)?;
    Ok(report)
}

struct Phased {
    active_end_of_ramp: i64,
    active_end_of_hold: i64,
    deliveries_per_s: f64,
    publisher: Option<crate::publish::PublishReport>,
}

async fn phases(
    cfg: &RunConfig,
    ctx: Arc<Ctx>,
    t0: Instant,
    share: u64,
    stop: watch::Sender<bool>,
) -> anyhow::Result<Phased> {
    let stats = ctx.stats.clone();
    let mut tasks = JoinSet::new();
    ramp(
        Schedule::new(t0, cfg.rate),
        cfg.slot.indices(cfg.connections),
        |g, due| {
            tasks.spawn(run_connection(ctx.clone(), g, due));
        },
    )
    .await;
    drop(ctx);

    // The ramp ends when every attempt has resolved; each is bounded by two handshake
    // timeouts (upgrade, then subscribe) plus the settle window.
    let give_up = Instant::now() + cfg.handshake_timeout * 2 + cfg.settle + Duration::from_secs(1);
    while stats.c.established.load(Relaxed) + stats.c.failed.load(Relaxed) < share
        && Instant::now() < give_up
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let active_end_of_ramp = stats.c.active.load(Relaxed);

    // Only the first worker publishes, so the publish rate is not multiplied by --workers.
    let publisher = cfg
        .publish
        .clone()
        .filter(|_| cfg.slot.index == 0 && !cfg.hold.is_zero())
        .map(|p| tokio::spawn(async move { crate::publish::publish(&p, &Progress::Quiet).await }));
    let delivered_before = stats.c.deliveries.load(Relaxed);
    tokio::time::sleep(cfg.hold).await;
    let delivered = stats.c.deliveries.load(Relaxed) - delivered_before;
    let active_end_of_hold = stats.c.active.load(Relaxed);
    let publisher = match publisher {
        Some(handle) => Some(handle.await??),
        None => None,
    };

    let _ = stop.send(true);
    let drained = tokio::time::timeout(cfg.handshake_timeout + Duration::from_secs(1), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "connections did not close in time; aborting them"
        );
        tasks.shutdown().await;
    }
    let hold_s = cfg.hold.as_secs_f64();
    Ok(Phased {
        active_end_of_ramp,
        active_end_of_hold,
        deliveries_per_s: if hold_s > 0.0 {
            delivered as f64 / hold_s
        } else {
            0.0
        },
        publisher,
    })
}

/// Samples the counters once per second (on t0 + k s) until `done`, feeding the progress
/// line and returning the timeline.
async fn sample(
    stats: &Stats,
    t0: Instant,
    progress: &Progress,
    mut done: watch::Receiver<bool>,
) -> Vec<TimelinePoint> {
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(t0 + second, second);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut prev = Snapshot::default();
    let mut points: Vec<TimelinePoint> = Vec::new();
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = done.wait_for(|d| *d) => true,
        };
        let snap = stats.snapshot();
        let p99 = stats.take_interval_p99();
        let delivery_p99 = stats.take_interval_delivery_p99();
        let elapsed = snap.elapsed.as_secs_f64();
        let dt = (snap.elapsed.saturating_sub(prev.elapsed))
            .as_secs_f64()
            .max(1e-3);
        let mut point = TimelinePoint {
            second: if last {
                elapsed.ceil() as u64
            } else {
                elapsed.round() as u64
            },
            active: snap.active,
            attempts: snap.attempted - prev.attempted,
            established: snap.established - prev.established,
            failures: snap.failed - prev.failed,
            handshake_p99_us: p99,
            deliveries: snap.deliveries - prev.deliveries,
            delivery_p99_us: delivery_p99,
        };
        progress.line(&Line {
            elapsed_s: elapsed,
            attempted: snap.attempted,
            established: snap.established,
            active: snap.active,
            failed: snap.failed,
            attempts_per_s: point.attempts as f64 / dt,
            p99_us: snap.handshake_p99_us,
            deliveries_per_s: point.deliveries as f64 / dt,
        });
        prev = snap;
        // A final partial second that rounds onto the previous point is folded into it.
        match points.last_mut() {
            Some(p) if p.second >= point.second => {
                p.active = point.active;
                p.attempts += point.attempts;
                p.established += point.established;
                p.failures += point.failures;
                p.deliveries += point.deliveries;
                p.handshake_p99_us = p.handshake_p99_us.max(point.handshake_p99_us.take());
                p.delivery_p99_us = p.delivery_p99_us.max(point.delivery_p99_us.take());
            }
            _ => points.push(point),
        }
        if last {
            return points;
        }
    }
}
