//! SIGTERM behaviour (the drain): every client gets 1012, spread over the window, and the
//! server finishes within its grace period.

use std::time::Duration;

use test_support::http::get;
use test_support::start_shards;
use test_support::ws::{connect, next_event, Event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_every_client_with_1012_and_exits_in_time() {
    let srv = start_shards(2, |c| {
        c.session.drain_window = Duration::from_secs(1);
        c.grace = Duration::from_secs(8);
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..1000 {
        clients.push(connect(&srv.ws_url(i % 2)).await.unwrap());
    }
    let started = tokio::time::Instant::now();
    srv.shutdown.start_drain(Duration::from_secs(8));
    // While draining, health says so and new upgrades get 503.
    let h = get(srv.shards[0], "/health").await.unwrap();
    assert_eq!(h.status, 503);
    assert!(h.body.contains("draining"));
    // Liveness (the shard VMs' autohealing check) stays 200: a drain is no reason to recreate.
    assert_eq!(get(srv.shards[0], "/live").await.unwrap().status, 200);
    // An upgrade gets 503 with the status in the header ws-lb reads (so it holds the
    // refusal against no breaker).
    test_support::ws::refused_as_not_ready(srv.shards[1], "draining").await;
    let waits: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move { next_event(&mut ws, Duration::from_secs(10)).await.unwrap() })
        })
        .collect();
    let mut codes = std::collections::HashMap::new();
    for w in waits {
        let e = w.await.unwrap();
        let key = match e {
            Event::Close(code, _) => code.to_string(),
            other => format!("{other:?}"),
        };
        *codes.entry(key).or_insert(0) += 1;
    }
    assert_eq!(codes.get("1012"), Some(&1000), "{codes:?}");
    let left = tokio::time::timeout(Duration::from_secs(9), srv.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(left, 0);
    assert!(started.elapsed() < Duration::from_secs(8));
}
