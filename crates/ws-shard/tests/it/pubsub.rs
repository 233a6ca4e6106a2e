//! Subscribe, publish, order, recovery with `since`, error replies.

use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use test_support::http::KeepAlive;
use test_support::start_shards;
use test_support::ws::{connect, next_event, next_msg, send, subscribe, Event};
use ws_protocol::{ErrorCode, ServerMessage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_receives_published_messages_in_order() {
    let srv = start_shards(2, |_| {}).await;
    let mut ws = connect(&srv.ws_url(1)).await.unwrap();
    let sub = subscribe(&mut ws, &["trades.BTC-USD"]).await.unwrap();
    let ServerMessage::Subscribed {
        seq: 0,
        recovered: false,
        ..
    } = &sub[0]
    else {
        panic!("{sub:?}")
    };
    let mut admin = KeepAlive::connect(srv.admin).await.unwrap();
    for i in 0..200 {
        admin
            .publish("trades.BTC-USD", &format!(r#"{{"px":{i}}}"#))
            .await
            .unwrap();
    }
    for i in 0..200u64 {
        match next_msg(&mut ws).await.unwrap() {
            ServerMessage::Message {
                channel, seq, data, ..
            } => {
                assert_eq!(channel, "trades.BTC-USD");
                assert_eq!(seq, i + 1, "seq strictly increasing from 1");
                assert_eq!(data["px"], i);
            }
            other => panic!("{other:?}"),
        }
    }
    srv.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_recovers_exactly_the_missed_messages_then_continues_live() {
    let srv = start_shards(2, |_| {}).await;
    let mut admin = KeepAlive::connect(srv.admin).await.unwrap();
    let mut ws = connect(&srv.ws_url(0)).await.unwrap();
    subscribe(&mut ws, &["book.ETH-USD"]).await.unwrap();
    for i in 0..10 {
        admin.publish("book.ETH-USD", &i.to_string()).await.unwrap();
    }
    let mut last = None;
    for _ in 0..10 {
        if let ServerMessage::Message { epoch, seq, .. } = next_msg(&mut ws).await.unwrap() {
            last = Some((epoch, seq));
        }
    }
    let (epoch, seq) = last.unwrap();
    assert_eq!(seq, 10);
    drop(ws);
    for i in 10..60 {
        admin.publish("book.ETH-USD", &i.to_string()).await.unwrap();
    }
    // Reconnect to the *other* shard of the process: positions are shared.
    let mut ws = connect(&srv.ws_url(1)).await.unwrap();
    let req = format!(
        r#"{{"type":"subscribe","channels":["book.ETH-USD"],"since":{{"book.ETH-USD":{{"epoch":"{epoch}","seq":{seq}}}}}}}"#
    );
    send(&mut ws, &req).await.unwrap();
    match next_msg(&mut ws).await.unwrap() {
        ServerMessage::Subscribed {
            recovered: true,
            seq: 60,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    for expected in 11..=60u64 {
        match next_msg(&mut ws).await.unwrap() {
            ServerMessage::Message { seq, data, .. } => {
                assert_eq!(seq, expected);
                assert_eq!(data, serde_json::json!(expected - 1));
            }
            other => panic!("{other:?}"),
        }
    }
    admin.publish("book.ETH-USD", "\"live\"").await.unwrap();
    match next_msg(&mut ws).await.unwrap() {
        ServerMessage::Message { seq: 61, data, .. } => assert_eq!(data, "live"),
        other => panic!("{other:?}"),
    }
    // Nothing else: no duplicate of the replayed range.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), next_msg(&mut ws))
            .await
            .is_err()
    );

    // An unknown epoch is never trusted.
    let mut ws2 = connect(&srv.ws_url(0)).await.unwrap();
    send(&mut ws2, r#"{"type":"subscribe","channels":["book.ETH-USD"],"since":{"book.ETH-USD":{"epoch":"old-run","seq":5}}}"#).await.unwrap();
    match next_msg(&mut ws2).await.unwrap() {
        ServerMessage::Subscribed {
            recovered: false,
            seq: 61,
            ..
        } => {}
        other => panic!("{other:?}"),
    }
    admin.publish("book.ETH-USD", "62").await.unwrap();
    assert!(matches!(
        next_msg(&mut ws2).await.unwrap(),
        ServerMessage::Message { seq: 62, .. }
    ));
    srv.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_replies_and_the_connection_stays_usable() {
    let srv = start_shards(1, |c| c.session.max_subscriptions = 2).await;
    let mut ws = connect(&srv.ws_url(0)).await.unwrap();
    let code = |m: ServerMessage| match m {
        ServerMessage::Error { code, .. } => code,
        other => panic!("{other:?}"),
    };
    send(&mut ws, "{not json").await.unwrap();
    assert_eq!(
        code(next_msg(&mut ws).await.unwrap()),
        ErrorCode::InvalidJson
    );
    send(&mut ws, r#"{"type":"dance"}"#).await.unwrap();
    assert_eq!(
        code(next_msg(&mut ws).await.unwrap()),
        ErrorCode::UnknownType
    );
    send(
        &mut ws,
        r#"{"type":"subscribe","channels":["bad channel!"]}"#,
    )
    .await
    .unwrap();
    assert_eq!(
        code(next_msg(&mut ws).await.unwrap()),
        ErrorCode::InvalidChannel
    );
    send(&mut ws, r#"{"type":"subscribe","channels":"x"}"#)
        .await
        .unwrap();
    assert_eq!(
        code(next_msg(&mut ws).await.unwrap()),
        ErrorCode::InvalidMessage
    );
    send(&mut ws, r#"{"type":"unsubscribe","channels":["never"]}"#)
        .await
        .unwrap();
    assert_eq!(
        code(next_msg(&mut ws).await.unwrap()),
        ErrorCode::NotSubscribed
    );
    subscribe(&mut ws, &["a", "b"]).await.unwrap();
    send(&mut ws, r#"{"type":"subscribe","channels":["a","c"]}"#)
        .await
        .unwrap();
    assert_eq!(
        code(next_msg(&mut ws).await.unwrap()),
        ErrorCode::AlreadySubscribed
    );
    assert_eq!(
        code(next_msg(&mut ws).await.unwrap()),
        ErrorCode::TooManySubscriptions
    );
    ws.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(
        code(next_msg(&mut ws).await.unwrap()),
        ErrorCode::BinaryNotSupported
    );
    // Still usable.
    send(&mut ws, r#"{"type":"ping","id":7}"#).await.unwrap();
    assert_eq!(
        next_msg(&mut ws).await.unwrap(),
        ServerMessage::Pong { id: Some(7) }
    );
    send(&mut ws, r#"{"type":"unsubscribe","channels":["a"]}"#)
        .await
        .unwrap();
    assert_eq!(
        next_msg(&mut ws).await.unwrap(),
        ServerMessage::Unsubscribed {
            channel: "a".into()
        }
    );
    let mut admin = KeepAlive::connect(srv.admin).await.unwrap();
    admin.publish("a", "1").await.unwrap();
    admin.publish("b", "2").await.unwrap();
    match next_msg(&mut ws).await.unwrap() {
        ServerMessage::Message { channel, .. } => {
            assert_eq!(channel, "b", "no message after unsubscribed")
        }
        other => panic!("{other:?}"),
    }
    srv.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_endpoint_validates_input() {
    let srv = start_shards(1, |_| {}).await;
    let post = |body: &'static str| async move {
        test_support::http::call(srv.admin, "POST", "/publish", Some(body))
            .await
            .unwrap()
    };
    assert_eq!(
        post(r#"{"channel":"ok.chan","data":{"x":[1,2]}}"#)
            .await
            .status,
        202
    );
    let r = post(r#"{"channel":"bad chan","data":1}"#).await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("invalid_channel"), "{}", r.body);
    assert!(post(r#"{"channel":"x"}"#).await.status >= 400);
    assert!(post("not json").await.status >= 400);
    srv.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peers_are_pinged_then_closed() {
    let srv = start_shards(1, |c| {
        // The ping is due at 200 ms; the idle timeout leaves a loaded machine's timers
        // 1.8 s to send it before the connection counts as dead without one.
        c.session.ping_interval = Duration::from_millis(200);
        c.session.idle_timeout = Duration::from_millis(2000);
        c.session.close_timeout = Duration::from_millis(300);
    })
    .await;
    // A raw client that completes the upgrade and then never answers anything.
    let (mut s, head) =
        test_support::ws::raw_upgrade(srv.shards[0], &test_support::ws::upgrade_request("/ws"))
            .await
            .unwrap();
    assert_eq!(test_support::ws::status_of(&head), 101);
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "server closed the dead connection");
    // A ping (0x89, empty) and then a close frame with 1001.
    assert_eq!(&got[..2], &[0x89, 0x00], "{got:?}");
    assert_eq!(got[2], 0x88);
    assert_eq!(u16::from_be_bytes([got[4], got[5]]), 1001);
    assert!(
        test_support::http::wait_until(Duration::from_secs(3), || async {
            srv.connections(0).await == 0
        })
        .await
    );
    srv.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_close_with_1009() {
    let srv = start_shards(1, |c| c.session.max_message_size = 1024).await;
    let mut ws = connect(&srv.ws_url(0)).await.unwrap();
    send(
        &mut ws,
        &format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(2000)),
    )
    .await
    .unwrap();
    match next_event(&mut ws, Duration::from_secs(5)).await.unwrap() {
        Event::Close(code, _) => assert_eq!(code, 1009),
        other => panic!("{other:?}"),
    }
    srv.kill();
}
