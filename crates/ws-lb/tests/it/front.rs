//! The client listener's fast path (a well-formed upgrade served on the raw socket) and what
//! it hands to hyper: every other request keeps hyper's answers, byte for byte what the
//! client sent.

use std::time::Duration;

use test_support::http::{metric, wait_until};
use test_support::ws::{
    next_event, raw_upgrade, read_response_head, slowloris_cut_after, status_of, subscribe,
    upgrade_request, Event,
};
use test_support::{start_lb, start_shards};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use ws_protocol::frame::{encode_masked_frame, OP_TEXT};
use ws_protocol::ServerMessage;

const SUBSCRIBE: &[u8] = br#"{"type":"subscribe","channels":["trades.X"]}"#;

/// After a raw 101 (nothing read past the head), the socket as a WebSocket client.
async fn client_of(s: TcpStream) -> test_support::ws::Client {
    WebSocketStream::from_raw_socket(MaybeTlsStream::Plain(s), Role::Client, None).await
}

async fn expect_subscribed(ws: &mut test_support::ws::Client) {
    match next_event(ws, Duration::from_secs(10)).await.unwrap() {
        Event::Msg(ServerMessage::Subscribed { channel, .. }) => assert_eq!(channel, "trades.X"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_hyper_s_precise_statuses_and_never_reach_a_shard() {
    let shards = start_shards(1, |_| {}).await;
    let lb = start_lb(vec![shards.ws_url(0)], |c| {
        c.http.header_read_timeout = Duration::from_millis(500)
    })
    .await;
    let a = lb.addr;
    let status = |req: String| async move { status_of(&raw_upgrade(a, &req).await.unwrap().1) };
    let good = upgrade_request("/ws");
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    assert_eq!(status(good.replace(key, "")).await, 400);
    assert_eq!(
        status(good.replace("dGhlIHNhbXBsZSBub25jZQ==", "short")).await,
        400
    );
    assert_eq!(status(good.replace("Version: 13", "Version: 8")).await, 426);
    assert_eq!(
        status(good.replace("Upgrade: websocket\r\n", "")).await,
        426
    );
    assert_eq!(status(good.replacen("GET", "POST", 1)).await, 405);
    assert_eq!(status(upgrade_request("/nowhere")).await, 404);
    let big = good.replace(
        "Host: test\r\n",
        &format!("Host: test\r\nX-Big: {}\r\n", "a".repeat(20_000)),
    );
    assert_eq!(status(big).await, 431);
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    assert_eq!(
        status(good.replace("Host: test\r\n", &format!("Host: test\r\n{many}"))).await,
        431
    );
    // Garbage instead of HTTP.
    let mut s = TcpStream::connect(a).await.unwrap();
    s.write_all(b"\x16\x03\x01\x02\x00hello\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut head))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(
        n == 0 || head.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        &head[..n]
    );

    // Slowloris: a head trickled byte by byte is cut off after the header timeout.
    let cut = slowloris_cut_after(a, &good).await;
    assert!(
        cut.is_some_and(|t| t < Duration::from_secs(3)),
        "slowloris connection not cut within 3 s: {cut:?}"
    );

    let page = lb.metrics().await;
    assert_eq!(
        metric(&page, "ws_lb_client_connections_total", &["result=\"rejected\""]),
        4.0,
        "the four bad upgrades to /ws are counted as rejected (405 and 431 come before the handler)"
    );
    assert_eq!(shards.connections(0).await, 0);
    assert_eq!(
        metric(
            &shards.metrics().await,
            "ws_shard_connections_accepted_total",
            &[]
        ),
        0.0
    );
    shards.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_with_the_request_and_a_head_in_pieces_are_relayed() {
    let shards = start_shards(1, |_| {}).await;
    let lb = start_lb(vec![shards.ws_url(0)], |_| {}).await;
    // The upgrade and the first frame in one write: the frame must reach the shard.
    let mut bytes = upgrade_request("/ws").into_bytes();
    bytes.extend_from_slice(&encode_masked_frame(OP_TEXT, SUBSCRIBE, [1, 2, 3, 4]));
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    let head = read_response_head(&mut s).await.unwrap();
    assert_eq!(status_of(&head), 101, "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{head}"
    );
    let mut ws = client_of(s).await;
    expect_subscribed(&mut ws).await;

    // A head that arrives in small pieces.
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    for chunk in upgrade_request("/ws").as_bytes().chunks(7) {
        s.write_all(chunk).await.unwrap();
        // Pacing, not synchronisation: the pieces usually arrive apart; if a busy box
        // coalesces some, the head still arrives whole and the test still holds.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let head = read_response_head(&mut s).await.unwrap();
    assert_eq!(status_of(&head), 101, "{head}");
    let mut ws2 = client_of(s).await;
    let replies = subscribe(&mut ws2, &["trades.X"]).await.unwrap();
    assert!(
        matches!(&replies[..], [ServerMessage::Subscribed { channel, .. }] if channel == "trades.X"),
        "{replies:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || async {
            shards.connections(0).await == 2
        })
        .await
    );
    drop((ws, ws2));
    assert!(
        wait_until(Duration::from_secs(5), || async {
            shards.connections(0).await == 0
        })
        .await,
        "the relays ended and released the shard's slots"
    );
    shards.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_after_a_kept_alive_request_is_still_relayed() {
    let shards = start_shards(1, |_| {}).await;
    let lb = start_lb(vec![shards.ws_url(0)], |_| {}).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    // Read the whole /health response (head and its Content-Length body).
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after /health");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let len: usize = text
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("content-length");
        if got.len() >= end + 4 + len {
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            break;
        }
    }
    s.write_all(upgrade_request("/ws").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.unwrap(), 1);
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101 "),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let mut ws = client_of(s).await;
    let replies = subscribe(&mut ws, &["trades.X"]).await.unwrap();
    assert!(
        matches!(&replies[..], [ServerMessage::Subscribed { channel, .. }] if channel == "trades.X"),
        "{replies:?}"
    );
    shards.kill();
}
