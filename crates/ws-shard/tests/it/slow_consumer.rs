//! A client that stops reading is closed with 4000 while others receive everything.

use std::time::Duration;

use futures_util::StreamExt;
use test_support::http::{metric, wait_until, KeepAlive};
use test_support::start_shards;
use test_support::ws::{connect, raw_subscriber, read_close_code, subscribe};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_and_never_slows_the_others() {
    let srv = start_shards(1, |c| {
        c.session.outbound_queue = 64;
        c.socket.send_buffer = Some(16 * 1024);
        // The slow client reads its close only after the fast readers are done; on a loaded
        // machine that takes longer than the test default of 2 s, after which the shard
        // rightly gives up on the close handshake and the 4000 is never written.
        c.session.close_timeout = Duration::from_secs(60);
    })
    .await;
    let channel = "trades.SLOW";
    let messages = 600u64;

    // The slow client: tiny receive buffer, subscribes, then does not read.
    let mut slow = raw_subscriber(srv.shards[0], channel, 4096).await.unwrap();

    // 100 normal subscribers, each reading everything in its own task.
    let mut readers = Vec::new();
    for _ in 0..100 {
        let mut ws = connect(&srv.ws_url(0)).await.unwrap();
        subscribe(&mut ws, &[channel]).await.unwrap();
        readers.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            while seqs.len() < messages as usize {
                match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        if let Ok(ws_protocol::ServerMessage::Message { seq, .. }) =
                            ws_protocol::ServerMessage::decode(t.as_bytes())
                        {
                            seqs.push(seq);
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    other => panic!("fast reader failed: {other:?}"),
                }
            }
            seqs
        }));
    }

    let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(2000));
    let mut admin = KeepAlive::connect(srv.admin).await.unwrap();
    for _ in 0..messages {
        admin.publish(channel, &payload).await.unwrap();
    }
    for r in readers {
        let seqs = r.await.unwrap();
        assert_eq!(
            seqs,
            (1..=messages).collect::<Vec<_>>(),
            "every message, in order"
        );
    }
    assert!(
        wait_until(Duration::from_secs(10), || async {
            metric(
                &srv.metrics().await,
                "ws_shard_slow_consumer_disconnects_total",
                &[],
            ) >= 1.0
        })
        .await
    );

    // Now the slow client reads: some messages, then a close frame with 4000.
    let close_code = read_close_code(&mut slow, true, Duration::from_secs(10)).await;
    assert_eq!(close_code, Some(ws_protocol::close::SLOW_CONSUMER));
    srv.kill();
}

/// A slow consumer waits out the close deadline quietly. Regression: while the 4000 close
/// frame could not be written, a ping deadline that passed (the connection was older than
/// `--ping-interval`) fired again and again without changing anything, so the session spun
/// a core until the close deadline; 200 such clients stalled everyone's deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_slow_consumer_does_not_spin() {
    let (mut shard, port, admin) = crate::spawn_shard(
        &[
            "--client-rate",
            "0",
            "--outbound-queue",
            "8",
            "--socket-send-buffer",
            "4096",
            "--ping-interval",
            "1s",
            "--close-timeout",
            "6s",
        ],
        None,
    )
    .await;
    let pid = shard.id().unwrap();
    let channel = "trades.SPIN";
    let slow = raw_subscriber(port, channel, 4096).await.unwrap();
    let page = || async {
        test_support::http::get(admin, "/metrics")
            .await
            .unwrap()
            .body
    };
    assert!(
        wait_until(Duration::from_secs(5), || async {
            metric(&page().await, "ws_shard_subscriptions", &[]) == 1.0
        })
        .await,
        "the raw client never subscribed"
    );

    // Overflow its queue: it is sent 4000 but cannot take it.
    let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(8000));
    let mut publisher = KeepAlive::connect(admin).await.unwrap();
    let slow_closed = || async {
        metric(
            &page().await,
            "ws_shard_slow_consumer_disconnects_total",
            &[],
        ) >= 1.0
    };
    for _ in 0..200 {
        publisher.publish(channel, &payload).await.unwrap();
        if slow_closed().await {
            break;
        }
    }
    assert!(slow_closed().await, "the client was never found slow");
    let connections = || async { metric(&page().await, "ws_shard_connections", &[]) };
    assert_eq!(connections().await, 1.0, "still waiting for the close");

    // The connection is older than the ping interval from here on. Over the next 2.5 s (well
    // inside the 6 s close deadline) the shard has nothing to do.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = test_support::cpu_seconds(pid);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let used = test_support::cpu_seconds(pid) - before;
    eprintln!(
        "ws-shard CPU while one slow consumer waits out its close deadline: {used:.3} s in 2.5 s"
    );
    assert!(
        used < 0.5,
        "ws-shard used {used:.2} CPU s in 2.5 s waiting for one close"
    );
    // And the deadline still ends it: the slot is released without the client reading.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            connections().await == 0.0
        })
        .await,
        "the slow consumer's slot was never released"
    );
    drop(slow);
    let _ = shard.kill().await;
}
