//! The odin-ws client: a [`Stream`] of messages per subscription that keeps the recovery
//! promise of `docs/protocol.md` for the application.
//!
//! One background task owns the WebSocket. It tracks the `(epoch, seq)` of every channel,
//! resubscribes with `since` after every reconnect, drops duplicates, reconnects per close code
//! (promptly with jitter after 1012/1001/4000 or a lost path, exponential backoff after 1013,
//! never blindly after 1002/1007/1008/1009), pings to find dead paths, and refreshes the token
//! before it expires. What it cannot guarantee it says: a [`Resync`] event means messages may
//! be missing and the application must resynchronise (fetch a snapshot).
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use ws_client::{Client, Config, SubscriptionEvent};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect(Config::new("ws://127.0.0.1:3001/ws"))?;
//! let mut trades = client.subscribe("trades.BTC-USD").await?;
//! while let Some(ev) = trades.next().await {
//!     match ev {
//!         SubscriptionEvent::Message(m) => println!("{} {}", m.seq, m.data),
//!         SubscriptionEvent::Resync(r) => println!("gap after {:?}: fetch a snapshot", r.previous),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! `docs/clients.md` has the state diagram and the reconnect rules.

mod driver;
pub mod policy;
pub mod token;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

pub use policy::{CloseAction, Reconnect};
pub use token::{TokenProvider, TokenReason, TokenResult, TokenTransport};
pub use ws_protocol::Position;

/// Client settings. [`Config::new`] gives the documented defaults.
#[derive(Clone)]
pub struct Config {
    /// `ws://host:port/ws` of ws-lb.
    pub url: String,
    pub reconnect: Reconnect,
    /// Application ping period while connected (10 s).
    pub ping_interval: Duration,
    /// A ping unanswered, with nothing else received, for this long ends the connection (5 s).
    pub pong_timeout: Duration,
    /// TCP connect plus WebSocket handshake must finish within this (10 s).
    pub connect_timeout: Duration,
    /// Where the token goes (query parameter by default).
    pub token_transport: TokenTransport,
    /// Refresh this long before the token's `exp` (30 s).
    pub refresh_margin: Duration,
    /// Events buffered per subscription for a slow reader; beyond, the subscription gets a
    /// [`ResyncReason::Lagged`] resync instead of the messages it could not take (8192).
    pub subscription_buffer: usize,
    /// Source of randomness for jitter, in [0, 1) (tests pin it).
    pub random: fn() -> f64,
    token_provider: Option<Arc<dyn TokenProvider>>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("url", &self.url)
            .field("reconnect", &self.reconnect)
            .field("ping_interval", &self.ping_interval)
            .field("pong_timeout", &self.pong_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("token_transport", &self.token_transport)
            .field("refresh_margin", &self.refresh_margin)
            .field("subscription_buffer", &self.subscription_buffer)
            .field("token_provider", &self.token_provider.is_some())
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            reconnect: Reconnect::default(),
            ping_interval: Duration::from_secs(10),
            pong_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            token_transport: TokenTransport::Query,
            refresh_margin: Duration::from_secs(30),
            subscription_buffer: 8192,
            random: rand::random::<f64>,
            token_provider: None,
        }
    }

    /// Sets the token provider (`async fn(TokenReason) -> TokenResult`, or a [`TokenProvider`]).
    pub fn token_provider(mut self, p: impl TokenProvider) -> Self {
        self.token_provider = Some(Arc::new(p));
        self
    }
}

/// Settings the client refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Reconnect(#[from] policy::InvalidReconnect),
    #[error("url must start with ws:// (this build has no TLS; put a TLS terminator in front)")]
    Url,
    #[error("{0} must be above zero")]
    Zero(&'static str),
}

/// Why a subscribe call was refused locally (the server's refusals arrive on the stream).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("invalid channel name: {0}")]
    InvalidChannel(String),
    #[error("already subscribed to {0}")]
    AlreadySubscribed(String),
    #[error("the client is closed")]
    Closed,
}

/// One published message, delivered once and in order per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Publication {
    pub channel: String,
    pub epoch: String,
    pub seq: u64,
    pub data: serde_json::Value,
    /// Replayed from the server's history after a reconnect (not live).
    pub replayed: bool,
}

/// Why continuity was lost for a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// The server's history did not cover the gap (or the stream was restarted).
    NotRecovered,
    /// A live message came from a new stream generation.
    EpochChanged,
    /// The application did not read the subscription fast enough; events were dropped.
    Lagged,
}

impl ResyncReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotRecovered => "not_recovered",
            Self::EpochChanged => "epoch_changed",
            Self::Lagged => "lagged",
        }
    }
}

/// Messages may be missing between `previous` (the last position delivered) and what follows:
/// resynchronise from elsewhere (a snapshot), then apply the messages that keep coming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resync {
    pub channel: String,
    pub reason: ResyncReason,
    pub previous: Position,
    pub current: Position,
}

/// An `error` reply from the server (the connection stays open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub code: String,
    pub message: String,
    pub channel: Option<String>,
}

/// What a subscription's stream yields.
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriptionEvent {
    /// The server confirmed the subscription (again after each reconnect).
    Subscribed {
        epoch: String,
        seq: u64,
        recovered: bool,
        resubscribe: bool,
    },
    Message(Publication),
    Resync(Resync),
    /// The server refused the subscription (`forbidden`, `invalid_channel`, ...); the stream
    /// ends after this.
    Refused(ServerError),
}

