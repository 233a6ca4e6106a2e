//! Positions, `since`, duplicates, resync events and reconnect timing per close code.

use std::time::{Duration, Instant};

use serde_json::json;
use ws_client::{
    ClientError, ClientEvent, DisconnectCause, ResyncReason, State, SubscriptionEvent,
};

use crate::{config, connect, next, next_event, seq_of, Server};

#[tokio::test]
async fn delivers_once_in_order_and_resumes_with_since_after_1012() {
    let srv = Server::start().await;
    let client = connect(config(srv.url()));
    let mut sub = client.subscribe("trades.BTC-USD").await.unwrap();
    let mut c = srv.accept().await;
    assert_eq!(
        c.handshake().await,
        json!({"type":"subscribe","channels":["trades.BTC-USD"]})
    );
    c.subscribed("trades.BTC-USD", "e1", 10, false).await;
    for s in [11, 12, 12, 11, 13] {
        c.message("trades.BTC-USD", "e1", s).await;
    }
    assert!(matches!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed {
            seq: 10,
            resubscribe: false,
            ..
        }
    ));
    for want in [11, 12, 13] {
        assert_eq!(seq_of(&next(&mut sub).await), Some((want, false)));
    }
    c.close(1012, "shard lost").await;

    let mut c = srv.accept().await;
    assert_eq!(
        c.handshake().await,
        json!({"type":"subscribe","channels":["trades.BTC-USD"],
               "since":{"trades.BTC-USD":{"epoch":"e1","seq":13}}})
    );
    c.subscribed("trades.BTC-USD", "e1", 15, true).await;
    for s in [14, 15, 16] {
        c.message("trades.BTC-USD", "e1", s).await;
    }
    assert!(matches!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed {
            recovered: true,
            resubscribe: true,
            ..
        }
    ));
    for want in [(14, true), (15, true), (16, false)] {
        assert_eq!(seq_of(&next(&mut sub).await), Some(want));
    }
    client.close();
}

#[tokio::test]
async fn unrecovered_gaps_and_epoch_changes_are_resync_events() {
    let srv = Server::start().await;
    let client = connect(config(srv.url()));
    let mut sub = client
        .subscribe_since(
            "book.ETH-USD",
            ws_client::Position {
                epoch: "old".into(),
                seq: 5,
            },
        )
        .await
        .unwrap();
    let mut c = srv.accept().await;
    assert_eq!(
        c.handshake().await["since"],
        json!({"book.ETH-USD":{"epoch":"old","seq":5}})
    );
    c.subscribed("book.ETH-USD", "new", 3, false).await;
    c.message("book.ETH-USD", "new", 4).await;
    c.message("book.ETH-USD", "gen2", 1).await;
    assert!(matches!(
        next(&mut sub).await,
        SubscriptionEvent::Subscribed { .. }
    ));
    let SubscriptionEvent::Resync(r) = next(&mut sub).await else {
        panic!("expected a resync")
    };
    assert_eq!(r.reason, ResyncReason::NotRecovered);
    assert_eq!((r.previous.epoch.as_str(), r.previous.seq), ("old", 5));
    assert_eq!((r.current.epoch.as_str(), r.current.seq), ("new", 3));
    assert_eq!(seq_of(&next(&mut sub).await), Some((4, false)));
    let SubscriptionEvent::Resync(r) = next(&mut sub).await else {
        panic!("expected a resync")
    };
    assert_eq!(r.reason, ResyncReason::EpochChanged);
    assert_eq!(seq_of(&next(&mut sub).await), Some((1, false)));
    client.close();
}

/// 1013 closes are followed by waits of overload_delay x 2^n, capped (jitter off here).
#[tokio::test]
async fn overload_backs_off_exponentially_to_the_cap() {
    let srv = Server::start().await;
    let client = connect(config(srv.url()));
    let mut last = Instant::now();
    let mut waits = Vec::new();
    for i in 0..5 {
        let c = srv.accept().await;
        if i > 0 {
            waits.push(last.elapsed());
        }
        // Before the close is sent: the client's wait starts when it reads it, later.
        last = Instant::now();
        c.close(1013, "Server temporarily overloaded, please retry")
            .await;
    }
    // Expected 100, 200, 400, 400 ms; a timer never fires early, and a loaded machine may
    // add latency, so the check is [expected, expected + 1 s).
    for (w, want) in waits.iter().zip([100u64, 200, 400, 400]) {
        let want = Duration::from_millis(want);
        assert!(
            *w >= want && *w < want + Duration::from_secs(1),
            "{waits:?}"
        );
    }
    client.close();
}

