//! One client connection's life: dial, establish (subscribe or settle), serve until the run
//! stops or the server ends it, reconnect with backoff and `since`, and close politely.
//!
//! Establishment is defined so that "established" means usable: with channels, the first
//! `subscribed` reply arrived; without, the 101 arrived and no close frame followed within
//! the settle window (a server that accepts and immediately closes with 1013 is overloaded,
//! not healthy). At the end of a run the client sends close 1000 and waits for the server to
//! close TCP first, so TIME_WAIT lands on the server and not on our ephemeral ports.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use ws_protocol::frame::{close_payload, encode_masked_frame, Decoder, Limits, Role};
use ws_protocol::frame::{OP_CLOSE, OP_PONG, OP_TEXT};
use ws_protocol::{ClientMessage, Position};

use crate::frames::{read_once, Inbox, ReadResult, Session, Track};
use crate::handshake::{dial, Target};
use crate::outcome::{Disconnect, Failure};
use crate::stats::Stats;
use crate::stream::Stream;
use crate::token::{AttemptTokens, TokenPlace};

/// Everything a connection task needs, shared by all of them.
#[derive(Debug)]
pub struct Ctx {
    /// Where connections go: attempt `id` dials `targets[id % len]` (one URL, or several to
    /// spread the connections over them).
    pub targets: Vec<Target>,
    pub stats: Arc<Stats>,
    pub channels: Vec<Arc<str>>,
    pub channels_per_conn: usize,
    /// This process's source addresses (its share when it is a worker).
    pub source_ips: Vec<IpAddr>,
    /// Worker count: attempt `id` is this process's `id / stride`-th, which picks its
    /// source address so that every address of the share is used in turn.
    pub stride: u64,
    pub handshake_timeout: Duration,
    pub settle: Duration,
    pub reconnect: bool,
    /// With `reconnect`: each client resumes its own TLS session when it re-dials.
    pub tls_resume: bool,
    /// First and largest re-dial delay (`--reconnect-min-delay`, `--reconnect-max-delay`);
    /// each jittered so a mass disconnect does not come back as a synchronized storm.
    pub reconnect_delay: (Duration, Duration),
    /// Each connection closes itself this long after it was first established (churn).
    pub lifetime: Option<Duration>,
    pub max_message: usize,
    /// Each attempt's token, when the server wants one.
    pub tokens: Option<AttemptTokens>,
    /// Becomes true when the run ends; every task then closes its connection.
    pub stop: watch::Receiver<bool>,
}

impl Ctx {
    /// Channels of connection `id`: consecutive slices of the list, round-robin, so that
    /// every channel gets the same number of subscribers.
    fn tracks_for(&self, id: u64) -> Vec<Track> {
        let n = self.channels.len() as u64;
        if n == 0 {
            return Vec::new();
        }
        let per = self.channels_per_conn as u64;
        (0..per.min(n))
            .filter_map(|k| {
                let i = usize::try_from((id * per + k) % n).ok()?;
                let name = self.channels.get(i)?.clone();
                Some(Track {
                    channel: i,
                    name,
                    pos: None,
                    resuming: false,
                })
            })
            .collect()
    }

    /// The target of connection `id` (`targets` is never empty: the config has at least
    /// one URL).
    fn target_for(&self, id: u64) -> &Target {
        let i = id % self.targets.len().max(1) as u64;
        &self.targets[usize::try_from(i).unwrap_or(0)]
    }

    fn source_for(&self, id: u64) -> Option<IpAddr> {
        let n = self.source_ips.len() as u64;
        if n == 0 {
            return None;
        }
        let i = usize::try_from((id / self.stride.max(1)) % n).ok()?;
        self.source_ips.get(i).copied()
    }
}

struct Conn {
    stream: Stream,
    decoder: Decoder,
    /// Frame bytes that arrived with the 101; processed first, then freed.
    pending: Vec<u8>,
}

enum Pumped {
    Goal,
    Deadline,
    Stop,
    Ended(Disconnect, bool),
}

enum EstError {
    Failed(Failure),
    Stopped,
}

