//! The pub/sub side of a session: its subscriptions, its outbound queue in the hub, and the
//! answers to the client's JSON requests. No I/O and no lifecycle: replies go to the
//! session's [`Output`], and an overflowing queue is reported to the session, which closes.

use std::sync::Arc;

use tokio::time::Instant;
use ws_protocol::frame;
use ws_protocol::{ChannelName, ClientMessage, ErrorCode, ServerMessage};

use super::auth::{SessionAuth, TokenOutcome};
use super::output::Output;
use crate::hub::{Hub, Subscriber};
use crate::metrics::ShardMetrics;
use crate::queue::ConnQueue;

/// The connection's outbound queue overflowed: it is a slow consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overflowed;

/// Why a request ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The outbound queue overflowed (4000).
    Overflowed,
    /// An `auth` message on an anonymous connection carried a bad token (4001).
    Unauthorized(auth::AuthFailure),
}

impl From<Overflowed> for Stop {
    fn from(_: Overflowed) -> Self {
        Self::Overflowed
    }
}

#[derive(Debug)]
pub(crate) struct PubSub {
    hub: Arc<Hub>,
    /// This connection's subscriber id in the hub.
    id: u64,
    shard: u32,
    queue: Arc<ConnQueue>,
    channels: Vec<ChannelName>,
}

impl PubSub {
    pub(crate) fn new(hub: Arc<Hub>, shard: u32, queue_len: usize) -> Self {
        Self {
            id: hub.next_subscriber_id(),
            hub,
            shard,
            queue: Arc::new(ConnQueue::new(queue_len)),
            channels: Vec::new(),
        }
    }

    pub(crate) fn queue(&self) -> &ConnQueue {
        &self.queue
    }

    /// Moves what the hub queued for this connection to `out`.
    pub(crate) fn deliver(&self, out: &mut Output) -> Result<(), Overflowed> {
        if self.queue.drain_into(out.frames_mut()) {
            Err(Overflowed)
        } else {
            Ok(())
        }
    }

