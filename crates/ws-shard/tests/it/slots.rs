//! Slot accounting under mixed connection lifecycles: the live count returns to exactly 0.

use std::time::Duration;

use test_support::http::{get, wait_until};
use test_support::start_shards;
use test_support::ws::{close, connect, raw_upgrade, reset, status_of, subscribe, upgrade_request};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Five ways a connection can end.
async fn one(addr: std::net::SocketAddr, url: String, kind: usize) {
    match kind % 5 {
        // Clean close handshake.
        0 => {
            let mut ws = connect(&url).await.unwrap();
            subscribe(&mut ws, &["slots.test"]).await.unwrap();
            close(ws).await;
        }
        // Upgraded, subscribed, then an abrupt TCP reset.
        1 => {
            let (mut s, head) = raw_upgrade(addr, &upgrade_request("/ws")).await.unwrap();
            assert_eq!(status_of(&head), 101);
            let sub = ws_protocol::frame::encode_masked_frame(
                ws_protocol::frame::OP_TEXT,
                br#"{"type":"subscribe","channels":["slots.test"]}"#,
                [1, 2, 3, 4],
            );
            s.write_all(&sub).await.unwrap();
            reset(s);
        }
        // Upgraded, then a plain FIN without a close frame.
        2 => {
            let (s, head) = raw_upgrade(addr, &upgrade_request("/ws")).await.unwrap();
            assert_eq!(status_of(&head), 101);
            drop(s);
        }
        // Handshake abandoned midway: half a request head, then reset.
        3 => {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let req = upgrade_request("/ws");
            s.write_all(&req.as_bytes()[..req.len() / 2]).await.unwrap();
            reset(s);
        }
        // Full request sent, gone before reading the 101.
        _ => {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(upgrade_request("/ws").as_bytes())
                .await
                .unwrap();
            reset(s);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_mixed_lifecycles_leave_no_slot_behind() {
    let srv = start_shards(1, |c| c.max_connections = 10_000).await;
    let addr = srv.shards[0];
    let url = srv.ws_url(0);
    let total = 5_000;
    let batch = 250;
    for start in (0..total).step_by(batch) {
        let tasks: Vec<_> = (start..start + batch)
            .map(|i| tokio::spawn(one(addr, url.clone(), i)))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    }
    assert!(
        wait_until(Duration::from_secs(20), || async {
            srv.connections(0).await == 0
        })
        .await,
        "slots leaked: {} still taken",
        srv.connections(0).await
    );
    let page = srv.metrics().await;
    let accepted = test_support::http::metric(&page, "ws_shard_connections_accepted_total", &[]);
    assert!(accepted >= 3_000.0, "accepted {accepted}");
    srv.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_shard_answers_503_before_upgrading_and_health_reports_it() {
    let srv = start_shards(1, |c| c.max_connections = 50).await;
    let mut held = Vec::new();
    for _ in 0..50 {
        held.push(connect(&srv.ws_url(0)).await.unwrap());
    }
    let (_, head) = raw_upgrade(srv.shards[0], &upgrade_request("/ws"))
        .await
        .unwrap();
    assert_eq!(status_of(&head), 503, "{head}");
    let h: serde_json::Value =
        serde_json::from_str(&get(srv.shards[0], "/health").await.unwrap().body).unwrap();
    assert_eq!(h["connections"], 50);
    assert_eq!(h["max_connections"], 50);
    assert_eq!(h["status"], "ok");
    let page = srv.metrics().await;
    assert!(
        test_support::http::metric(
            &page,
            "ws_shard_connections_rejected_total",
            &["reason=\"full\""]
        ) >= 1.0
    );
    // Freeing one slot admits the next client.
    close(held.pop().unwrap()).await;
    assert!(
        wait_until(Duration::from_secs(5), || async {
            srv.connections(0).await == 49
        })
        .await
    );
    held.push(connect(&srv.ws_url(0)).await.unwrap());
    drop(held);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            srv.connections(0).await == 0
        })
        .await
    );
    srv.kill();
}
