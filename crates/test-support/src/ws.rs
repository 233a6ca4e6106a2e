//! WebSocket client helpers over tokio-tungstenite (an independent implementation) and raw
//! TCP for the abusive cases tungstenite refuses to produce.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use ws_protocol::ServerMessage;

/// A tungstenite client.
pub type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects to `url`.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .context("connect timeout")??;
    Ok(ws)
}

/// What a client saw next.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Msg(ServerMessage),
    Close(u16, String),
    /// The stream ended without a close frame (or with a reset).
    Gone(String),
}

/// The next protocol message or close, skipping pings/pongs, within `limit`.
pub async fn next_event(ws: &mut Client, limit: Duration) -> anyhow::Result<Event> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let item = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("no message in time")?;
        match item {
            None => return Ok(Event::Gone("stream ended".into())),
            Some(Err(e)) => return Ok(Event::Gone(e.to_string())),
            Some(Ok(Message::Text(t))) => {
                return Ok(Event::Msg(ServerMessage::decode(t.as_bytes())?))
            }
            Some(Ok(Message::Close(c))) => {
                return Ok(match c {
                    Some(f) => Event::Close(u16::from(f.code), f.reason.to_string()),
                    None => Event::Close(1005, String::new()),
                })
            }
            Some(Ok(_)) => continue,
        }
    }
}

/// The next protocol message; fails on close or timeout.
pub async fn next_msg(ws: &mut Client) -> anyhow::Result<ServerMessage> {
    match next_event(ws, Duration::from_secs(10)).await? {
        Event::Msg(m) => Ok(m),
        other => bail!("expected a message, got {other:?}"),
    }
}

/// Sends a text frame.
pub async fn send(ws: &mut Client, text: &str) -> anyhow::Result<()> {
    ws.send(Message::text(text)).await?;
    Ok(())
}

/// Subscribes to `channels` and returns the `subscribed` replies.
pub async fn subscribe(ws: &mut Client, channels: &[&str]) -> anyhow::Result<Vec<ServerMessage>> {
    let list: Vec<String> = channels.iter().map(|c| format!("\"{c}\"")).collect();
    send(
        ws,
        &format!(r#"{{"type":"subscribe","channels":[{}]}}"#, list.join(",")),
    )
    .await?;
    let mut out = Vec::new();
    for _ in channels {
        out.push(next_msg(ws).await?);
    }
    Ok(out)
}

/// Closes cleanly with 1000 and waits for the server's close.
pub async fn close(mut ws: Client) {
    let _ = ws
        .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// A valid upgrade request for `path` with a fixed, valid key.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Opens a raw TCP connection, sends `request` and returns the socket and the response head.
pub async fn raw_upgrade(addr: SocketAddr, request: &str) -> anyhow::Result<(TcpStream, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request.as_bytes()).await?;
    let head = read_response_head(&mut s).await?;
    Ok((s, head))
}

/// Reads a response head byte by byte, so nothing after it is consumed (10 s limit).
pub async fn read_response_head(s: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
            .await
            .context("head timeout")??;
        if n == 0 {
            bail!("eof in response head: {}", String::from_utf8_lossy(&head));
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).to_string())
}

/// Trickles `request` one byte per 50 ms (the slowloris pattern: the pacing is the attack,
/// not synchronisation) and returns how long the server took to close the connection or
/// answer 408; `None` if it never did while the whole request was sent.
pub async fn slowloris_cut_after(addr: SocketAddr, request: &str) -> Option<Duration> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let started = tokio::time::Instant::now();
    for b in request.as_bytes() {
        if s.write_all(&[*b]).await.is_err() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut probe = [0u8; 512];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await
        {
            if n == 0 || probe.starts_with(b"HTTP/1.1 408") {
                return Some(started.elapsed());
            }
        }
    }
    None
}

/// Status code of a raw response head.
pub fn status_of(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Sends an upgrade to the shard at `addr` and checks it is refused as not ready: 503 with
/// `X-Odin-Shard-Status: <status>` (what ws-lb reads to hold the refusal against no
/// breaker). Returns the connection, positioned at the body.
pub async fn refused_as_not_ready(addr: SocketAddr, status: &str) -> TcpStream {
    let (stream, head) = raw_upgrade(addr, &upgrade_request("/ws")).await.unwrap();
    assert_eq!(status_of(&head), 503, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("\r\nx-odin-shard-status: {status}\r\n")),
        "{head}"
    );
    stream
}

/// Closes `s` with an RST instead of a FIN.
pub fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

/// A raw client with a `recv_buffer`-byte receive buffer that sends an upgrade for `/ws` and
/// a subscribe to `channel`, and reads nothing: the slow consumer of the tests. The 101 head
/// and everything after it are left unread in the socket.
pub async fn raw_subscriber(
    addr: SocketAddr,
    channel: &str,
    recv_buffer: u32,
) -> anyhow::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_recv_buffer_size(recv_buffer)?;
    let mut s = sock.connect(addr).await?;
    s.write_all(upgrade_request("/ws").as_bytes()).await?;
    let sub = ws_protocol::frame::encode_masked_frame(
        ws_protocol::frame::OP_TEXT,
        format!(r#"{{"type":"subscribe","channels":["{channel}"]}}"#).as_bytes(),
        [9, 8, 7, 6],
    );
    s.write_all(&sub).await?;
    Ok(s)
}

/// Reads server frames from `r` (after the HTTP head when `skip_head`) until a close frame
/// arrives, the stream ends or `limit` passes; returns the close code, if one came.
pub async fn read_close_code<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    skip_head: bool,
    limit: Duration,
) -> Option<u16> {
    use ws_protocol::frame::{Decoder, Flow, Limits, Message as Frame, Role};
    let mut decoder = Decoder::new(Role::Client, Limits::new(1 << 20));
    let mut close_code = None;
    let mut head_done = !skip_head;
    let mut head = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(limit, async {
        while close_code.is_none() {
            let n = r.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut data = buf[..n].to_vec();
            if !head_done {
                head.extend_from_slice(&data);
                let Some(p) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                data = head.split_off(p + 4);
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
    close_code
}
