//! The client side of the planned authentication (issue 16): token in the upgrade request or
//! as first message, refresh before `exp`, and the 4001 / 4002 / 4003 / `forbidden` answers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::json;
use ws_client::{
    ClientError, ClientEvent, Config, State, SubscriptionEvent, TokenReason, TokenResult,
    TokenTransport,
};

use crate::{config, connect, next, next_event, seq_of, Server};

fn jwt(exp_in: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let claims = json!({"sub": "u1", "iat": now, "exp": now + exp_in}).to_string();
    format!(
        "{}.{}.sig",
        e.encode(br#"{"alg":"HS256"}"#),
        e.encode(claims)
    )
}

type Reasons = Arc<Mutex<Vec<TokenReason>>>;

/// A provider that records why it was asked and hands out `make(n)` for the n-th call.
fn provider(cfg: Config, make: fn(usize) -> String) -> (Config, Reasons) {
    let reasons: Reasons = Arc::default();
    let r = reasons.clone();
    let cfg = cfg.token_provider(move |reason| {
        let r = r.clone();
        async move {
            let n = {
                let mut g = r.lock().unwrap();
                g.push(reason);
                g.len()
            };
            TokenResult::Ok(Some(make(n)))
        }
    });
    (cfg, reasons)
}

#[tokio::test]
async fn token_in_the_query_and_a_refresh_before_exp() {
    let srv = Server::start().await;
    let mut cfg = config(srv.url());
    // A 4 s token with a 3 s margin is refreshed at half-life, 2 s after it was issued.
    cfg.refresh_margin = Duration::from_secs(3);
    let (cfg, reasons) = provider(cfg, |n| jwt(4 * n as u64));
    let client = connect(cfg);
    let mut c = srv.accept().await;
    let token = c
        .uri
        .strip_prefix("/ws?token=")
        .expect("token in the query")
        .to_owned();
    assert_eq!(token.split('.').count(), 3);
    let r = c.recv_type("refresh").await;
    assert_ne!(r["token"].as_str().unwrap(), token);
    assert_eq!(
        *reasons.lock().unwrap(),
        [TokenReason::Connect, TokenReason::Refresh]
    );
    c.send(json!({"type":"refreshed"})).await;
    // The next refresh is scheduled from the new token (8 s: at 4 s); the connection stays.
    assert!(srv
        .accept_within(Duration::from_millis(500))
        .await
        .is_none());
    assert_eq!(client.state(), State::Connected);
    client.close();
}

#[tokio::test]
async fn token_as_first_message() {
    let srv = Server::start().await;
    let mut cfg = config(srv.url());
    cfg.token_transport = TokenTransport::Message;
    let (cfg, _) = provider(cfg, |_| "opaque".into());
    let client = connect(cfg);
    let _sub = client.subscribe("a").await.unwrap();
    let mut c = srv.accept().await;
    assert_eq!(c.uri, "/ws");
    assert_eq!(c.recv().await, json!({"type":"auth","token":"opaque"}));
    client.close();
}

#[tokio::test]
async fn a_refused_refresh_is_surfaced_and_the_connection_stays() {
    let srv = Server::start().await;
    let mut cfg = config(srv.url());
    cfg.refresh_margin = Duration::from_secs(3);
    let (cfg, _) = provider(cfg, |n| jwt(4 * n as u64));
    let client = connect(cfg);
    let mut ev = client.events();
    let mut c = srv.accept().await;
    let _ = c.recv_type("refresh").await;
    c.send(json!({"type":"error","code":"invalid_token","message":"bad signature"}))
        .await;
    let e = next_event(&mut ev, |e| matches!(e, ClientEvent::Error(_))).await;
    assert!(
        matches!(e, ClientEvent::Error(ClientError::Refresh(ref s)) if s.code == "invalid_token")
    );
    assert_eq!(client.state(), State::Connected);
    client.close();
}

#[tokio::test]
async fn expired_asks_for_a_fresh_token_and_reconnects_promptly_with_since() {
    let srv = Server::start().await;
    let (cfg, reasons) = provider(config(srv.url()), |n| format!("t{n}"));
    let client = connect(cfg);
    let mut sub = client.subscribe("orders.user-1").await.unwrap();
    let mut c = srv.accept().await;
    c.handshake().await;
    c.subscribed("orders.user-1", "e", 4, false).await;
    let _ = next(&mut sub).await;
    c.close(4002, "token expired").await;
    let mut c = srv.accept().await;
    assert_eq!(c.uri, "/ws?token=t2");
    assert_eq!(
        c.handshake().await["since"],
        json!({"orders.user-1":{"epoch":"e","seq":4}})
    );
    assert_eq!(
        *reasons.lock().unwrap(),
        [TokenReason::Connect, TokenReason::Expired]
    );
    client.close();
}

#[tokio::test]
async fn unauthorized_retries_with_new_tokens_then_stops_with_an_error() {
    let srv = Server::start().await;
    let (cfg, reasons) = provider(config(srv.url()), |n| format!("bad{n}"));
    let client = connect(cfg);
    let mut ev = client.events();
    for _ in 0..3 {
        srv.accept().await.close(4001, "unauthorized").await;
    }
    let e = next_event(&mut ev, |e| matches!(e, ClientEvent::Error(_))).await;
    assert!(matches!(
        e,
        ClientEvent::Error(ClientError::Unauthorized { code: 4001, .. })
    ));
    assert!(srv.accept_within(Duration::from_secs(1)).await.is_none());
    assert_eq!(client.state(), State::Disconnected);
    assert_eq!(
        *reasons.lock().unwrap(),
        [
            TokenReason::Connect,
            TokenReason::Unauthorized,
            TokenReason::Unauthorized
        ]
    );
}

#[tokio::test]
async fn too_many_connections_backs_off_like_an_overload() {
    let srv = Server::start().await;
    let client = connect(config(srv.url()));
    let mut ev = client.events();
    srv.accept().await.close(4003, "too many connections").await;
    let d = next_event(&mut ev, |e| matches!(e, ClientEvent::Disconnected(_))).await;
    assert!(
        matches!(d, ClientEvent::Disconnected(ref d) if d.reconnect_in == Some(Duration::from_millis(100))),
        "{d:?}"
    );
    client.close();
}

#[tokio::test]
async fn forbidden_ends_that_subscription_only() {
    let srv = Server::start().await;
    let client = connect(config(srv.url()));
    let mut denied = client.subscribe("orders.user-2").await.unwrap();
    let mut open = client.subscribe("trades.BTC-USD").await.unwrap();
    let mut c = srv.accept().await;
    let mut asked = Vec::new();
    while asked.len() < 2 {
        let s = c.recv_type("subscribe").await;
        asked.extend(
            s["channels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned()),
        );
    }
    asked.sort();
    assert_eq!(asked, ["orders.user-2", "trades.BTC-USD"]);
    c.send(json!({"type":"error","code":"forbidden","message":"not entitled","channel":"orders.user-2"}))
        .await;
    c.subscribed("trades.BTC-USD", "e", 0, false).await;
    c.message("trades.BTC-USD", "e", 1).await;
    let SubscriptionEvent::Refused(err) = next(&mut denied).await else {
        panic!("expected a refusal")
    };
    assert_eq!(err.code, "forbidden");
    assert!(
        tokio::time::timeout(
            Duration::from_secs(2),
            futures_util::StreamExt::next(&mut denied)
        )
        .await
        .unwrap()
        .is_none(),
        "the refused stream ends"
    );
    let _ = next(&mut open).await;
    assert_eq!(seq_of(&next(&mut open).await), Some((1, false)));
    assert_eq!(client.state(), State::Connected);
    client.close();
}
