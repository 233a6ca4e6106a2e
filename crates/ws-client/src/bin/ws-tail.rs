//! `ws-tail`: follows channels through ws-lb with the ws-client crate and prints every event,
//! one line each (text, or JSON with `--json`). Operators use it to watch a feed; the client
//! tests in tests/clients drive it through shard kills, LB restarts and overload.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures_util::StreamExt;
use serde_json::json;
use ws_client::{
    Client, ClientEvent, Config, Reconnect, SubscriptionEvent, TokenReason, TokenTransport,
};

#[derive(Parser, Debug)]
#[command(version, about = "Follow odin-ws channels and print every event")]
struct Args {
    /// ws-lb's WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:3001/ws")]
    url: String,
    /// Channels to follow.
    #[arg(required = true)]
    channels: Vec<String>,
    /// One JSON object per line (with a monotonic `t_ms`) instead of text.
    #[arg(long)]
    json: bool,
    /// Reconnect: base of the backoff and window of a prompt reconnect.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    min_delay: Duration,
    /// Reconnect: cap of every backoff.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    max_delay: Duration,
    /// Reconnect: base of the backoff after 1013 / 4003.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    overload_delay: Duration,
    /// Reconnect: fraction of each backoff taken off at random.
    #[arg(long, default_value_t = 0.5)]
    jitter: f64,
    /// Application ping period.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ping_interval: Duration,
    /// A ping unanswered for this long ends the connection.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pong_timeout: Duration,
    /// Connect (TCP + handshake) timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// A token for every connection (see --token-in).
    #[arg(
        long,
        env = "ODIN_WS_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the token, read again every time the client needs one (connect,
    /// refresh before `exp`, after 4001 / 4002), so another process can renew it.
    #[arg(long, env = "ODIN_WS_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// Where the token goes: `query` (`?token=`) or `message` (a first `auth` message).
    #[arg(long, default_value = "query", value_parser = ["query", "message"])]
    token_in: String,
    /// Refresh a token this long before its `exp` (not before half its life).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    refresh_margin: Duration,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let start = Instant::now();
    let mut cfg = Config::new(&args.url);
    cfg.reconnect = Reconnect {
        min_delay: args.min_delay,
        max_delay: args.max_delay,
        overload_delay: args.overload_delay,
        jitter: args.jitter,
        ..Reconnect::default()
    };
    cfg.ping_interval = args.ping_interval;
    cfg.pong_timeout = args.pong_timeout;
    cfg.connect_timeout = args.connect_timeout;
    cfg.refresh_margin = args.refresh_margin;
    if args.token_in == "message" {
        cfg.token_transport = TokenTransport::Message;
    }
    let json_mode = args.json;
    let t_ms = move || start.elapsed().as_secs_f64() * 1000.0;
    if let Some(t) = args.token.clone() {
        cfg = cfg.token_provider(move |_| {
            let t = t.clone();
            async move { Ok(Some(t)) }
        });
    } else if let Some(path) = args.token_file.clone() {
        cfg = cfg.token_provider(move |reason: TokenReason| {
            let path = path.clone();
            async move {
                print_event(
                    json_mode,
                    t_ms(),
                    json!({"event": "token", "reason": format!("{reason:?}").to_lowercase()}),
                );
                // A few bytes from a local file: not worth a blocking-pool hop.
                let text = std::fs::read_to_string(&path)?;
                Ok(Some(text.trim().to_owned()))
            }
        });
    }
    let client = Client::connect(cfg).context("client settings")?;

    let mut events = client.events();
    let conn_events = tokio::spawn(async move {
        loop {
            let ev = match events.recv().await {
                Ok(ev) => ev,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("ws-tail: {n} connection events not shown");
                    continue;
                }
                Err(_) => return,
            };
            let v = match ev {
                ClientEvent::Connecting { attempt } => {
                    json!({"event": "connecting", "attempt": attempt})
                }
                ClientEvent::Connected { attempt } => {
                    json!({"event": "connected", "attempt": attempt})
                }
                ClientEvent::Disconnected(d) => json!({
                    "event": "disconnected", "code": d.code, "reason": d.reason,
                    "cause": d.cause.as_str(), "healthy": d.healthy,
                    "delay_ms": d.reconnect_in.map(|x| x.as_secs_f64() * 1000.0),
                }),
                ClientEvent::Error(e) => json!({"event": "error", "error": format!("{e:?}")}),
                ClientEvent::Pong { rtt } => {
                    json!({"event": "pong", "rtt_ms": rtt.as_secs_f64() * 1000.0})
                }
                // Printed per subscription below.
                ClientEvent::Resync(_) => continue,
            };
            print_event(json_mode, t_ms(), v);
        }
    });

    let mut streams = Vec::new();
    for ch in &args.channels {
        let sub = client.subscribe(ch).await.with_context(|| ch.clone())?;
        let name = ch.clone();
        streams.push(sub.map(move |ev| (name.clone(), ev)));
    }
    let mut all = futures_util::stream::select_all(streams);
    let mut stop = std::pin::pin!(shutdown_signal());
    loop {
        let ev = tokio::select! {
            ev = all.next() => ev,
            () = &mut stop => break,
        };
        let Some((channel, ev)) = ev else { break };
        let v = match ev {
            SubscriptionEvent::Subscribed {
                epoch,
                seq,
                recovered,
                resubscribe,
            } => json!({"event": "subscribed", "channel": channel, "epoch": epoch, "seq": seq,
                        "recovered": recovered, "resubscribe": resubscribe}),
            SubscriptionEvent::Message(m) => json!({
                "event": "message", "channel": m.channel, "epoch": m.epoch, "seq": m.seq,
                "replayed": m.replayed, "data": m.data,
            }),
            SubscriptionEvent::Resync(r) => json!({
                "event": "resync", "channel": r.channel, "reason": r.reason.as_str(),
                "previous": {"epoch": r.previous.epoch, "seq": r.previous.seq},
                "current": {"epoch": r.current.epoch, "seq": r.current.seq},
            }),
            SubscriptionEvent::Refused(e) => {
                json!({"event": "refused", "channel": e.channel, "code": e.code, "message": e.message})
            }
        };
        print_event(json_mode, t_ms(), v);
    }
    client.close();
    drop(all);
    let _ = tokio::time::timeout(Duration::from_secs(3), conn_events).await;
    Ok(())
}

fn print_event(json_mode: bool, t_ms: f64, mut v: serde_json::Value) {
    if json_mode {
        if let Some(o) = v.as_object_mut() {
            o.insert("t_ms".into(), json!(t_ms));
        }
        println!("{v}");
    } else {
        println!("{:>10.1} {v}", t_ms);
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
