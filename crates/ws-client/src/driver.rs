//! The connection task: owns the WebSocket, the per-channel positions and the timers, and
//! applies the reconnect rules of [`crate::policy`].

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use ws_protocol::{ClientMessage, Position, ServerMessage};

use crate::policy::{close_action, reconnect_delay, CloseAction};
use crate::token::{
    refresh_in, token_times, unix_now, TokenFuture, TokenProvider, TokenReason, TokenResult,
    TokenTimes, TokenTransport,
};
use crate::{
    ClientError, ClientEvent, Command, Config, DisconnectCause, Disconnected, Publication, Resync,
    ResyncReason, ServerError, State, SubscribeError, SubscriptionEvent,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long the client waits for the server's close frame after sending its own.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    /// Not asked for on this connection yet.
    Pending,
    Subscribing,
    Subscribed,
}

struct Chan {
    id: u64,
    tx: mpsc::Sender<SubscriptionEvent>,
    wire: Wire,
    /// Last position seen (what a reconnect resumes after).
    position: Option<Position>,
    /// The `since` of the subscribe in flight.
    requested: Option<Position>,
    /// After a recovered resubscribe: messages up to this seq are replays.
    replay_until: Option<u64>,
    ever_subscribed: bool,
    /// Last position handed to the application.
    delivered: Option<Position>,
    /// Set while events are being dropped for a reader that does not keep up.
    lagged: Option<Position>,
}

enum Next {
    Retry(Duration),
    Stop,
    Exit,
}

enum Flow {
    Continue,
    Exit,
}

/// Per-connection timers and flags.
struct Conn {
    healthy: bool,
    last_inbound: Instant,
    ping_sent: Instant,
    pong_deadline: Option<Instant>,
    next_ping: Option<Instant>,
    refresh_at: Option<Instant>,
    refresh_pending: bool,
}

enum Inbound {
    Known(ServerMessage),
    Error(ServerError),
    Refreshed,
    Other,
}

pub(crate) struct Driver {
    cfg: Config,
    provider: Option<Arc<dyn TokenProvider>>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    events: broadcast::Sender<ClientEvent>,
    state: watch::Sender<State>,
    chans: BTreeMap<String, Chan>,
    leaving: HashSet<String>,
    attempt: u64,
    failures: u32,
    auth_failures: u32,
    token: Option<String>,
    times: Option<TokenTimes>,
    token_reason: Option<TokenReason>,
    ping_id: u64,
}

