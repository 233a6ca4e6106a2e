//! Ramps against a plain echo server: counts, percentiles, schedule lag, outputs.

use std::ffi::OsString;

use clap::Parser as _;
use loadtest::Report;

use crate::{bounded, servers, temp_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ramp_establishes_every_connection_and_writes_reports() {
    bounded(60, async {
        let addr = servers::echo().await;
        let dir = temp_dir("ramp");
        let (json, svg) = (dir.join("out.json"), dir.join("out.svg"));
        let url = format!("ws://{addr}/ws");
        let args: Vec<OsString> = [
            "loadtest",
            "--url",
            &url,
            "--connections",
            "200",
            "--rate",
            "400",
            "--hold",
            "1",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
            "--chart",
            svg.to_str().unwrap(),
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let cli = loadtest::Cli::try_parse_from(&args).unwrap();
        loadtest::execute(cli, args).await.unwrap();

        let r: Report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let c = &r.counts;
        assert_eq!(
            (c.attempted, c.established, c.failed),
            (200, 200, 0),
            "{:?}",
            r.failures
        );
        assert!(r.failures.is_empty());
        assert_eq!(c.active_end_of_ramp, 200);
        assert_eq!(c.active_end_of_hold, 200);
        assert_eq!(c.disconnects, 0, "{:?}", r.disconnects);
        let h = &r.handshake_us;
        assert_eq!(h.count, 200);
        assert!(
            h.p50 > 0 && h.p50 <= h.p90 && h.p90 <= h.p99 && h.p99 <= h.p999 && h.p999 <= h.max,
            "{h:?}"
        );
        // The schedule lag is measured for every attempt and the rate is the offered one.
        assert_eq!(r.schedule.lag_us.count, 200);
        assert!(r.schedule.lag_us.max >= r.schedule.lag_us.p99);
        assert!(r.schedule.achieved_rate > 0.0);
        assert_eq!(r.schedule.target_rate, 400.0);
        assert!((r.schedule.scheduled_ramp_s - 199.0 / 400.0).abs() < 1e-9);
        // The timeline covers the run and adds up.
        assert!(r.timeline.len() >= 2, "{:?}", r.timeline);
        assert_eq!(r.timeline.iter().map(|p| p.attempts).sum::<u64>(), 200);
        assert_eq!(r.timeline.iter().map(|p| p.established).sum::<u64>(), 200);
        assert!(r.timeline.iter().any(|p| p.handshake_p99_us.is_some()));
        assert!(!r.histograms.handshake_us.is_empty());
        assert_eq!(r.processes, 1);
        let chart = std::fs::read_to_string(&svg).unwrap();
        assert!(chart.starts_with("<svg") && chart.contains("handshake p99"));
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_addresses_are_bound_round_robin() {
    bounded(30, async {
        let (addr, peers) = servers::echo_with_peers().await;
        let r = crate::run(
            addr,
            &[
                "--connections",
                "30",
                "--rate",
                "300",
                "--hold",
                "0",
                "--source-ips",
                "127.0.0.2-127.0.0.4",
            ],
        )
        .await;
        assert_eq!(r.counts.established, 30, "{:?}", r.failures);
        assert_eq!(r.config.source_ips, 3);
        let peers = peers.lock().unwrap().clone();
        let expected = ["127.0.0.2", "127.0.0.3", "127.0.0.4"].map(|ip| ip.parse().unwrap());
        assert_eq!(peers, expected.into_iter().collect());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lifetime_churns_connections_during_the_ramp() {
    bounded(60, async {
        use std::sync::atomic::Ordering::SeqCst;
        let (addr, seen) = servers::echo_counting().await;
        // 400 attempts over 2 s, each closing itself 50 ms after it was established.
        let r = crate::run(
            addr,
            &[
                "--connections",
                "400",
                "--rate",
                "200",
                "--lifetime",
                "50ms",
                "--hold",
                "2",
            ],
        )
        .await;
        let c = &r.counts;
        assert_eq!((c.established, c.failed), (400, 0), "{:?}", r.failures);
        assert_eq!(c.disconnects, 0, "{:?}", r.disconnects);
        assert_eq!(r.config.lifetime_s, Some(0.05));
        // Every connection ended itself with a normal close before the run did.
        assert_eq!(c.active_end_of_hold, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while seen.closed_1000.load(SeqCst) < 400 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(seen.closed_1000.load(SeqCst), 400);
        // Churn, not a hold: far fewer were ever open at once than were made (about
        // rate x lifetime; the bound leaves 1.5 s of slack for a busy machine).
        let max = seen.max_open.load(SeqCst);
        assert!(max <= 300, "{max} connections open at once");
    })
    .await;
}
