//! `GET /health` is the LB's liveness: 200 while it serves, even when no shard can take a
//! client (that is reported in the body and in `ws_lb_shards_available`, and the client
//! still gets a WebSocket closed with 1012); 503 only while draining.

use std::time::Duration;

use lb_core::BreakerConfig;
use test_support::http::{get, metric, wait_until};
use test_support::ws::{connect, next_event, Event};
use test_support::{free_port, start_lb, start_shards};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_shard_available_is_live_and_only_draining_is_503() {
    let shards = start_shards(1, |_| {}).await;
    let dead = free_port();
    let lb = start_lb(vec![shards.ws_url(0), format!("ws://{dead}/ws")], |c| {
        c.breaker = BreakerConfig::try_new(1, Duration::from_secs(3600), 1, 1).unwrap();
        // The clients below never answer their 1012, so the LB keeps waiting for them until
        // the end of the test: a draining LB with no client left exits at once, and the
        // draining /health could not be asked.
        c.close_timeout = Duration::from_secs(60);
    })
    .await;
    let shards_available = |page: &str| metric(page, "ws_lb_shards_available", &[]);
    // The dead backend is found by the health polls (its connects are refused) and taken
    // out; the live one stays.
    assert!(
        wait_until(Duration::from_secs(5), || async {
            shards_available(&lb.metrics().await) == 1.0
        })
        .await
    );

    // Lose the whole shard tier: the polls take the other one out too, and every new client
    // still gets a WebSocket, closed with 1012 and a reason; the LB stays live.
    shards.kill();
    let gone = shards.shards[0];
    assert!(
        wait_until(Duration::from_secs(5), || async move {
            get(gone, "/health").await.is_err()
        })
        .await
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            shards_available(&lb.metrics().await) == 0.0
        })
        .await,
        "the gauge follows within a poll"
    );
    let mut closes = Vec::new();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(&lb.ws_url()).await.unwrap();
        closes.push(next_event(&mut ws, Duration::from_secs(10)).await.unwrap());
        held.push(ws);
    }
    assert!(
        closes
            .iter()
            .all(|e| matches!(e, Event::Close(1012, reason) if !reason.is_empty())),
        "{closes:?}"
    );
    let reply = get(lb.addr, "/health").await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(body["status"], "no_shard_available");
    assert_eq!(body["shards_available"], 0);
    assert_eq!(body["shards_total"], 2);

    // Draining: now the LB asks to be taken out of the front load balancer.
    lb.shutdown.start_drain(Duration::from_secs(60));
    let reply = get(lb.addr, "/health").await.unwrap();
    assert_eq!(reply.status, 503);
    let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(body["status"], "draining");
    drop(held);
    lb.shutdown.hard.cancel();
}
