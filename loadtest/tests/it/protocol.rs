//! The odin-ws protocol side: subscriptions, sequence checks, delivery latency, reconnects
//! with `since`, and the publisher.

use std::ffi::OsString;
use std::sync::atomic::Ordering;

use clap::Parser as _;

use crate::{bounded, run, servers, temp_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_count_gaps_duplicates_and_latency() {
    bounded(30, async {
        let r = run(
            servers::scripted().await,
            &[
                "--connections",
                "10",
                "--rate",
                "200",
                "--hold",
                "0.3",
                "--channels",
                "t.{0..1}",
            ],
        )
        .await;
        let c = &r.counts;
        assert_eq!(c.established, 10, "{:?}", r.failures);
        assert_eq!(c.deliveries, 50);
        assert_eq!((c.gaps, c.gap_messages, c.duplicates), (10, 10, 10));
        assert_eq!(r.per_channel.get("t.0"), Some(&25));
        assert_eq!(r.per_channel.get("t.1"), Some(&25));
        assert_eq!(r.delivery_us.count, 50);
        assert_eq!(c.pings_answered, 10);
        assert_eq!(r.messages_per_connection.min, 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_resume_from_the_last_seen_position() {
    bounded(30, async {
        let r = run(
            servers::restarting().await,
            &[
                "--connections",
                "5",
                "--rate",
                "100",
                "--hold",
                "1.5",
                "--channels",
                "r.{0..4}",
                "--reconnect",
            ],
        )
        .await;
        let c = &r.counts;
        assert_eq!(c.established, 5, "{:?}", r.failures);
        assert_eq!(
            r.disconnects.get("close_1012"),
            Some(&5),
            "{:?}",
            r.disconnects
        );
        assert_eq!(c.reconnects, 5, "{:?}", r.reconnect_failures);
        assert_eq!(c.recovered_false, 0);
        assert_eq!((c.deliveries, c.gaps, c.duplicates), (20, 0, 0));
        assert_eq!(c.active_end_of_hold, 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_during_the_hold_measures_delivery() {
    bounded(30, async {
        let (ws, http, published) = servers::pubsub().await;
        let publish_url = format!("http://{http}/publish");
        let r = run(
            ws,
            &[
                "--connections",
                "20",
                "--rate",
                "200",
                "--hold",
                "1",
                "--channels",
                "c.{0..3}",
                "--publish-url",
                &publish_url,
                "--publish-rate",
                "100",
            ],
        )
        .await;
        let p = r.publisher.as_ref().expect("publisher report");
        assert_eq!((p.attempted, p.accepted), (100, 100), "{p:?}");
        assert_eq!(p.statuses.get("202"), Some(&100));
        assert_eq!(published.load(Ordering::Relaxed), 100);
        // Each message reaches the 5 subscribers of its channel; the very last ones may still
        // be in flight when the hold ends.
        let c = &r.counts;
        assert!((450..=500).contains(&c.deliveries), "{c:?}");
        assert_eq!((c.gaps, c.duplicates), (0, 0));
        assert_eq!(r.delivery_us.count, c.deliveries);
        assert!(r.deliveries_per_s > 0.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_subcommand_keeps_its_schedule() {
    bounded(30, async {
        let (_, http, published) = servers::pubsub().await;
        let dir = temp_dir("publish");
        let json = dir.join("pub.json");
        let url = format!("http://{http}/publish");
        let args: Vec<OsString> = [
            "loadtest",
            "publish",
            "--publish-url",
            &url,
            "--rate",
            "200",
            "--duration",
            "0.5",
            "--channels",
            "c.{0..3}",
            "--connections",
            "2",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
        ]
        .iter()
        .map(OsString::from)
        .collect();
        loadtest::execute(loadtest::Cli::try_parse_from(&args).unwrap(), args)
            .await
            .unwrap();
        let p: loadtest::publish::PublishReport =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!((p.attempted, p.accepted), (100, 100), "{p:?}");
        assert_eq!(published.load(Ordering::Relaxed), 100);
        assert_eq!(p.lag_us.count, 100);
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await;
}
