//! The happy path and the relay's own close behaviour.

use std::time::Duration;

use test_support::http::{metric, KeepAlive};
use test_support::ws::{connect, next_event, next_msg, subscribe, Event};
use test_support::{start_lb, start_shards};
use ws_protocol::ServerMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_through_the_lb_receives_published_messages() {
    let shards = start_shards(3, |_| {}).await;
    let lb = start_lb((0..3).map(|i| shards.ws_url(i)).collect(), |_| {}).await;
    let mut clients = Vec::new();
    for _ in 0..30 {
        let mut ws = connect(&lb.ws_url()).await.unwrap();
        subscribe(&mut ws, &["trades.BTC-USD"]).await.unwrap();
        clients.push(ws);
    }
    let mut admin = KeepAlive::connect(shards.admin).await.unwrap();
    for i in 0..100 {
        admin
            .publish("trades.BTC-USD", &format!(r#"{{"i":{i}}}"#))
            .await
            .unwrap();
    }
    for ws in &mut clients {
        for seq in 1..=100u64 {
            match next_msg(ws).await.unwrap() {
                ServerMessage::Message { seq: got, .. } => assert_eq!(got, seq),
                other => panic!("{other:?}"),
            }
        }
    }
    // The clients were spread over the shards.
    let mut per_shard = Vec::new();
    for i in 0..3 {
        per_shard.push(shards.connections(i).await);
    }
    assert_eq!(per_shard.iter().sum::<u64>(), 30);
    assert!(
        per_shard.iter().filter(|c| **c > 0).count() >= 2,
        "{per_shard:?}"
    );
    assert!(metric(&lb.metrics().await, "ws_lb_active_connections", &[]) >= 30.0);
    // A clean close through the relay releases the shard's slot.
    for ws in clients {
        test_support::ws::close(ws).await;
    }
    for i in 0..3 {
        assert!(
            test_support::http::wait_until(Duration::from_secs(5), || async {
                shards.connections(i).await == 0
            })
            .await
        );
    }
    shards.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_allow_list_refuses_before_any_shard_is_dialled() {
    let shards = start_shards(1, |_| {}).await;
    let lb = start_lb(vec![shards.ws_url(0)], |c| {
        c.allowed_origins = vec!["https://app.example.com".into()]
    })
    .await;
    let req = test_support::ws::upgrade_request("/ws").replace(
        "Host: test\r\n",
        "Host: test\r\nOrigin: https://evil.example\r\n",
    );
    let (_, head) = test_support::ws::raw_upgrade(lb.addr, &req).await.unwrap();
    assert_eq!(test_support::ws::status_of(&head), 403);
    assert_eq!(shards.connections(0).await, 0);
    let page = lb.metrics().await;
    assert!(
        metric(
            &page,
            "ws_lb_admission_rejections_total",
            &["reason=\"origin\""]
        ) >= 1.0
    );
    let ok = test_support::ws::upgrade_request("/ws").replace(
        "Host: test\r\n",
        "Host: test\r\nOrigin: https://app.example.com\r\n",
    );
    let (_, head) = test_support::ws::raw_upgrade(lb.addr, &ok).await.unwrap();
    assert_eq!(test_support::ws::status_of(&head), 101);
    shards.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_drain_sends_1012_to_relayed_clients() {
    let shards = start_shards(1, |_| {}).await;
    let lb = start_lb(vec![shards.ws_url(0)], |c| {
        c.drain_window = Duration::from_millis(300)
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(connect(&lb.ws_url()).await.unwrap());
    }
    lb.shutdown.start_drain(Duration::from_secs(5));
    for mut ws in clients {
        match next_event(&mut ws, Duration::from_secs(5)).await.unwrap() {
            Event::Close(code, _) => assert_eq!(code, 1012),
            other => panic!("{other:?}"),
        }
    }
    let left = tokio::time::timeout(Duration::from_secs(6), lb.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(left, 0);
    assert!(
        test_support::http::wait_until(Duration::from_secs(5), || async {
            shards.connections(0).await == 0
        })
        .await
    );
    shards.kill();
}
