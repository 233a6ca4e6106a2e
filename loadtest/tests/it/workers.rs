//! Multi-process runs through the real binary, and the find-max search.

use std::process::{Command, Stdio};
use std::time::Duration;

use clap::Parser as _;
use loadtest::Report;

use crate::{bounded, servers, temp_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_split_the_run_and_the_parent_merges() {
    bounded(60, async {
        let (addr, peers) = servers::echo_with_peers().await;
        let dir = temp_dir("workers");
        let json = dir.join("merged.json");
        let mut child = Command::new(env!("CARGO_BIN_EXE_loadtest"))
            .args([
                "--url",
                &format!("ws://{addr}/"),
                "--connections",
                "100",
                "--rate",
                "200",
            ])
            .args([
                "--hold",
                "0.5",
                "--workers",
                "2",
                "--quiet",
                "--source-ips",
                "127.0.0.1-127.0.0.4",
            ])
            .arg("--json")
            .arg(&json)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // The echo server runs on this test's runtime, so wait without blocking it.
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut summary = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut summary).unwrap();
        assert!(status.success(), "{summary}");
        assert!(summary.contains("2 processes"), "{summary}");
        let r: Report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(r.processes, 2);
        assert_eq!(
            (r.counts.attempted, r.counts.established),
            (100, 100),
            "{:?}",
            r.failures
        );
        assert_eq!(r.counts.active_end_of_hold, 100);
        assert_eq!(r.handshake_us.count, 100);
        assert_eq!(r.schedule.lag_us.count, 100);
        assert_eq!(r.timeline.iter().map(|p| p.attempts).sum::<u64>(), 100);
        assert_eq!(r.config.source_ips, 4);
        // Each worker dials from its own two addresses; together they use all four.
        assert_eq!(peers.lock().unwrap().len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_max_stops_at_the_first_failing_step() {
    bounded(60, async {
        let flags = [
            "--connections",
            "40",
            "--hold",
            "0",
            "--find-max",
            "--find-max-rates",
            "200,400",
        ];
        let fm = |r: &Report| r.find_max.clone().expect("find-max table");

        let addr = servers::echo().await;
        let cfg = crate::config(
            addr,
            &[&flags[..], &["--max-p99", "5s", "--step-pause", "100ms"]].concat(),
        );
        let fmc = loadtest::config::FindMaxConfig::from_args(
            &loadtest::Cli::try_parse_from([
                "loadtest",
                "--url",
                "ws://x/",
                "--find-max-rates",
                "200,400",
                "--max-p99",
                "5s",
                "--step-pause",
                "100ms",
            ])
            .unwrap()
            .run,
        )
        .unwrap();
        let runner = loadtest::findmax::Runner::InProcess;
        let r = loadtest::findmax::find_max(&cfg, &fmc, &runner, &loadtest::Progress::Quiet)
            .await
            .unwrap();
        let table = fm(&r);
        assert_eq!(table.steps.len(), 2, "{table:?}");
        assert!(table.steps.iter().all(|s| s.passed), "{table:?}");
        assert_eq!(table.highest_sustained_rate, Some(400.0));
        assert_eq!(
            r.counts.attempted, 40,
            "the top-level counts are the best step's"
        );

        let refusing = servers::http_503().await;
        let cfg = crate::config(refusing, &flags);
        let r = loadtest::findmax::find_max(&cfg, &fmc, &runner, &loadtest::Progress::Quiet)
            .await
            .unwrap();
        let table = fm(&r);
        assert_eq!(table.steps.len(), 1);
        assert!(
            table.steps[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("http_503"),
            "{table:?}"
        );
        assert_eq!(table.highest_sustained_rate, None);
    })
    .await;
}
