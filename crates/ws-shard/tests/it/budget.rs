//! The registry's memory bound through a real server: the cap on channels that carry
//! nothing, idle channels leaving, history evicted over the budget — and `since` answered
//! honestly after each.

use std::time::Duration;

use test_support::http::{metric, wait_until, KeepAlive};
use test_support::start_shards;
use test_support::ws::{connect, next_msg, send, subscribe, Client};
use ws_protocol::{ErrorCode, ServerMessage};

async fn subscribe_since(ws: &mut Client, channel: &str, epoch: &str, seq: u64) -> ServerMessage {
    send(
        ws,
        &format!(
            r#"{{"type":"subscribe","channels":["{channel}"],"since":{{"{channel}":{{"epoch":"{epoch}","seq":{seq}}}}}}}"#
        ),
    )
    .await
    .unwrap();
    next_msg(ws).await.unwrap()
}

fn message_seq(m: ServerMessage) -> u64 {
    match m {
        ServerMessage::Message { seq, .. } => seq,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_that_carry_nothing_are_capped_with_a_clear_error() {
    let srv = start_shards(1, |c| c.hub.max_empty_channels = 3).await;
    let mut ws = connect(&srv.ws_url(0)).await.unwrap();
    subscribe(&mut ws, &["e.a", "e.b", "e.c"]).await.unwrap();
    send(&mut ws, r#"{"type":"subscribe","channels":["e.d"]}"#)
        .await
        .unwrap();
    match next_msg(&mut ws).await.unwrap() {
        ServerMessage::Error {
            code: ErrorCode::TooManyChannels,
            channel: Some(c),
            message,
        } => {
            assert_eq!(c, "e.d");
            assert!(message.contains("max_empty_channels"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The connection stays usable; channels that carry messages, and placeholders that
    // exist, can still be subscribed by anyone.
    let mut admin = KeepAlive::connect(srv.admin).await.unwrap();
    admin.publish("busy", "1").await.unwrap();
    let mut other = connect(&srv.ws_url(0)).await.unwrap();
    let r = subscribe(&mut other, &["busy", "e.a"]).await.unwrap();
    assert!(
        r.iter()
            .all(|m| matches!(m, ServerMessage::Subscribed { .. })),
        "{r:?}"
    );
    // Leaving gives the place back.
    send(&mut ws, r#"{"type":"unsubscribe","channels":["e.b"]}"#)
        .await
        .unwrap();
    next_msg(&mut ws).await.unwrap();
    let r = subscribe(&mut ws, &["e.d"]).await.unwrap();
    assert!(matches!(r[0], ServerMessage::Subscribed { .. }), "{r:?}");
    assert!(
        wait_until(Duration::from_secs(5), || async {
            let page = srv.metrics().await;
            metric(
                &page,
                "ws_shard_error_replies_total",
                &["code=\"too_many_channels\""],
            ) == 1.0
                && metric(&page, "ws_shard_empty_channels", &[]) == 3.0
        })
        .await
    );
    srv.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_channels_leave_and_since_stays_honest() {
    let srv = start_shards(1, |c| {
        c.hub.channel_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let mut admin = KeepAlive::connect(srv.admin).await.unwrap();
    let mut ws = connect(&srv.ws_url(0)).await.unwrap();
    let sub = subscribe(&mut ws, &["quiet"]).await.unwrap();
    let ServerMessage::Subscribed { epoch, .. } = &sub[0] else {
        panic!("{sub:?}")
    };
    for i in 1..=5 {
        admin.publish("quiet", &i.to_string()).await.unwrap();
    }
    for i in 1..=5 {
        assert_eq!(message_seq(next_msg(&mut ws).await.unwrap()), i);
    }
    drop(ws);
    // No subscriber, no message: the channel leaves the registry, its position kept.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let page = srv.metrics().await;
            metric(
                &page,
                "ws_shard_channel_evictions_total",
                &["cause=\"idle\""],
            ) >= 1.0
                && metric(&page, "ws_shard_channel_positions", &[]) == 1.0
                && metric(&page, "ws_shard_channels", &[]) == 0.0
        })
        .await
    );
    let mut late = connect(&srv.ws_url(0)).await.unwrap();
    match subscribe_since(&mut late, "quiet", epoch, 3).await {
        ServerMessage::Subscribed {
            recovered: false,
            seq: 5,
            ..
        } => {}
        other => panic!("missed 4 and 5, whose history is gone: {other:?}"),
    }
    let mut current = connect(&srv.ws_url(0)).await.unwrap();
    match subscribe_since(&mut current, "quiet", epoch, 5).await {
        ServerMessage::Subscribed {
            recovered: true,
            seq: 5,
            ..
        } => {}
        other => panic!("missed nothing: {other:?}"),
    }
    assert_eq!(admin.publish("quiet", "6").await.unwrap(), 6);
    assert_eq!(message_seq(next_msg(&mut current).await.unwrap()), 6);
    assert_eq!(message_seq(next_msg(&mut late).await.unwrap()), 6);
    srv.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_budget_one_off_keys_go_and_hot_channels_keep_fan_out_and_history() {
    let budget = shard_core::config::MIN_HISTORY_BUDGET;
    let srv = start_shards(1, |c| c.hub.history_budget = budget).await;
    let mut admin = KeepAlive::connect(srv.admin).await.unwrap();
    let mut hot = connect(&srv.ws_url(0)).await.unwrap();
    let sub = subscribe(&mut hot, &["hot"]).await.unwrap();
    let ServerMessage::Subscribed { epoch, .. } = &sub[0] else {
        panic!("{sub:?}")
    };
    let mut hot_seq = 0;
    for i in 0..15_000u64 {
        admin
            .publish(&format!("user.u{i}"), r#"{"balance":12345.5,"ccy":"USD"}"#)
            .await
            .unwrap();
        if i % 100 == 99 {
            hot_seq = admin.publish("hot", &i.to_string()).await.unwrap();
        }
    }
    for expected in 1..=hot_seq {
        assert_eq!(message_seq(next_msg(&mut hot).await.unwrap()), expected);
    }
    let page = srv.metrics().await;
    assert!(
        metric(
            &page,
            "ws_shard_channel_evictions_total",
            &["cause=\"budget\""]
        ) > 0.0
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            let page = srv.metrics().await;
            let bytes = metric(&page, "ws_shard_history_bytes", &[]);
            bytes > 0.0 && bytes <= budget as f64
        })
        .await
    );
    // The hot channel recovers exactly; an early key's message is gone and says so.
    let mut rec = connect(&srv.ws_url(0)).await.unwrap();
    match subscribe_since(&mut rec, "hot", epoch, hot_seq - 100).await {
        ServerMessage::Subscribed {
            recovered: true, ..
        } => {}
        other => panic!("{other:?}"),
    }
    for expected in hot_seq - 99..=hot_seq {
        assert_eq!(message_seq(next_msg(&mut rec).await.unwrap()), expected);
    }
    match subscribe_since(&mut rec, "user.u0", epoch, 0).await {
        ServerMessage::Subscribed {
            recovered: false, ..
        } => {}
        other => panic!("user.u0's message was evicted: {other:?}"),
    }
    srv.kill();
}
