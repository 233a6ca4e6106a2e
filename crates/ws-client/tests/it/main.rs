//! ws-client against a scripted WebSocket server (tokio-tungstenite) on 127.0.0.1: what the
//! client sends, what it delivers, and when it reconnects, for every close code and for the
//! planned authentication protocol. The real tiers are exercised by tests/clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod recovery;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use ws_client::{Client, ClientEvent, Config, Subscription, SubscriptionEvent};

const LIMIT: Duration = Duration::from_secs(10);

/// The server side of the test.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
}

#[derive(Debug)]
pub struct Conn {
    pub ws: WebSocketStream<TcpStream>,
    /// Path and query of the upgrade request.
    pub uri: String,
}

impl Server {
    pub async fn start() -> Self {
        Self {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.listener.local_addr().unwrap())
    }

    /// The next connection, within `limit`.
    pub async fn accept_within(&self, limit: Duration) -> Option<Conn> {
        let (tcp, _) = tokio::time::timeout(limit, self.listener.accept())
            .await
            .ok()?
            .unwrap();
        let mut uri = String::new();
        // The callback's signature is tungstenite's; its error type is not ours to shrink.
        #[allow(clippy::result_large_err)]
        let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
            uri = req.uri().to_string();
            Ok(resp)
        })
        .await
        .unwrap();
        Some(Conn { ws, uri })
    }

    pub async fn accept(&self) -> Conn {
        self.accept_within(LIMIT).await.expect("no connection")
    }
}

impl Conn {
    /// The next JSON frame from the client.
    pub async fn recv(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(LIMIT, self.ws.next())
                .await
                .expect("client sent nothing")
                .expect("stream ended")
                .expect("read error");
            if let Message::Text(t) = m {
                return serde_json::from_str(t.as_str()).unwrap();
            }
        }
    }

    /// The next frame of `kind`, skipping others (and answering pings).
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == "ping" && kind != "ping" {
                self.send(json!({"type": "pong", "id": v["id"]})).await;
                continue;
            }
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// Answers the probe ping and returns the subscribe that follows.
    pub async fn handshake(&mut self) -> Value {
        self.recv_type("subscribe").await
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn subscribed(&mut self, ch: &str, epoch: &str, seq: u64, recovered: bool) {
        self.send(
            json!({"type":"subscribed","channel":ch,"epoch":epoch,"seq":seq,"recovered":recovered}),
        )
        .await;
    }

    pub async fn message(&mut self, ch: &str, epoch: &str, seq: u64) {
        self.send(json!({"type":"message","channel":ch,"epoch":epoch,"seq":seq,"data":{"n":seq}}))
            .await;
    }

    pub async fn close(mut self, code: u16, reason: &str) {
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.to_owned().into(),
            }))
            .await;
        // Let the client's close reply arrive so the TCP connection ends cleanly.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// Test defaults: short timers, no jitter on backoffs.
pub fn config(url: String) -> Config {
    let mut c = Config::new(url);
    c.reconnect.min_delay = Duration::from_millis(50);
    c.reconnect.overload_delay = Duration::from_millis(100);
    c.reconnect.max_delay = Duration::from_millis(400);
    c.reconnect.jitter = 0.0;
    c.random = || 0.0;
    c
}

/// The next subscription event within the limit.
pub async fn next(sub: &mut Subscription) -> SubscriptionEvent {
    tokio::time::timeout(LIMIT, sub.next())
        .await
        .expect("no subscription event")
        .expect("subscription ended")
}

/// The next connection event matching `pred`.
pub async fn next_event(
    rx: &mut tokio::sync::broadcast::Receiver<ClientEvent>,
    pred: impl Fn(&ClientEvent) -> bool,
) -> ClientEvent {
    tokio::time::timeout(LIMIT, async {
        loop {
            let ev = rx.recv().await.unwrap();
            if pred(&ev) {
                return ev;
            }
        }
    })
    .await
    .expect("no such client event")
}

pub fn seq_of(ev: &SubscriptionEvent) -> Option<(u64, bool)> {
    match ev {
        SubscriptionEvent::Message(m) => Some((m.seq, m.replayed)),
        _ => None,
    }
}

pub fn connect(cfg: Config) -> Client {
    Client::connect(cfg).unwrap()
}
