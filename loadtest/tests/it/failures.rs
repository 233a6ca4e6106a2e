//! Servers that refuse in different ways: each failure lands under its own cause.

use crate::{bounded, run, servers};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_503_is_counted_by_status() {
    bounded(30, async {
        let r = run(
            servers::http_503().await,
            &["--connections", "20", "--rate", "200", "--hold", "0"],
        )
        .await;
        assert_eq!(
            (r.counts.attempted, r.counts.established, r.counts.failed),
            (20, 0, 20)
        );
        assert_eq!(r.failures.get("http_503"), Some(&20), "{:?}", r.failures);
        assert_eq!(
            r.handshake_us.count, 0,
            "a 503 is not a completed handshake"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_right_after_the_upgrade_is_not_established() {
    bounded(30, async {
        let r = run(
            servers::close_1013().await,
            &[
                "--connections",
                "20",
                "--rate",
                "200",
                "--hold",
                "0",
                "--settle",
                "300ms",
            ],
        )
        .await;
        assert_eq!((r.counts.established, r.counts.failed), (0, 20));
        assert_eq!(r.failures.get("closed_1013"), Some(&20), "{:?}", r.failures);
        // The upgrade itself completed, so its latency is measured.
        assert_eq!(r.handshake_us.count, 20);
        assert_eq!(r.counts.active_end_of_hold, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_timed_out_attempts_are_told_apart() {
    bounded(30, async {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let r = run(
            addr,
            &["--connections", "5", "--rate", "100", "--hold", "0"],
        )
        .await;
        assert_eq!(r.failures.get("refused"), Some(&5), "{:?}", r.failures);

        let r = run(
            servers::silent().await,
            &[
                "--connections",
                "5",
                "--rate",
                "100",
                "--hold",
                "0",
                "--handshake-timeout",
                "300ms",
            ],
        )
        .await;
        assert_eq!(
            r.failures.get("handshake_timeout"),
            Some(&5),
            "{:?}",
            r.failures
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_to_a_server_that_does_not_speak_the_protocol_times_out() {
    bounded(30, async {
        // An echo server sends our subscribe back: undecodable, and never `subscribed`.
        let r = run(
            servers::echo().await,
            &[
                "--connections",
                "5",
                "--rate",
                "100",
                "--hold",
                "0",
                "--channels",
                "a",
                "--handshake-timeout",
                "300ms",
            ],
        )
        .await;
        assert_eq!(
            r.failures.get("subscribe_timeout"),
            Some(&5),
            "{:?}",
            r.failures
        );
        assert_eq!(r.counts.undecodable, 5);
    })
    .await;
}