/// Runs attempt `id`, due at `due`, for the rest of the run.
pub async fn run_connection(ctx: Arc<Ctx>, id: u64, due: Instant) {
    ctx.stats.attempt_started(due);
    let mut stop = ctx.stop.clone();
    let mut sess = Session {
        id,
        tracks: ctx.tracks_for(id),
        received: 0,
        subscribed: 0,
        error_reply: false,
        tls: None,
    };
    let mut conn = match Box::pin(establish(&ctx, &mut sess, &mut stop, false)).await {
        Ok(c) => {
            ctx.stats.established();
            c
        }
        Err(e) => {
            let f = match e {
                EstError::Failed(f) => f,
                EstError::Stopped => Failure::Aborted,
            };
            ctx.stats.failed(&f);
            return;
        }
    };
    // Churn: the connection's end, counted from its first establishment (a reconnect does
    // not extend it).
    let end_of_life = ctx.lifetime.map(|l| Instant::now() + l);
    loop {
        match pump(
            &mut conn,
            &mut sess,
            &ctx.stats,
            &mut stop,
            end_of_life,
            false,
        )
        .await
        {
            Pumped::Ended(d, _) => {
                ctx.stats.disconnected(&d);
                drop(conn);
                if !ctx.reconnect {
                    break;
                }
                match Box::pin(reconnect(&ctx, &mut sess, &mut stop)).await {
                    Some(c) => conn = c,
                    None => break,
                }
            }
            Pumped::Stop | Pumped::Goal | Pumped::Deadline => {
                Box::pin(close_politely(conn, &mut sess, &ctx)).await;
                ctx.stats.closed_by_us();
                break;
            }
        }
    }
    ctx.stats.connection_done(sess.received);
}

/// Dials and establishes; with `resume`, subscribes with `since` = last seen positions.
async fn establish(
    ctx: &Ctx,
    sess: &mut Session,
    stop: &mut watch::Receiver<bool>,
    resume: bool,
) -> Result<Conn, EstError> {
    let token = ctx
        .tokens
        .as_ref()
        .and_then(|t| Some((t.place, t.for_attempt(sess.id)?)));
    let query_token = match token {
        Some((TokenPlace::Query, t)) => Some(t),
        _ => None,
    };
    let target = ctx.target_for(sess.id);
    if ctx.reconnect && ctx.tls_resume && sess.tls.is_none() {
        sess.tls = target.tls.as_ref().map(crate::stream::Tls::own_config);
    }
    let started = Instant::now();
    let up = dial(
        target,
        query_token,
        ctx.source_for(sess.id),
        started + ctx.handshake_timeout,
        sess.tls.as_ref(),
    )
    .await
    .map_err(EstError::Failed)?;
    let upgraded_at = Instant::now();
    if let Some(resumed) = up.stream.tls_resumed() {
        ctx.stats.tls_handshake(resumed);
    }
    ctx.stats.handshake_done(upgraded_at - started);
    let decoder = Decoder::new(Role::Client, Limits::new(ctx.max_message));
    let mut conn = Conn {
        stream: up.stream,
        decoder,
        pending: up.leftover,
    };
    if let Some((TokenPlace::Message, token)) = token {
        let auth = ClientMessage::Auth {
            token: token.to_owned(),
        }
        .to_json();
        send(&mut conn.stream, OP_TEXT, auth.as_bytes())
            .await
            .map_err(|e| EstError::Failed(Failure::from_io(&e)))?;
    }
    let (until, want_subscribed) = if sess.tracks.is_empty() {
        (upgraded_at + ctx.settle, false)
    } else {
        let mut since = BTreeMap::new();
        for t in &mut sess.tracks {
            t.resuming = resume && t.pos.is_some();
            if let (true, Some((epoch, seq))) = (t.resuming, &t.pos) {
                since.insert(
                    t.name.to_string(),
                    Position {
                        epoch: epoch.clone(),
                        seq: *seq,
                    },
                );
            }
        }
        let channels = sess.tracks.iter().map(|t| t.name.to_string()).collect();
        let sub = ClientMessage::Subscribe { channels, since }.to_json();
        send(&mut conn.stream, OP_TEXT, sub.as_bytes())
            .await
            .map_err(|e| EstError::Failed(Failure::from_io(&e)))?;
        sess.subscribed = 0;
        sess.error_reply = false;
        (upgraded_at + ctx.handshake_timeout, true)
    };
    match pump(
        &mut conn,
        sess,
        &ctx.stats,
        stop,
        Some(until),
        want_subscribed,
    )
    .await
    {
        Pumped::Goal if sess.subscribed > 0 => Ok(conn),
        Pumped::Goal => Err(EstError::Failed(Failure::SubscribeError)),
        Pumped::Deadline if want_subscribed => Err(EstError::Failed(Failure::SubscribeTimeout)),
        Pumped::Deadline => Ok(conn),
        Pumped::Ended(d, reset) => Err(EstError::Failed(d.as_failure(reset))),
        Pumped::Stop => Err(EstError::Stopped),
    }
}

