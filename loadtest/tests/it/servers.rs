//! In-process test servers: a plain tokio-tungstenite echo server (not our server: the tool
//! must work against any WebSocket URL), misbehaving servers for the failure causes, a
//! minimal odin-ws protocol server, and a pub/sub pair (HTTP publish + WebSocket fan-out).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use ws_protocol::message::encode_message;
use ws_protocol::{ClientMessage, ServerMessage};

/// Binds 127.0.0.1:0 and runs `serve` for every accepted connection.
async fn listen<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    addr
}

/// Echoes text and binary messages.
pub async fn echo() -> SocketAddr {
    listen(|s| async move {
        let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
            return;
        };
        while let Some(Ok(m)) = ws.next().await {
            if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                break;
            }
        }
    })
    .await
}

/// What [`echo_counting`] saw: connections open now, the most open at once, and close
/// frames received with code 1000.
#[derive(Debug, Default)]
pub struct OpenCounts {
    pub open: AtomicU64,
    pub max_open: AtomicU64,
    pub closed_1000: AtomicU64,
}

/// An echo server that counts open connections and the clients' normal closes.
pub async fn echo_counting() -> (SocketAddr, Arc<OpenCounts>) {
    let counts = Arc::new(OpenCounts::default());
    let seen = counts.clone();
    let addr = listen(move |s| {
        let c = seen.clone();
        async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                return;
            };
            let now = c.open.fetch_add(1, Ordering::SeqCst) + 1;
            c.max_open.fetch_max(now, Ordering::SeqCst);
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Close(Some(f)) = &m {
                    if f.code == CloseCode::Normal {
                        c.closed_1000.fetch_add(1, Ordering::SeqCst);
                    }
                }
                if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                    break;
                }
            }
            c.open.fetch_sub(1, Ordering::SeqCst);
        }
    })
    .await;
    (addr, counts)
}

/// An echo server that also records the address every connection came from.
pub async fn echo_with_peers() -> (SocketAddr, Arc<Mutex<HashSet<IpAddr>>>) {
    let peers = Arc::new(Mutex::new(HashSet::new()));
    let seen = peers.clone();
    let addr = listen(move |s| {
        if let Ok(peer) = s.peer_addr() {
            seen.lock().unwrap().insert(peer.ip());
        }
        async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                return;
            };
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
    (addr, peers)
}

/// Answers every upgrade with HTTP 503.
pub async fn http_503() -> SocketAddr {
    listen(|mut s| async move {
        let mut buf = vec![0u8; 4096];
        let mut n = 0;
        while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf[n..]).await {
                Ok(0) | Err(_) => return,
                Ok(m) => n += m,
            }
        }
        let _ = s
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    })
    .await
}

/// Accepts TCP and never answers the upgrade.
pub async fn silent() -> SocketAddr {
    listen(|s| async move {
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        drop(s);
    })
    .await
}

/// Completes the upgrade, then closes at once with 1013 (try again later).
pub async fn close_1013() -> SocketAddr {
    listen(|s| async move {
        let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
            return;
        };
        let frame = CloseFrame {
            code: CloseCode::Again,
            reason: "overloaded".into(),
        };
        let _ = ws.close(Some(frame)).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await
}

fn subscribed(channel: &str, seq: u64, recovered: bool) -> Message {
    let m = ServerMessage::Subscribed {
        channel: channel.into(),
        epoch: "e1".into(),
        seq,
        recovered,
    };
    Message::text(m.to_json())
}

fn message(channel: &str, seq: u64) -> Message {
    let data = format!(r#"{{"ts_us":{}}}"#, loadtest::stats::unix_us());
    Message::text(encode_message(channel, "e1", seq, &data))
}

async fn next_subscribe(ws: &mut WebSocketStream<TcpStream>) -> Option<ClientMessage> {
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            return ClientMessage::decode(t.as_bytes()).ok();
        }
    }
    None
}