impl Driver {
    pub(crate) fn new(
        cfg: Config,
        cmd_rx: mpsc::UnboundedReceiver<Command>,
        events: broadcast::Sender<ClientEvent>,
        state: watch::Sender<State>,
    ) -> Self {
        Self {
            provider: cfg.token_provider.clone(),
            cfg,
            cmd_rx,
            events,
            state,
            chans: BTreeMap::new(),
            leaving: HashSet::new(),
            attempt: 0,
            failures: 0,
            auth_failures: 0,
            token: None,
            times: None,
            token_reason: Some(TokenReason::Connect),
            ping_id: 0,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut delay = Some(Duration::ZERO);
        loop {
            if !self.idle(delay).await {
                break;
            }
            delay = match self.connection().await {
                Next::Retry(d) => Some(d),
                Next::Stop => {
                    self.set_state(State::Disconnected);
                    None
                }
                Next::Exit => break,
            };
        }
        self.set_state(State::Disconnected);
        // Dropping the channels ends every subscription stream.
    }

    /// Waits `delay` (or, when stopped, for a reconnect command) while handling commands.
    /// Returns false when the client was closed.
    async fn idle(&mut self, delay: Option<Duration>) -> bool {
        let deadline = delay.map(|d| Instant::now() + d);
        loop {
            let cmd = match deadline {
                Some(dl) => tokio::select! {
                    _ = sleep_until(dl) => return true,
                    c = self.cmd_rx.recv() => c,
                },
                None => self.cmd_rx.recv().await,
            };
            match cmd {
                None | Some(Command::Close) => return false,
                Some(Command::Reconnect) if deadline.is_none() => {
                    self.failures = 0;
                    self.auth_failures = 0;
                    return true;
                }
                Some(c) => {
                    // Not connected: nothing is sent, so this cannot fail.
                    let _ = self.command(c, None).await;
                }
            }
        }
    }

    fn emit(&self, ev: ClientEvent) {
        let _ = self.events.send(ev);
    }

    fn set_state(&self, s: State) {
        self.state.send_if_modified(|cur| {
            let changed = *cur != s;
            *cur = s;
            changed
        });
    }

    fn set_token(&mut self, token: Option<String>) {
        self.times = token.as_deref().and_then(token_times);
        self.token = token;
    }

    fn need_token(&self) -> bool {
        if self.token_reason.is_some() || self.token.is_none() {
            return true;
        }
        self.times
            .is_some_and(|t| t.exp.saturating_sub(unix_now()) < self.cfg.refresh_margin)
    }

    fn refresh_deadline(&self) -> Option<Instant> {
        self.provider.as_ref()?;
        let t = self.times?;
        Some(Instant::now() + refresh_in(t, unix_now(), self.cfg.refresh_margin))
    }

    async fn connection(&mut self) -> Next {
        self.attempt += 1;
        self.set_state(State::Connecting);
        self.emit(ClientEvent::Connecting {
            attempt: self.attempt,
        });

        if let Some(p) = self.provider.clone().filter(|_| self.need_token()) {
            let reason = self.token_reason.unwrap_or(TokenReason::Connect);
            let got = tokio::time::timeout(self.cfg.connect_timeout, p.token(reason)).await;
            match got {
                Ok(Ok(t)) => {
                    self.set_token(t);
                    self.token_reason = None;
                }
                Ok(Err(e)) => return self.provider_failed(e.to_string()),
                Err(_) => return self.provider_failed("token provider timed out".into()),
            }
        }

        let mut url = self.cfg.url.clone();
        if let (Some(t), TokenTransport::Query) = (&self.token, self.cfg.token_transport) {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str("token=");
            url.push_str(&percent_encode(t));
        }
        let dial = tokio::time::timeout(
            self.cfg.connect_timeout,
            tokio_tungstenite::connect_async(url.as_str()),
        );
        let mut ws = match dial.await {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(tungstenite::Error::Http(resp))) => {
                // A browser cannot see these (ws-lb answers with close codes where it can);
                // this client can, and maps them onto the same actions.
                let status = resp.status().as_u16();
                let (action, code) = match status {
                    401 => (CloseAction::Unauthorized, 4001),
                    429 | 503 => (CloseAction::Overload, 1013),
                    400..=499 => (CloseAction::Fatal, 1002),
                    _ => (CloseAction::Reconnect, 1006),
                };
                let reason = format!("HTTP {status} before the upgrade");
                return self.ended(action, code, reason, DisconnectCause::Closed, false);
            }
            Ok(Err(e)) => {
                return self.ended(
                    CloseAction::Reconnect,
                    1006,
                    e.to_string(),
                    DisconnectCause::Lost,
                    false,
                )
            }
            Err(_) => {
                return self.ended(
                    CloseAction::Reconnect,
                    1006,
                    "connect timeout".into(),
                    DisconnectCause::ConnectTimeout,
                    false,
                )
            }
        };

        self.set_state(State::Connected);
        self.emit(ClientEvent::Connected {
            attempt: self.attempt,
        });
        let now = Instant::now();
        let mut conn = Conn {
            healthy: false,
            last_inbound: now,
            ping_sent: now,
            pong_deadline: None,
            next_ping: None,
            refresh_at: self.refresh_deadline(),
            refresh_pending: false,
        };
        let mut refresh_fut: Option<TokenFuture> = None;
        match self.on_open(&mut ws, &mut conn).await {
            Ok(()) => {}
            Err(e) => return self.lost(e, conn.healthy),
        }

        loop {
            let far = Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                frame = ws.next() => {
                    conn.last_inbound = Instant::now();
                    match frame {
                        Some(Ok(Message::Text(t))) => {
                            if let Err(e) = self.on_text(t.as_str(), &mut ws, &mut conn).await {
                                return self.lost(e, conn.healthy);
                            }
                        }
                        Some(Ok(Message::Close(f))) => {
                            let (code, reason) = match f {
                                Some(f) => (u16::from(f.code), f.reason.to_string()),
                                None => (1005, String::new()),
                            };
                            // tungstenite answers the close frame itself while we drop it.
                            let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(None)).await;
                            let (action, cause) = if code == 1005 {
                                (CloseAction::Reconnect, DisconnectCause::Lost)
                            } else {
                                (close_action(code), DisconnectCause::Closed)
                            };
                            return self.ended(action, code, reason, cause, conn.healthy);
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return self.lost(e, conn.healthy),
                        None => return self.lost(tungstenite::Error::ConnectionClosed, conn.healthy),
                    }
                }
                cmd = self.cmd_rx.recv() => {
                    let flow = match cmd {
                        None | Some(Command::Close) => Ok(Flow::Exit),
                        Some(c) => self.command(c, Some(&mut ws)).await,
                    };
                    match flow {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Exit) => {
                            let frame = tungstenite::protocol::CloseFrame {
                                code: tungstenite::protocol::frame::coding::CloseCode::Normal,
                                reason: "client closed".into(),
                            };
                            let _ = tokio::time::timeout(CLOSE_WAIT, ws.close(Some(frame))).await;
                            self.emit(ClientEvent::Disconnected(Disconnected {
                                code: 1000,
                                reason: "client closed".into(),
                                cause: DisconnectCause::Client,
                                healthy: conn.healthy,
                                reconnect_in: None,
                            }));
                            return Next::Exit;
                        }
                        Err(e) => return self.lost(e, conn.healthy),
                    }
                }
                _ = sleep_until(conn.next_ping.unwrap_or(far)), if conn.next_ping.is_some() => {
                    if let Err(e) = self.send_ping(&mut ws, &mut conn).await {
                        return self.lost(e, conn.healthy);
                    }
                }
                _ = sleep_until(conn.pong_deadline.unwrap_or(far)), if conn.pong_deadline.is_some() => {
                    // Frames still arriving mean the path works and the pong waits behind them.
                    let now = Instant::now();
                    if conn.last_inbound > conn.ping_sent
                        && now.duration_since(conn.last_inbound) < self.cfg.pong_timeout
                    {
                        conn.pong_deadline = Some(conn.last_inbound + self.cfg.pong_timeout);
                    } else {
                        return self.ended(
                            CloseAction::Reconnect,
                            1006,
                            "ping timeout".into(),
                            DisconnectCause::PingTimeout,
                            conn.healthy,
                        );
                    }
                }
                _ = sleep_until(conn.refresh_at.unwrap_or(far)),
                    if conn.refresh_at.is_some() && refresh_fut.is_none() => {
                    conn.refresh_at = None;
                    refresh_fut = self.provider.as_ref().map(|p| p.token(TokenReason::Refresh));
                }
                got = poll_opt(&mut refresh_fut) => {
                    refresh_fut = None;
                    if let Err(e) = self.on_refresh_token(got, &mut ws, &mut conn).await {
                        return self.lost(e, conn.healthy);
                    }
                }
            }
        }
    }

    fn provider_failed(&mut self, message: String) -> Next {
        self.emit(ClientEvent::Error(ClientError::TokenProvider(message)));
        self.ended(
            CloseAction::Reconnect,
            1006,
            "token provider failed".into(),
            DisconnectCause::Lost,
            false,
        )
    }

    fn lost(&mut self, e: tungstenite::Error, healthy: bool) -> Next {
        self.ended(
            CloseAction::Reconnect,
            1006,
            e.to_string(),
            DisconnectCause::Lost,
            healthy,
        )
    }

    /// A connection or attempt ended: decide what comes next.
    fn ended(
        &mut self,
        action: CloseAction,
        code: u16,
        reason: String,
        cause: DisconnectCause,
        healthy: bool,
    ) -> Next {
        for c in self.chans.values_mut() {
            c.wire = Wire::Pending;
            c.requested = None;
            c.replay_until = None;
        }
        self.leaving.clear();
        let stop = |this: &mut Self, err: ClientError| {
            this.emit(ClientEvent::Error(err));
            this.emit(ClientEvent::Disconnected(Disconnected {
                code,
                reason: reason.clone(),
                cause,
                healthy,
                reconnect_in: None,
            }));
            Next::Stop
        };
        let action = match action {
            CloseAction::Fatal => {
                let err = ClientError::FatalClose {
                    code,
                    reason: reason.clone(),
                };
                return stop(self, err);
            }
            CloseAction::Unauthorized => {
                self.auth_failures += 1;
                self.token_reason = Some(TokenReason::Unauthorized);
                if self.auth_failures >= self.cfg.reconnect.max_auth_failures {
                    let err = ClientError::Unauthorized {
                        code,
                        reason: format!(
                            "token refused {} times in a row: {reason}",
                            self.auth_failures
                        ),
                    };
                    return stop(self, err);
                }
                self.failures += 1;
                CloseAction::Reconnect
            }
            CloseAction::Expired => {
                self.token_reason = Some(TokenReason::Expired);
                self.failures = if healthy { 0 } else { self.failures + 1 };
                CloseAction::Expired
            }
            CloseAction::Reconnect => {
                self.failures = if healthy { 0 } else { self.failures + 1 };
                CloseAction::Reconnect
            }
            CloseAction::Overload => {
                self.failures += 1;
                CloseAction::Overload
            }
        };
        let delay = reconnect_delay(
            action,
            self.failures,
            &self.cfg.reconnect,
            (self.cfg.random)(),
        );
        self.emit(ClientEvent::Disconnected(Disconnected {
            code,
            reason,
            cause,
            healthy,
            reconnect_in: Some(delay),
        }));
        self.set_state(State::Connecting);
        Next::Retry(delay)
    }

    async fn on_open(&mut self, ws: &mut Ws, conn: &mut Conn) -> Result<(), tungstenite::Error> {
        if let (Some(t), TokenTransport::Message) = (&self.token, self.cfg.token_transport) {
            let auth = serde_json::json!({"type": "auth", "token": t}).to_string();
            ws.send(Message::text(auth)).await?;
        }
        // The first ping proves the path to a shard: ws-lb completes the upgrade before it
        // knows whether it will close again with 1013.
        self.send_ping(ws, conn).await?;
        for c in self.chans.values_mut() {
            c.wire = Wire::Pending;
        }
        self.flush(ws).await
    }

    async fn send_ping(&mut self, ws: &mut Ws, conn: &mut Conn) -> Result<(), tungstenite::Error> {
        self.ping_id += 1;
        conn.next_ping = None;
        conn.ping_sent = Instant::now();
        conn.pong_deadline = Some(conn.ping_sent + self.cfg.pong_timeout);
        let ping = ClientMessage::Ping {
            id: Some(self.ping_id),
        };
        ws.send(Message::text(ping.to_json())).await
    }

    /// Sends one subscribe for every channel not yet asked for on this connection.
    async fn flush(&mut self, ws: &mut Ws) -> Result<(), tungstenite::Error> {
        let mut channels = Vec::new();
        let mut since = BTreeMap::new();
        for (name, c) in &mut self.chans {
            if c.wire != Wire::Pending || self.leaving.contains(name) {
                continue;
            }
            c.wire = Wire::Subscribing;
            channels.push(name.clone());
            if let Some(p) = &c.position {
                c.requested = Some(p.clone());
                since.insert(name.clone(), p.clone());
            }
        }
        if channels.is_empty() {
            return Ok(());
        }
        let msg = ClientMessage::Subscribe { channels, since };
        ws.send(Message::text(msg.to_json())).await
    }

    async fn command(
        &mut self,
        c: Command,
        ws: Option<&mut Ws>,
    ) -> Result<Flow, tungstenite::Error> {
        match c {
            Command::Subscribe {
                id,
                channel,
                since,
                tx,
                reply,
            } => {
                if self.chans.contains_key(&channel) {
                    let _ = reply.send(Err(SubscribeError::AlreadySubscribed(channel)));
                    return Ok(Flow::Continue);
                }
                self.chans.insert(
                    channel,
                    Chan {
                        id,
                        tx,
                        wire: Wire::Pending,
                        delivered: since.clone(),
                        position: since,
                        requested: None,
                        replay_until: None,
                        ever_subscribed: false,
                        lagged: None,
                    },
                );
                let _ = reply.send(Ok(()));
                if let Some(ws) = ws {
                    self.flush(ws).await?;
                }
            }
            Command::Unsubscribe { id, channel } => {
                let Some(c) = self.chans.get(&channel).filter(|c| c.id == id) else {
                    return Ok(Flow::Continue);
                };
                let asked = c.wire != Wire::Pending;
                self.chans.remove(&channel);
                if let (true, Some(ws)) = (asked, ws) {
                    self.leaving.insert(channel.clone());
                    let msg = ClientMessage::Unsubscribe {
                        channels: vec![channel],
                    };
                    ws.send(Message::text(msg.to_json())).await?;
                }
            }
            Command::Reconnect => {}
            Command::Close => return Ok(Flow::Exit),
        }
        Ok(Flow::Continue)
    }

    async fn on_text(
        &mut self,
        text: &str,
        ws: &mut Ws,
        conn: &mut Conn,
    ) -> Result<(), tungstenite::Error> {
        let inbound = decode(text);
        if matches!(
            inbound,
            Inbound::Known(
                ServerMessage::Pong { .. }
                    | ServerMessage::Subscribed { .. }
                    | ServerMessage::Message { .. }
            )
        ) && !conn.healthy
        {
            // A shard answered: this connection works (an error reply does not count).
            conn.healthy = true;
            self.failures = 0;
            self.auth_failures = 0;
        }
        match inbound {
            Inbound::Known(ServerMessage::Message {
                channel,
                epoch,
                seq,
                data,
            }) => self.on_message(channel, epoch, seq, data),
            Inbound::Known(ServerMessage::Subscribed {
                channel,
                epoch,
                seq,
                recovered,
            }) => self.on_subscribed(channel, epoch, seq, recovered),
            Inbound::Known(ServerMessage::Unsubscribed { channel }) => {
                self.leaving.remove(&channel);
                self.flush(ws).await?;
            }
            Inbound::Known(ServerMessage::Pong { id }) => {
                if id == Some(self.ping_id) && conn.pong_deadline.is_some() {
                    conn.pong_deadline = None;
                    let now = Instant::now();
                    self.emit(ClientEvent::Pong {
                        rtt: now.duration_since(conn.ping_sent),
                    });
                    conn.next_ping = Some(now + self.cfg.ping_interval);
                }
            }
            Inbound::Known(ServerMessage::Error { .. } | ServerMessage::Refreshed { .. })
            | Inbound::Other => {}
            Inbound::Refreshed => {
                conn.refresh_pending = false;
                conn.refresh_at = self.refresh_deadline();
            }
            Inbound::Error(err) => self.on_error(err, conn),
        }
        Ok(())
    }

    fn on_subscribed(&mut self, channel: String, epoch: String, seq: u64, recovered: bool) {
        let Some(c) = self.chans.get_mut(&channel) else {
            return;
        };
        if c.wire != Wire::Subscribing {
            return;
        }
        c.wire = Wire::Subscribed;
        let resubscribe = c.ever_subscribed;
        c.ever_subscribed = true;
        let current = Position {
            epoch: epoch.clone(),
            seq,
        };
        let mut out = vec![SubscriptionEvent::Subscribed {
            epoch: epoch.clone(),
            seq,
            recovered,
            resubscribe,
        }];
        let mut resync = None;
        match c.requested.take() {
            None => c.position = Some(current.clone()),
            Some(asked) if recovered => {
                c.replay_until = (asked.epoch == epoch).then_some(seq);
            }
            Some(asked) => {
                c.position = Some(current.clone());
                let r = Resync {
                    channel: channel.clone(),
                    reason: ResyncReason::NotRecovered,
                    previous: asked,
                    current: current.clone(),
                };
                out.push(SubscriptionEvent::Resync(r.clone()));
                resync = Some(r);
            }
        }
        if c.delivered.is_none() || resync.is_some() {
            c.delivered = Some(current);
        }
        deliver(c, &channel, out, &self.events);
        if let Some(r) = resync {
            self.emit(ClientEvent::Resync(r));
        }
    }

    fn on_message(&mut self, channel: String, epoch: String, seq: u64, data: serde_json::Value) {
        let Some(c) = self.chans.get_mut(&channel) else {
            return;
        };
        if c.wire != Wire::Subscribed {
            return;
        }
        let mut out = Vec::with_capacity(2);
        match &c.position {
            Some(p) if p.epoch == epoch && seq <= p.seq => return, // already delivered
            Some(p) if p.epoch != epoch => {
                let r = Resync {
                    channel: channel.clone(),
                    reason: ResyncReason::EpochChanged,
                    previous: p.clone(),
                    current: Position {
                        epoch: epoch.clone(),
                        seq,
                    },
                };
                let _ = self.events.send(ClientEvent::Resync(r.clone()));
                out.push(SubscriptionEvent::Resync(r));
            }
            _ => {}
        }
        c.position = Some(Position {
            epoch: epoch.clone(),
            seq,
        });
        let replayed = c.replay_until.is_some_and(|u| seq <= u);
        if !replayed {
            c.replay_until = None;
        }
        out.push(SubscriptionEvent::Message(Publication {
            channel: channel.clone(),
            epoch,
            seq,
            data,
            replayed,
        }));
        deliver(c, &channel, out, &self.events);
    }

    fn on_error(&mut self, err: ServerError, conn: &mut Conn) {
        if let Some(ch) = &err.channel {
            // Races of our own making (an unsubscribe crossing a message): nothing to report.
            if err.code == "not_subscribed" || err.code == "already_subscribed" {
                return;
            }
            if self
                .chans
                .get(ch)
                .is_some_and(|c| c.wire == Wire::Subscribing)
            {
                // Refused (forbidden, invalid_channel, too_many_subscriptions, ...): that
                // subscription ends; the connection and the others go on.
                if let Some(c) = self.chans.remove(ch) {
                    let _ = c.tx.try_send(SubscriptionEvent::Refused(err));
                }
                return;
            }
        } else if conn.refresh_pending {
            conn.refresh_pending = false;
            self.emit(ClientEvent::Error(ClientError::Refresh(err)));
            return;
        }
        self.emit(ClientEvent::Error(ClientError::Server(err)));
    }

    async fn on_refresh_token(
        &mut self,
        got: TokenResult,
        ws: &mut Ws,
        conn: &mut Conn,
    ) -> Result<(), tungstenite::Error> {
        let token = match got {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(()),
            Err(e) => {
                // The server closes with 4002 at expiry; the reconnect asks again.
                self.emit(ClientEvent::Error(ClientError::TokenProvider(
                    e.to_string(),
                )));
                return Ok(());
            }
        };
        let times = token_times(&token);
        if let Some(before) = self.times {
            if times.is_none_or(|t| t.exp <= before.exp) {
                self.emit(ClientEvent::Error(ClientError::TokenProvider(
                    "the provider returned, for a refresh, a token that does not expire later"
                        .into(),
                )));
                return Ok(());
            }
        }
        self.set_token(Some(token.clone()));
        conn.refresh_pending = true;
        let msg = serde_json::json!({"type": "refresh", "token": token}).to_string();
        ws.send(Message::text(msg)).await
    }
}