/// Reads and handles frames until the goal (a `subscribed` or `error` reply, when
/// `want_subscribed`), the deadline, the stop signal or the end of the connection.
async fn pump(
    conn: &mut Conn,
    sess: &mut Session,
    stats: &Stats,
    stop: &mut watch::Receiver<bool>,
    until: Option<Instant>,
    want_subscribed: bool,
) -> Pumped {
    if !conn.pending.is_empty() {
        let mut pending = std::mem::take(&mut conn.pending);
        let mut inbox = Inbox::default();
        crate::frames::feed(&mut conn.decoder, &mut pending, sess, stats, &mut inbox);
        if let Some(end) = act_if_needed(conn, inbox, stats).await {
            return end;
        }
    }
    // One timer for the whole wait, boxed so that the long serve phase (no deadline) does
    // not carry a timer's state in every connection's task.
    let mut timer = until.map(|d| Box::pin(tokio::time::sleep_until(d)));
    loop {
        if want_subscribed && (sess.subscribed > 0 || sess.error_reply) {
            return Pumped::Goal;
        }
        let ready = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return Pumped::Stop,
            () = expire(&mut timer) => return Pumped::Deadline,
            r = conn.stream.readable() => r,
        };
        if ready.is_err() {
            return Pumped::Ended(Disconnect::NoCloseFrame, true);
        }
        let mut inbox = Inbox::default();
        match read_once(&mut conn.stream, &mut conn.decoder, sess, stats, &mut inbox) {
            ReadResult::Data => {}
            ReadResult::WouldBlock => continue,
            ReadResult::Eof => return Pumped::Ended(Disconnect::NoCloseFrame, false),
            ReadResult::Error(e) => {
                let reset = Failure::from_io(&e) == Failure::Reset;
                return Pumped::Ended(Disconnect::NoCloseFrame, reset);
            }
        }
        if let Some(end) = act_if_needed(conn, inbox, stats).await {
            return end;
        }
    }
}

/// Most reads carry only data; pings and closes are rare, so their (larger) write state is
/// boxed and allocated only when there is something to send.
async fn act_if_needed(conn: &mut Conn, inbox: Inbox, stats: &Stats) -> Option<Pumped> {
    if inbox.pong.is_none() && inbox.close.is_none() && inbox.violation.is_none() {
        return None;
    }
    Box::pin(act(conn, inbox, stats)).await
}

/// Completes when the optional timer fires; never without one.
async fn expire(timer: &mut Option<Pin<Box<Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Answers pings and closes; returns how the connection ended, if it did.
async fn act(conn: &mut Conn, inbox: Inbox, stats: &Stats) -> Option<Pumped> {
    if let Some(payload) = inbox.pong {
        if send(&mut conn.stream, OP_PONG, &payload).await.is_ok() {
            stats.c.pings_answered.fetch_add(1, Relaxed);
        }
    }
    if let Some(code) = inbox.violation {
        let _ = send(
            &mut conn.stream,
            OP_CLOSE,
            &close_payload(code, "protocol error"),
        )
        .await;
        return Some(Pumped::Ended(Disconnect::Protocol(code), false));
    }
    if let Some(code) = inbox.close {
        // Echo the server's code as RFC 6455 §5.5.1 asks; an empty close gets an empty reply.
        let payload = code.map(|c| close_payload(c, "")).unwrap_or_default();
        let _ = send(&mut conn.stream, OP_CLOSE, &payload).await;
        return Some(Pumped::Ended(Disconnect::Closed(code), false));
    }
    None
}

/// Re-dials with jittered exponential backoff until established or the run stops.
async fn reconnect(
    ctx: &Ctx,
    sess: &mut Session,
    stop: &mut watch::Receiver<bool>,
) -> Option<Conn> {
    let (mut backoff, backoff_max) = ctx.reconnect_delay;
    loop {
        let jittered = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return None,
            () = tokio::time::sleep(jittered) => {}
        }
        ctx.stats.c.reconnect_attempts.fetch_add(1, Relaxed);
        match Box::pin(establish(ctx, sess, stop, true)).await {
            Ok(conn) => {
                ctx.stats.reconnected();
                return Some(conn);
            }
            Err(EstError::Failed(f)) => ctx.stats.reconnect_failed(&f),
            Err(EstError::Stopped) => return None,
        }
        backoff = (backoff * 2).min(backoff_max);
    }
}