/// Speaks the odin-ws protocol with a scripted stream per subscription: position 10, then
/// seqs 11, 12, 14, 14, 15 (one gap, one duplicate) and a ping; stays open.
pub async fn scripted() -> SocketAddr {
    listen(|s| async move {
        let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
            return;
        };
        let Some(ClientMessage::Subscribe { channels, .. }) = next_subscribe(&mut ws).await else {
            return;
        };
        for c in &channels {
            ws.send(subscribed(c, 10, false)).await.unwrap();
            for seq in [11, 12, 14, 14, 15] {
                ws.send(message(c, seq)).await.unwrap();
            }
        }
        ws.send(Message::Ping("hb".into())).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await
}

/// A first subscribe (no `since`) gets seqs 11 and 12, then close 1012 (service restart). A
/// resubscribe with `since` gets `recovered: true` and seqs 13 and 14, and stays open.
pub async fn restarting() -> SocketAddr {
    listen(|s| async move {
        let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
            return;
        };
        let Some(ClientMessage::Subscribe { channels, since }) = next_subscribe(&mut ws).await
        else {
            return;
        };
        let Some(c) = channels.first() else { return };
        match since.get(c) {
            None => {
                ws.send(subscribed(c, 10, false)).await.unwrap();
                ws.send(message(c, 11)).await.unwrap();
                ws.send(message(c, 12)).await.unwrap();
                let frame = CloseFrame {
                    code: CloseCode::Restart,
                    reason: "draining".into(),
                };
                let _ = ws.close(Some(frame)).await;
            }
            Some(pos) => {
                assert_eq!(
                    (pos.epoch.as_str(), pos.seq),
                    ("e1", 12),
                    "resumes from the last seen"
                );
                ws.send(subscribed(c, 12, true)).await.unwrap();
                ws.send(message(c, 13)).await.unwrap();
                ws.send(message(c, 14)).await.unwrap();
            }
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await
}

/// A tiny bus: `POST /publish` on the first address assigns per-channel seqs and fans the
/// message out to WebSocket subscribers on the second. Returns (ws, http, publish count).
pub async fn pubsub() -> (SocketAddr, SocketAddr, Arc<AtomicU64>) {
    let (tx, _) = broadcast::channel::<(String, u64, String)>(4096);
    let seqs = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    let published = Arc::new(AtomicU64::new(0));
    let ws_tx = tx.clone();
    let ws = listen(move |s| {
        let mut rx = ws_tx.subscribe();
        async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                return;
            };
            let Some(ClientMessage::Subscribe { channels, .. }) = next_subscribe(&mut ws).await
            else {
                return;
            };
            for c in &channels {
                ws.send(subscribed(c, 0, false)).await.unwrap();
            }
            loop {
                tokio::select! {
                    m = rx.recv() => {
                        let Ok((channel, seq, data)) = m else { return };
                        if channels.contains(&channel) {
                            let text = encode_message(&channel, "e1", seq, &data);
                            if ws.send(Message::text(text)).await.is_err() { return }
                        }
                    }
                    m = ws.next() => if !matches!(m, Some(Ok(_))) { return },
                }
            }
        }
    })
    .await;
    let count = published.clone();
    let http = listen(move |mut s| {
        let (tx, seqs, count) = (tx.clone(), seqs.clone(), count.clone());
        async move {
            let mut buf = Vec::new();
            loop {
                // Keep-alive: one request after another on the same connection.
                let head_end = loop {
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p;
                    }
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap();
                while buf.len() < head_end + 4 + len {
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                let body: serde_json::Value =
                    serde_json::from_slice(&buf[head_end + 4..head_end + 4 + len]).unwrap();
                buf.drain(..head_end + 4 + len);
                let channel = body["channel"].as_str().unwrap().to_owned();
                let seq = {
                    let mut seqs = seqs.lock().unwrap();
                    let s = seqs.entry(channel.clone()).or_default();
                    *s += 1;
                    *s
                };
                count.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send((channel.clone(), seq, body["data"].to_string()));
                let reply = format!(r#"{{"channel":"{channel}","epoch":"e1","seq":{seq}}}"#);
                let resp = format!(
                    "HTTP/1.1 202 Accepted\r\nContent-Length: {}\r\n\r\n{reply}",
                    reply.len()
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (ws, http, published)
}