#[tokio::test]
async fn protocol_errors_are_surfaced_and_not_retried() {
    for code in [1002u16, 1007, 1008, 1009] {
        let srv = Server::start().await;
        let client = connect(config(srv.url()));
        let mut ev = client.events();
        let mut c = srv.accept().await;
        let _ = c.recv_type("ping").await;
        c.close(code, "bad client").await;
        let e = next_event(&mut ev, |e| matches!(e, ClientEvent::Error(_))).await;
        assert_eq!(
            e,
            ClientEvent::Error(ClientError::FatalClose {
                code,
                reason: "bad client".into()
            })
        );
        let d = next_event(&mut ev, |e| matches!(e, ClientEvent::Disconnected(_))).await;
        assert!(matches!(d, ClientEvent::Disconnected(d) if d.reconnect_in.is_none()));
        // Well past every backoff of the test config: no new attempt.
        assert!(srv.accept_within(Duration::from_secs(1)).await.is_none());
        assert_eq!(client.state(), State::Disconnected);
        // The application decides to try again.
        client.reconnect();
        let _ = srv.accept().await;
        client.close();
    }
}

#[tokio::test]
async fn a_dead_path_is_found_by_ping_and_left_promptly() {
    let srv = Server::start().await;
    let mut cfg = config(srv.url());
    cfg.ping_interval = Duration::from_millis(200);
    cfg.pong_timeout = Duration::from_millis(300);
    let client = connect(cfg);
    let mut ev = client.events();
    let mut sub = client.subscribe("trades.SOL-USD").await.unwrap();
    let mut c = srv.accept().await;
    // Before anything the client could arm its ping timer on: the wait measured from here
    // is never shorter than the client's.
    let t0 = Instant::now();
    c.handshake().await;
    c.subscribed("trades.SOL-USD", "e", 7, false).await;
    let _ = next(&mut sub).await;
    // From now on the server reads but never answers: a path that died silently.
    let silent = tokio::spawn(async move {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = c.ws.next().await {}
    });
    let d = next_event(&mut ev, |e| matches!(e, ClientEvent::Disconnected(_))).await;
    let ClientEvent::Disconnected(d) = d else {
        unreachable!()
    };
    assert_eq!(d.cause, DisconnectCause::PingTimeout);
    assert!(d.healthy);
    // Next ping after 200 ms, given up 300 ms later.
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    let mut c2 = srv.accept().await;
    assert_eq!(
        c2.handshake().await["since"],
        json!({"trades.SOL-USD":{"epoch":"e","seq":7}})
    );
    silent.abort();
    client.close();
}

#[tokio::test]
async fn a_reader_that_falls_behind_gets_a_lagged_resync_not_a_silent_gap() {
    let srv = Server::start().await;
    let mut cfg = config(srv.url());
    cfg.subscription_buffer = 4;
    let client = connect(cfg);
    let mut sub = client.subscribe("x").await.unwrap();
    let mut c = srv.accept().await;
    c.handshake().await;
    c.subscribed("x", "e", 0, false).await;
    for s in 1..=20 {
        c.message("x", "e", s).await;
    }
    // An error reply after the messages: once it is reported, the client has handled them.
    let mut ev = client.events();
    c.send(json!({"type":"error","code":"probe","message":""}))
        .await;
    let _ = next_event(&mut ev, |e| matches!(e, ClientEvent::Error(_))).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next(&mut sub).await);
    }
    c.message("x", "e", 21).await;
    let after = [next(&mut sub).await, next(&mut sub).await];
    assert!(matches!(got[0], SubscriptionEvent::Subscribed { .. }));
    assert_eq!(
        got[1..].iter().map(seq_of).collect::<Vec<_>>(),
        [Some((1, false)), Some((2, false)), Some((3, false))]
    );
    let SubscriptionEvent::Resync(r) = &after[0] else {
        panic!("expected a lagged resync, got {after:?}")
    };
    assert_eq!(r.reason, ResyncReason::Lagged);
    assert_eq!(r.previous.seq, 3);
    assert_eq!(seq_of(&after[1]), Some((21, false)));
    client.close();
}