/// Connection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting to (re)connect or dialling.
    Connecting,
    Connected,
    /// Stopped: closed by the application, or a close that retrying cannot fix.
    Disconnected,
}

/// Why a connection or an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectCause {
    /// A close frame arrived.
    Closed,
    /// The connection failed or ended without a close frame.
    Lost,
    /// A ping went unanswered.
    PingTimeout,
    /// The handshake did not finish within `connect_timeout`.
    ConnectTimeout,
    /// The application closed the client.
    Client,
}

impl DisconnectCause {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Lost => "lost",
            Self::PingTimeout => "ping_timeout",
            Self::ConnectTimeout => "connect_timeout",
            Self::Client => "client",
        }
    }
}

/// A connection (or an attempt) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnected {
    /// Close code; 1006 when there was no close frame.
    pub code: u16,
    pub reason: String,
    pub cause: DisconnectCause,
    /// A shard had answered on this connection.
    pub healthy: bool,
    /// When the next attempt starts; `None`: the client stopped.
    pub reconnect_in: Option<Duration>,
}

/// Problems the application should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// Closed with a code that retrying cannot fix (1002, 1007, 1008, 1009, ...); stopped.
    FatalClose { code: u16, reason: String },
    /// The token was refused `max_auth_failures` times in a row; stopped.
    Unauthorized { code: u16, reason: String },
    /// A token refresh was refused; the connection stays until the token expires.
    Refresh(ServerError),
    /// The token provider failed.
    TokenProvider(String),
    /// An error reply not tied to a subscription.
    Server(ServerError),
}

/// Connection-level events ([`Client::events`]).
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    Connecting { attempt: u64 },
    Connected { attempt: u64 },
    Disconnected(Disconnected),
    Resync(Resync),
    Error(ClientError),
    Pong { rtt: Duration },
}

enum Command {
    Subscribe {
        id: u64,
        channel: String,
        since: Option<Position>,
        tx: mpsc::Sender<SubscriptionEvent>,
        reply: oneshot::Sender<Result<(), SubscribeError>>,
    },
    Unsubscribe {
        id: u64,
        channel: String,
    },
    Reconnect,
    Close,
}

/// A handle on the connection. Cloning shares it; the connection ends with [`Client::close`]
/// or when every handle and subscription is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    cmd: mpsc::UnboundedSender<Command>,
    events: broadcast::Sender<ClientEvent>,
    state: watch::Receiver<State>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
    buffer: usize,
}

impl Client {
    /// Starts the connection task on the current tokio runtime.
    pub fn connect(config: Config) -> Result<Self, ConfigError> {
        config.reconnect.validate()?;
        if !config.url.starts_with("ws://") {
            return Err(ConfigError::Url);
        }
        for (name, d) in [
            ("ping_interval", config.ping_interval),
            ("pong_timeout", config.pong_timeout),
            ("connect_timeout", config.connect_timeout),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        if config.subscription_buffer < 2 {
            return Err(ConfigError::Zero("subscription_buffer - 1"));
        }
        let (cmd, cmd_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(1024);
        let (state_tx, state) = watch::channel(State::Connecting);
        let buffer = config.subscription_buffer;
        tokio::spawn(driver::Driver::new(config, cmd_rx, events.clone(), state_tx).run());
        Ok(Self {
            cmd,
            events,
            state,
            next_id: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            buffer,
        })
    }

    /// Subscribes to `channel` from its current position.
    pub async fn subscribe(&self, channel: &str) -> Result<Subscription, SubscribeError> {
        self.subscribe_inner(channel, None).await
    }

    /// Subscribes to `channel`, resuming after `since` (a position stored earlier).
    pub async fn subscribe_since(
        &self,
        channel: &str,
        since: Position,
    ) -> Result<Subscription, SubscribeError> {
        self.subscribe_inner(channel, Some(since)).await
    }

    async fn subscribe_inner(
        &self,
        channel: &str,
        since: Option<Position>,
    ) -> Result<Subscription, SubscribeError> {
        ws_protocol::ChannelName::new(channel)
            .map_err(|e| SubscribeError::InvalidChannel(e.to_string()))?;
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (reply, rx_reply) = oneshot::channel();
        let (sub_tx, sub_rx) = mpsc::channel(self.buffer);
        self.cmd
            .send(Command::Subscribe {
                id,
                channel: channel.to_owned(),
                since,
                tx: sub_tx,
                reply,
            })
            .map_err(|_| SubscribeError::Closed)?;
        rx_reply.await.map_err(|_| SubscribeError::Closed)??;
        Ok(Subscription {
            id,
            channel: channel.to_owned(),
            rx: sub_rx,
            cmd: self.cmd.clone(),
        })
    }

    /// Connection-level events from now on.
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.events.subscribe()
    }

    /// The current state.
    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// A receiver of state changes.
    pub fn watch_state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// Starts connecting again after the client stopped (a fatal close or refused tokens).
    pub fn reconnect(&self) {
        let _ = self.cmd.send(Command::Reconnect);
    }

    /// Closes the connection and ends every subscription stream.
    pub fn close(&self) {
        let _ = self.cmd.send(Command::Close);
    }
}

/// One channel's events. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    id: u64,
    channel: String,
    rx: mpsc::Receiver<SubscriptionEvent>,
    cmd: mpsc::UnboundedSender<Command>,
}

impl Subscription {
    pub fn channel(&self) -> &str {
        &self.channel
    }
}

impl Stream for Subscription {
    type Item = SubscriptionEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.cmd.send(Command::Unsubscribe {
            id: self.id,
            channel: std::mem::take(&mut self.channel),
        });
    }
}
