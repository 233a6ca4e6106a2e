//! Hostile input at a shard port: each case gets its documented answer and leaves the slot
//! count at its baseline.

use std::time::Duration;

use futures_util::SinkExt;
use test_support::http::wait_until;
use test_support::start_shards;
use test_support::ws::{
    connect, next_event, raw_upgrade, slowloris_cut_after, status_of, upgrade_request, Event,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use ws_protocol::frame::{
    encode_frame, encode_masked_frame, encode_masked_frame_fin, OP_CONTINUATION, OP_PING, OP_TEXT,
};

async fn status(addr: std::net::SocketAddr, request: &str) -> u16 {
    match raw_upgrade(addr, request).await {
        Ok((_, head)) => status_of(&head),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upgrades_get_precise_statuses() {
    let srv = start_shards(1, |c| {
        c.http.header_read_timeout = Duration::from_millis(500)
    })
    .await;
    let a = srv.shards[0];
    let good = upgrade_request("/ws");
    assert_eq!(
        status(
            a,
            &good.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "")
        )
        .await,
        400
    );
    assert_eq!(
        status(a, &good.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")).await,
        400
    );
    assert_eq!(
        status(a, &good.replace("Version: 13", "Version: 8")).await,
        426
    );
    assert_eq!(
        status(a, &good.replace("Upgrade: websocket\r\n", "")).await,
        426
    );
    assert_eq!(status(a, &good.replacen("GET", "POST", 1)).await, 405);
    let big = good.replace(
        "Host: test\r\n",
        &format!("Host: test\r\nX-Big: {}\r\n", "a".repeat(20_000)),
    );
    assert_eq!(status(a, &big).await, 431);
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    assert_eq!(
        status(
            a,
            &good.replace("Host: test\r\n", &format!("Host: test\r\n{many}"))
        )
        .await,
        431
    );

    // Slowloris: a head trickled byte by byte is cut off after the header timeout.
    let cut = slowloris_cut_after(a, &good).await;
    assert!(
        cut.is_some_and(|t| t < Duration::from_secs(3)),
        "slowloris connection not cut within 3 s: {cut:?}"
    );
    assert_eq!(srv.connections(0).await, 0);
    srv.kill();
}

async fn close_code_after(srv: &test_support::TestShards, bytes: &[u8]) -> Option<u16> {
    let (mut s, head) = raw_upgrade(srv.shards[0], &upgrade_request("/ws"))
        .await
        .unwrap();
    assert_eq!(status_of(&head), 101);
    let _ = s.write_all(bytes).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    // Find the close frame among what arrived.
    let mut i = 0;
    while i + 2 <= got.len() {
        let op = got[i] & 0x0f;
        let len = (got[i + 1] & 0x7f) as usize;
        if op == 0x8 && len >= 2 {
            return Some(u16::from_be_bytes([got[i + 2], got[i + 3]]));
        }
        i += 2 + len;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_get_the_right_close_codes() {
    let srv = start_shards(1, |c| {
        c.session.max_message_size = 4096;
        c.session.rate_per_sec = 50;
        c.session.rate_burst = 20;
    })
    .await;
    let m = [1, 2, 3, 4];
    // Unmasked client frame.
    assert_eq!(
        close_code_after(&srv, &encode_frame(OP_TEXT, b"{}")).await,
        Some(1002)
    );
    // Reserved bits.
    let mut rsv = encode_masked_frame(OP_TEXT, b"{}", m).to_vec();
    rsv[0] |= 0x40;
    assert_eq!(close_code_after(&srv, &rsv).await, Some(1002));
    // Reserved opcode.
    assert_eq!(
        close_code_after(&srv, &encode_masked_frame(0x3, b"", m)).await,
        Some(1002)
    );
    // A frame header announcing more than the limit: refused before buffering.
    let mut hdr = bytes::BytesMut::new();
    ws_protocol::frame::put_header(&mut hdr, OP_TEXT, 10 << 20, Some(m));
    assert_eq!(close_code_after(&srv, &hdr).await, Some(1009));
    // Fragment bomb: many small fragments summing past the message cap.
    let mut bomb = encode_masked_frame_fin(false, OP_TEXT, &[b' '; 100], m).to_vec();
    for _ in 0..100 {
        bomb.extend_from_slice(&encode_masked_frame_fin(
            false,
            OP_CONTINUATION,
            &[b' '; 100],
            m,
        ));
    }
    assert_eq!(close_code_after(&srv, &bomb).await, Some(1009));
    // Invalid UTF-8 text.
    assert_eq!(
        close_code_after(&srv, &encode_masked_frame(OP_TEXT, &[0xff, 0xfe], m)).await,
        Some(1007)
    );
    // Ping flood: beyond the per-connection frame rate.
    let flood: Vec<u8> = (0..500)
        .flat_map(|_| encode_masked_frame(OP_PING, b"p", m).to_vec())
        .collect();
    assert_eq!(close_code_after(&srv, &flood).await, Some(1008));
    // Message-rate abuse with valid requests.
    let spam: Vec<u8> = (0..500)
        .flat_map(|_| encode_masked_frame(OP_TEXT, br#"{"type":"ping"}"#, m).to_vec())
        .collect();
    assert_eq!(close_code_after(&srv, &spam).await, Some(1008));
    assert!(
        wait_until(Duration::from_secs(5), || async {
            srv.connections(0).await == 0
        })
        .await
    );

    // A well-behaved client on the same shard is unaffected throughout.
    let mut ws = connect(&srv.ws_url(0)).await.unwrap();
    ws.send(Message::text(r#"{"type":"ping","id":1}"#))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut ws, Duration::from_secs(5)).await.unwrap(),
        Event::Msg(_)
    ));
    srv.kill();
}