/// Sends close 1000 and waits (bounded by the handshake timeout) for the server's close or
/// EOF, so the server closes TCP first.
async fn close_politely(mut conn: Conn, sess: &mut Session, ctx: &Ctx) {
    if send(
        &mut conn.stream,
        OP_CLOSE,
        &close_payload(ws_protocol::close::NORMAL, ""),
    )
    .await
    .is_err()
    {
        return;
    }
    let _ = tokio::time::timeout(ctx.handshake_timeout, async {
        loop {
            if conn.stream.readable().await.is_err() {
                return;
            }
            let mut inbox = Inbox::default();
            match read_once(
                &mut conn.stream,
                &mut conn.decoder,
                sess,
                &ctx.stats,
                &mut inbox,
            ) {
                ReadResult::WouldBlock => continue,
                ReadResult::Data if inbox.close.is_none() && inbox.violation.is_none() => continue,
                _ => return,
            }
        }
    })
    .await;
}

/// Sends one masked frame with a fresh random mask.
async fn send(stream: &mut Stream, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
    let mask: [u8; 4] = rand::rng().random();
    stream
        .write_all(&encode_masked_frame(opcode, payload, mask))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(stride: u64) -> Arc<Ctx> {
        let (_tx, stop) = watch::channel(false);
        Arc::new(Ctx {
            targets: vec![Target {
                addr: ([127, 0, 0, 1], 9).into(),
                authority: "x".into(),
                path: "/".into(),
                tls: None,
            }],
            stats: Arc::new(Stats::new(Instant::now(), 5)),
            channels: (0..5)
                .map(|i| Arc::from(format!("c.{i}").as_str()))
                .collect(),
            channels_per_conn: 2,
            source_ips: vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()],
            stride,
            handshake_timeout: Duration::from_secs(1),
            settle: Duration::from_millis(10),
            reconnect: true,
            tls_resume: true,
            reconnect_delay: (Duration::from_millis(100), Duration::from_secs(5)),
            lifetime: None,
            max_message: 1 << 16,
            tokens: None,
            stop,
        })
    }

    #[test]
    fn assigns_channels_and_sources_round_robin() {
        let ctx = ctx(1);
        let names = |id| {
            ctx.tracks_for(id)
                .iter()
                .map(|t| t.channel)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(0), vec![0, 1]);
        assert_eq!(names(1), vec![2, 3]);
        assert_eq!(names(2), vec![4, 0]);
        assert_eq!(ctx.source_for(0), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(ctx.source_for(3), Some("127.0.0.3".parse().unwrap()));
        // Worker 1 of 2 performs ids 1, 3, 5, 7: it alternates over its own addresses.
        let worker = self::ctx(2);
        let used: Vec<_> = [1, 3, 5, 7]
            .map(|id| worker.source_for(id).unwrap())
            .to_vec();
        assert_eq!(
            used,
            vec![
                worker.source_ips[0],
                worker.source_ips[1],
                worker.source_ips[0],
                worker.source_ips[1]
            ]
        );
    }

    #[test]
    fn an_idle_connection_task_is_small() {
        // The task future is allocated once for the connection's whole life; dialing and
        // establishing are boxed so their state is freed after use, and the read buffer lives
        // on the stack of a synchronous helper. This bound keeps it that way.
        let fut = run_connection(ctx(1), 0, Instant::now());
        let size = std::mem::size_of_val(&fut);
        println!("connection task future: {size} bytes");
        assert!(size < 1024, "connection task future grew to {size} bytes");
    }
}
