//! The happy path and the relay's own close behaviour.

use std::time::Duration;

use test_support::http::{metric, KeepAlive};
use test_support::ws::{connect, next_event, next_msg, subscribe, Event};
use test_support::{start_lb, start_shards};
use ws_protocol::ServerMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_through_the_lb_receives_published_messages() {
    client_through_the_lb_receives_published_messages_case(false).await;
}

/// The same over the tier link (`tier_mux`): one TCP connection per shard carries every client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_through_the_lb_receives_published_messages_over_the_tier_link() {
    client_through_the_lb_receives_published_messages_case(true).await;
}

async fn client_through_the_lb_receives_published_messages_case(mux: bool) {
    let shards = start_shards(3, |_| {}).await;
    let lb = start_lb((0..3).map(|i| shards.ws_url(i)).collect(), |c| {
        c.tier_mux = mux
    })
    .await;
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
    // Over the tier link: one link per shard in use, whatever the number of clients; without
    // it, none.
    let links = metric(&shards.metrics().await, "ws_shard_tier_links", &[]);
    let in_use = per_shard.iter().filter(|c| **c > 0).count() as f64;
    assert_eq!(links, if mux { in_use } else { 0.0 });
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
    lb_drain_sends_1012_to_relayed_clients_case(false).await;
}

/// The same over the tier link (`tier_mux`): one TCP connection per shard carries every client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_drain_sends_1012_to_relayed_clients_over_the_tier_link() {
    lb_drain_sends_1012_to_relayed_clients_case(true).await;
}

async fn lb_drain_sends_1012_to_relayed_clients_case(mux: bool) {
    let shards = start_shards(1, |_| {}).await;
    let lb = start_lb(vec![shards.ws_url(0)], |c| {
        c.tier_mux = mux;
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

/// A client that subscribes and then never reads, while keeping its TCP connection open.
/// Its shard closes it as a slow consumer, but that close waits behind the bytes the client
/// does not take, so only the LB's stall timeout frees the relay (two descriptors and a
/// `max_clients` place). A client reading the same channel is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_after_the_stall_timeout() {
    a_client_that_stops_reading_is_dropped_after_the_stall_timeout_case(false).await;
}

/// The same over the tier link (`tier_mux`): one TCP connection per shard carries every client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_after_the_stall_timeout_over_the_tier_link() {
    a_client_that_stops_reading_is_dropped_after_the_stall_timeout_case(true).await;
}

async fn a_client_that_stops_reading_is_dropped_after_the_stall_timeout_case(mux: bool) {
    let shards = start_shards(1, |c| {
        c.session.outbound_queue = 8;
        c.socket.send_buffer = Some(4096);
    })
    .await;
    let lb = start_lb(vec![shards.ws_url(0)], |c| {
        c.tier_mux = mux;
        c.stall_timeout = Duration::from_secs(2);
        c.socket.send_buffer = Some(4096);
    })
    .await;
    let channel = "trades.STALL";
    let mut reader = connect(&lb.ws_url()).await.unwrap();
    subscribe(&mut reader, &[channel]).await.unwrap();

    let stalled = test_support::ws::raw_subscriber(lb.addr, channel, 4096)
        .await
        .unwrap();
    let lb_metric = |name: &'static str, labels: &'static [&'static str]| {
        let lb = &lb;
        async move { metric(&lb.metrics().await, name, labels) }
    };
    assert!(
        test_support::http::wait_until(Duration::from_secs(5), || async {
            shards.connections(0).await == 2
        })
        .await
    );

    // 400 messages of 8 KB: far more than the stalled client's buffers and queue hold. The
    // reader takes each one before the next is published, so its own queue never fills.
    let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(8000));
    let mut admin = KeepAlive::connect(shards.admin).await.unwrap();
    for seq in 1..=400u64 {
        admin.publish(channel, &payload).await.unwrap();
        match next_msg(&mut reader).await.unwrap() {
            ServerMessage::Message { seq: got, .. } => assert_eq!(got, seq),
            other => panic!("{other:?}"),
        }
    }
    // The shard gave up on it (slow consumer, then its close deadline) ...
    assert!(
        test_support::http::wait_until(Duration::from_secs(10), || async {
            shards.connections(0).await == 1
        })
        .await,
        "the shard never released the stalled client"
    );
    // ... and the LB drops the relay after the stall timeout, not later.
    assert!(
        test_support::http::wait_until(Duration::from_secs(10), || async {
            lb_metric("ws_lb_active_connections", &[]).await == 1.0
        })
        .await,
        "the stalled client's relay was never released"
    );
    assert_eq!(
        lb_metric("ws_lb_relay_ends_total", &["end=\"client_stalled\""]).await,
        1.0
    );
    // The reader is still served.
    admin.publish(channel, r#"{"after":1}"#).await.unwrap();
    match next_msg(&mut reader).await.unwrap() {
        ServerMessage::Message { seq, .. } => assert_eq!(seq, 401),
        other => panic!("{other:?}"),
    }
    drop(stalled);
    shards.kill();
}

/// A shard that completed the handshake and then stopped reading: once it has taken none
/// of the client's bytes for the stall timeout, the LB handles it as a lost shard and the
/// client gets 1012.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_stops_reading_is_handled_as_lost() {
    use test_support::ws::{raw_upgrade, status_of, upgrade_request};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // The deaf shard: answers upgrades, then never reads again (health polls are dropped).
    let deaf = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let deaf_addr = deaf.local_addr().unwrap();
    let deaf_task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = deaf.accept().await {
            let mut head = Vec::new();
            let mut b = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&b[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).to_string();
            let key = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_owned())
            });
            if let Some(key) = key {
                let accept = ws_protocol::handshake::accept_key(&key);
                let reply = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
                s.write_all(reply.as_bytes()).await.unwrap();
                held.push(s);
            }
        }
    });
    let lb = start_lb(vec![format!("ws://{deaf_addr}/ws")], |c| {
        c.stall_timeout = Duration::from_secs(2);
    })
    .await;
    let (client, head) = raw_upgrade(lb.addr, &upgrade_request("/ws")).await.unwrap();
    assert_eq!(status_of(&head), 101, "{head}");
    let (mut rd, mut wr) = client.into_split();
    // The client keeps sending 64 KB binary messages; the shard takes none of them.
    let writer = tokio::spawn(async move {
        let frame = ws_protocol::frame::encode_masked_frame(
            ws_protocol::frame::OP_BINARY,
            &[7u8; 65536],
            [1, 2, 3, 4],
        );
        while wr.write_all(&frame).await.is_ok() {}
    });
    let close_code =
        test_support::ws::read_close_code(&mut rd, false, Duration::from_secs(15)).await;
    assert_eq!(close_code, Some(ws_protocol::close::SERVICE_RESTART));
    writer.abort();
    assert!(
        test_support::http::wait_until(Duration::from_secs(10), || async {
            metric(&lb.metrics().await, "ws_lb_active_connections", &[]) == 0.0
        })
        .await,
        "the relay was never released"
    );
    assert_eq!(
        metric(
            &lb.metrics().await,
            "ws_lb_relay_ends_total",
            &["end=\"shard_lost\""]
        ),
        1.0
    );
    deaf_task.abort();
}