    /// Answers one text frame from the client.
    pub(crate) fn on_request(
        &mut self,
        text: &[u8],
        out: &mut Output,
        max_subscriptions: usize,
        metrics: &ShardMetrics,
        auth: &mut SessionAuth,
        now: Instant,
    ) -> Result<(), Stop> {
        let error = |out: &mut Output, code, message, channel| {
            metrics.error_reply(code);
            reply_error(out, code, message, channel);
        };
        match ClientMessage::decode(text) {
            Err(e) => error(out, e.code, e.message, None),
            Ok(ClientMessage::Ping { id }) => reply(out, &ServerMessage::Pong { id }),
            Ok(ClientMessage::Refresh { .. }) if auth.is_enabled() && auth.is_anonymous() => {
                let msg = "no token to refresh: send auth first".into();
                error(out, ErrorCode::InvalidToken, msg, None);
            }
            Ok(ClientMessage::Auth { token } | ClientMessage::Refresh { token }) => {
                match auth.on_token(&token, now) {
                    // Authentication off: a token changes nothing and nothing expires.
                    TokenOutcome::Ignored | TokenOutcome::Authenticated => {}
                    TokenOutcome::Refreshed { exp } => {
                        self.revoke(out, auth, metrics)?;
                        reply(out, &ServerMessage::Refreshed { exp });
                    }
                    TokenOutcome::Unauthorized(f) => return Err(Stop::Unauthorized(f)),
                    TokenOutcome::RefreshRefused(f) => {
                        metrics.auth_failure(f);
                        error(out, ErrorCode::InvalidToken, f.reason().into(), None);
                    }
                }
            }
            Ok(ClientMessage::Subscribe { channels, since }) => {
                for name in channels {
                    let channel = match ChannelName::new(&name) {
                        Ok(c) => c,
                        Err(e) => {
                            error(out, ErrorCode::InvalidChannel, e.to_string(), Some(name));
                            continue;
                        }
                    };
                    if !auth.may_subscribe(channel.as_str()) {
                        let msg = "not entitled to this channel".into();
                        error(out, ErrorCode::Forbidden, msg, Some(name));
                        continue;
                    }
                    if self.channels.contains(&channel) {
                        error(
                            out,
                            ErrorCode::AlreadySubscribed,
                            "already subscribed".into(),
                            Some(name),
                        );
                        continue;
                    }
                    if self.channels.len() >= max_subscriptions {
                        let msg =
                            format!("at most {max_subscriptions} subscriptions per connection");
                        error(out, ErrorCode::TooManySubscriptions, msg, Some(name));
                        continue;
                    }
                    let position = since.get(&name);
                    let sub = Subscriber {
                        id: self.id,
                        shard: self.shard,
                        queue: self.queue.clone(),
                    };
                    let r = match self.hub.subscribe(&channel, position, sub) {
                        Ok(r) => r,
                        Err(e) => {
                            error(out, ErrorCode::TooManyChannels, e.to_string(), Some(name));
                            continue;
                        }
                    };
                    self.channels.push(channel);
                    if position.is_some() {
                        metrics.recovery(r.recovered);
                    }
                    reply(
                        out,
                        &ServerMessage::Subscribed {
                            channel: name,
                            epoch: r.epoch.to_string(),
                            seq: r.seq,
                            recovered: r.recovered,
                        },
                    );
                    out.extend(r.replay);
                }
            }
            Ok(ClientMessage::Unsubscribe { channels }) => {
                for name in channels {
                    let pos = self.channels.iter().position(|c| c.as_str() == name);
                    let Some(pos) = pos else {
                        error(
                            out,
                            ErrorCode::NotSubscribed,
                            "not subscribed".into(),
                            Some(name),
                        );
                        continue;
                    };
                    let channel = self.channels.swap_remove(pos);
                    self.hub.unsubscribe(&channel, self.id);
                    // Everything queued before the unsubscribe goes out before the reply,
                    // nothing of the channel after it.
                    self.deliver(out)?;
                    reply(out, &ServerMessage::Unsubscribed { channel: name });
                }
            }
        }
        Ok(())
    }
}

impl PubSub {
    /// After a refresh: ends the subscriptions the new token no longer allows (each with a
    /// `forbidden` error naming the channel), so narrowed entitlements take effect at once.
    fn revoke(
        &mut self,
        out: &mut Output,
        auth: &SessionAuth,
        metrics: &ShardMetrics,
    ) -> Result<(), Overflowed> {
        let mut i = 0;
        while let Some(channel) = self.channels.get(i) {
            if auth.may_subscribe(channel.as_str()) {
                i += 1;
                continue;
            }
            let channel = self.channels.swap_remove(i);
            self.hub.unsubscribe(&channel, self.id);
            self.deliver(out)?;
            metrics.error_reply(ErrorCode::Forbidden);
            reply_error(
                out,
                ErrorCode::Forbidden,
                "no longer entitled after refresh".into(),
                Some(channel.as_str().to_owned()),
            );
        }
        Ok(())
    }
}

impl Drop for PubSub {
    /// Unsubscribes every channel and frees the queue when the session ends, whatever ends
    /// it (including a panic).
    fn drop(&mut self) {
        self.queue.close();
        for c in self.channels.drain(..) {
            self.hub.unsubscribe(&c, self.id);
        }
    }
}

/// The answer to a binary frame: the protocol is JSON text.
pub(crate) fn binary_not_supported(out: &mut Output, metrics: &ShardMetrics) {
    metrics.error_reply(ErrorCode::BinaryNotSupported);
    reply_error(
        out,
        ErrorCode::BinaryNotSupported,
        "send JSON text frames".into(),
        None,
    );
}

fn reply(out: &mut Output, msg: &ServerMessage) {
    out.push(frame::encode_frame(
        frame::OP_TEXT,
        msg.to_json().as_bytes(),
    ));
}

fn reply_error(out: &mut Output, code: ErrorCode, message: String, channel: Option<String>) {
    reply(
        out,
        &ServerMessage::Error {
            code,
            message,
            channel,
        },
    );
}