/// Hands events to a subscription without ever blocking the connection: a reader that does
/// not keep up loses events and gets one `Lagged` resync when it has room again.
fn deliver(
    c: &mut Chan,
    channel: &str,
    out: Vec<SubscriptionEvent>,
    events: &broadcast::Sender<ClientEvent>,
) {
    let need = out.len() + usize::from(c.lagged.is_some());
    if c.tx.capacity() < need {
        if c.lagged.is_none() {
            c.lagged = c.delivered.clone().or_else(|| c.position.clone());
        }
        return;
    }
    if let Some(previous) = c.lagged.take() {
        let current = c.position.clone().unwrap_or_else(|| previous.clone());
        let r = Resync {
            channel: channel.to_owned(),
            reason: ResyncReason::Lagged,
            previous,
            current,
        };
        let _ = events.send(ClientEvent::Resync(r.clone()));
        let _ = c.tx.try_send(SubscriptionEvent::Resync(r));
    }
    for ev in out {
        if let SubscriptionEvent::Message(m) = &ev {
            c.delivered = Some(Position {
                epoch: m.epoch.clone(),
                seq: m.seq,
            });
        }
        let _ = c.tx.try_send(ev);
    }
}

async fn poll_opt(f: &mut Option<TokenFuture>) -> TokenResult {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

fn decode(text: &str) -> Inbound {
    match ServerMessage::decode(text.as_bytes()) {
        Ok(ServerMessage::Error {
            code,
            message,
            channel,
        }) => Inbound::Error(ServerError {
            code: code.as_str().to_owned(),
            message,
            channel,
        }),
        Ok(ServerMessage::Refreshed { .. }) => Inbound::Refreshed,
        Ok(m) => Inbound::Known(m),
        // Types and error codes newer than this ws-protocol (servers can be newer).
        Err(_) => {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
                return Inbound::Other;
            };
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
            match s("type").as_deref() {
                Some("error") => Inbound::Error(ServerError {
                    code: s("code").unwrap_or_else(|| "unknown".into()),
                    message: s("message").unwrap_or_default(),
                    channel: s("channel"),
                }),
                Some("refreshed") => Inbound::Refreshed,
                _ => Inbound::Other,
            }
        }
    }
}

/// Percent-encodes a token for a query string (JWTs need none of it; opaque tokens might).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_newer_server_messages_leniently() {
        assert!(matches!(
            decode(r#"{"type":"error","code":"forbidden","message":"no","channel":"orders.u1"}"#),
            Inbound::Error(ServerError { ref code, channel: Some(ref c), .. }) if code == "forbidden" && c == "orders.u1"
        ));
        assert!(matches!(
            decode(r#"{"type":"refreshed","exp":1}"#),
            Inbound::Refreshed
        ));
        assert!(matches!(
            decode(r#"{"type":"pong","id":3}"#),
            Inbound::Known(ServerMessage::Pong { id: Some(3) })
        ));
        assert!(matches!(decode("not json"), Inbound::Other));
        assert!(matches!(decode(r#"{"type":"future"}"#), Inbound::Other));
    }

    #[test]
    fn tokens_are_percent_encoded() {
        assert_eq!(percent_encode("a.b-c_d~"), "a.b-c_d~");
        assert_eq!(percent_encode("a b+/="), "a%20b%2B%2F%3D");
    }
}
