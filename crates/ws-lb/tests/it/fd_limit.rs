//! At its file-descriptor limit ws-lb degrades cleanly. The real binary runs with a small
//! `RLIMIT_NOFILE` (util-linux `prlimit`) and the default `max_clients` (derived from that
//! limit: (96 - 64) / 2 = 16). Filling it: every client beyond the cap gets HTTP 503 before
//! its upgrade, never a silent drop or a hang; the relayed clients keep working; the process
//! idles; no shard's breaker is blamed; once clients leave, new ones get through again.

use std::time::Duration;

use test_support::http::get;
use test_support::servers::{free_port, spawn_binary};
use test_support::start_shards;
use test_support::ws::{connect, next_event, send, Client, Event};
use tokio_tungstenite::tungstenite;
use ws_protocol::ServerMessage;

enum Outcome {
    Relayed(Box<Client>),
    Http503,
}

async fn try_client(url: &str, id: u64) -> Outcome {
    match connect(url).await {
        Err(e) => match e.downcast_ref::<tungstenite::Error>() {
            Some(tungstenite::Error::Http(r)) if r.status() == 503 => Outcome::Http503,
            _ => panic!("client {id}: unexpected connect failure: {e:#}"),
        },
        Ok(mut ws) => {
            send(&mut ws, &format!(r#"{{"type":"ping","id":{id}}}"#))
                .await
                .unwrap();
            match next_event(&mut ws, Duration::from_secs(5)).await.unwrap() {
                Event::Msg(ServerMessage::Pong { id: Some(got) }) if got == id => {
                    Outcome::Relayed(Box::new(ws))
                }
                other => panic!("client {id}: unexpected {other:?}"),
            }
        }
    }
}

/// The real ws-lb binary (`spawn_binary`) on a free port in front of `backends`, with
/// `extra`, under `RLIMIT_NOFILE` `open_files`. Returns it with its client and admin
/// addresses.
async fn spawn_lb(
    backends: &str,
    extra: &[&str],
    open_files: Option<u32>,
) -> (
    tokio::process::Child,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    let listen = free_port();
    let listen_addr = listen.to_string();
    let mut args = vec!["--listen", &listen_addr, "--backend-urls", backends];
    args.extend_from_slice(extra);
    let (child, admin) = spawn_binary(env!("CARGO_BIN_EXE_ws-lb"), &args, open_files, listen).await;
    (child, listen, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_descriptor_limit_new_clients_get_503_and_nothing_spins() {
    let shards = start_shards(2, |_| {}).await;
    let backends: Vec<String> = (0..2).map(|i| shards.ws_url(i)).collect();
    let (mut lb, listen, admin) = spawn_lb(
        &backends.join(","),
        &["--per-ip-rate", "0", "--health-interval", "200ms"],
        Some(96),
    )
    .await;
    let pid = lb.id().unwrap();
    let url = format!("ws://{listen}/ws");

    let (mut held, mut refused) = (Vec::new(), 0u32);
    for id in 0..30 {
        match try_client(&url, id).await {
            Outcome::Relayed(ws) => held.push((id, ws)),
            Outcome::Http503 => refused += 1,
        }
    }
    assert_eq!(held.len(), 16, "the cap derived from the open-files limit");
    assert_eq!(refused, 14);
    let page = get(admin, "/metrics").await.unwrap().body;
    assert_eq!(
        test_support::http::metric(
            &page,
            "ws_lb_admission_rejections_total",
            &["reason=\"client_limit\""]
        ),
        14.0
    );

    // At the cap the process idles: a spinning loop would burn ~2 s of CPU here.
    let before = test_support::cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = test_support::cpu_seconds(pid) - before;
    assert!(used < 0.5, "ws-lb used {used:.2} CPU s in 2 s at its limit");

    // The clients already relayed are unaffected.
    for (id, ws) in &mut held {
        send(ws, &format!(r#"{{"type":"ping","id":{}}}"#, *id + 1000))
            .await
            .unwrap();
        assert!(matches!(
            next_event(ws, Duration::from_secs(5)).await.unwrap(),
            Event::Msg(ServerMessage::Pong { .. })
        ));
    }

    // Make room: the LB takes clients again, and no shard was blamed.
    for (_, ws) in held.drain(..4) {
        test_support::ws::close(*ws).await;
    }
    // The permits come back when the relays end; poll until four new clients are relayed.
    let (mut again, mut id) = (Vec::new(), 100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while again.len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room after clients left"
        );
        if let Outcome::Relayed(ws) = try_client(&url, id).await {
            again.push(ws);
        }
        id += 1;
    }
    assert!(
        matches!(try_client(&url, id).await, Outcome::Http503),
        "the cap holds again"
    );
    let health: serde_json::Value =
        serde_json::from_str(&get(listen, "/health").await.unwrap().body).unwrap();
    for s in health["shards"].as_array().unwrap() {
        assert_eq!(s["breaker"], "closed", "{health}");
    }

    lb.kill().await.unwrap();
    shards.kill();
}

/// ws-lb grows its descriptor table to what its clients will need before its runtime starts
/// (in a multi-threaded process each growth later stalls the threads' `accept`/`socket`
/// for an RCU grace period: the slow first ramp). With `RLIMIT_NOFILE` 5000 the default
/// `max_clients` is (5000 - 64) / 2 = 2468, so 5000 entries; the same binary without it has 256 when idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_descriptor_table_is_grown_before_the_first_client() {
    let shards = start_shards(1, |_| {}).await;
    let (mut lb, _, _) = spawn_lb(&shards.ws_url(0), &[], Some(5000)).await;
    let pid = lb.id().unwrap();
    let entries = net_core::limits::descriptor_table_size(Some(pid)).unwrap_or(0);
    assert!(entries >= 5000, "FDSize {entries}");
    lb.kill().await.unwrap();
}
