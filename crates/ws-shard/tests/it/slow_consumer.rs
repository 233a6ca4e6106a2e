//! A client that stops reading is closed with 4000 while others receive everything.

use std::time::Duration;

use futures_util::StreamExt;
use test_support::http::{metric, wait_until, KeepAlive};
use test_support::start_shards;
use test_support::ws::{connect, subscribe, upgrade_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use ws_protocol::frame::{Decoder, Flow, Limits, Message as Frame, Role};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_and_never_slows_the_others() {
    let srv = start_shards(1, |c| {
        c.session.outbound_queue = 64;
        c.socket.send_buffer = Some(16 * 1024);
    })
    .await;
    let channel = "trades.SLOW";
    let messages = 600u64;

    // The slow client: tiny receive buffer, subscribes, then does not read.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut slow = sock.connect(srv.shards[0]).await.unwrap();
    slow.write_all(upgrade_request("/ws").as_bytes())
        .await
        .unwrap();
    let sub = ws_protocol::frame::encode_masked_frame(
        ws_protocol::frame::OP_TEXT,
        format!(r#"{{"type":"subscribe","channels":["{channel}"]}}"#).as_bytes(),
        [9, 8, 7, 6],
    );
    slow.write_all(&sub).await.unwrap();

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
    let mut buf = vec![0u8; 64 * 1024];
    let mut decoder = Decoder::new(Role::Client, Limits::new(1 << 20));
    let mut close_code = None;
    let mut head_done = false;
    let mut pending = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while close_code.is_none() {
            let n = slow.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut data = buf[..n].to_vec();
            if !head_done {
                pending.extend_from_slice(&data);
                let Some(p) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                data = pending.split_off(p + 4);
                head_done = true;
            }
            let _ = decoder.feed(&mut data, &mut |m| {
                if let Frame::Close(c) = m {
                    close_code = c.map(|(code, _)| code);
                    return Flow::Stop;
                }
                Flow::Continue
            });
        }
    })
    .await;
    assert_eq!(close_code, Some(ws_protocol::close::SLOW_CONSUMER));
    srv.kill();
}
