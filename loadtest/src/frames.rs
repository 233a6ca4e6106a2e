//! The receive side of one connection: a synchronous read into a stack buffer, the frame
//! decoder, and per-channel sequence tracking.
//!
//! Reading happens in [`read_once`], a plain function called after the socket reported
//! readiness. Its 16 KiB buffer lives on the worker thread's stack only for the duration of
//! the call, so an idle connection holds no heap read buffer and its task future stays small;
//! that is what lets one process hold ~10k idle connections in a few megabytes.

use std::borrow::Cow;
use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use ws_protocol::frame::{Decoder, Flow, Message};
use ws_protocol::ServerMessage;

use crate::stats::{unix_us, Stats};
use crate::stream::Stream;

/// Bytes read per readiness event.
const READ_BUF: usize = 16 * 1024;

/// Where one subscribed channel stands on this connection.
#[derive(Debug)]
pub struct Track {
    /// Index into the run's channel list (for per-channel counts).
    pub channel: usize,
    pub name: Arc<str>,
    /// Last seen (epoch, seq); the next message should carry seq + 1.
    pub pos: Option<(String, u64)>,
    /// Whether the pending subscribe carried `since` for this channel.
    pub resuming: bool,
}

/// Per-connection receive state that survives reconnects.
#[derive(Debug)]
pub struct Session {
    /// Global attempt index; also picks the delivery-histogram shard.
    pub id: u64,
    pub tracks: Vec<Track>,
    /// Messages received over the connection's whole life.
    pub received: u64,
    /// `subscribed` replies since the last subscribe was sent.
    pub subscribed: u32,
    /// An `error` reply arrived since the last subscribe was sent.
    pub error_reply: bool,
    /// The client's own TLS configuration (its session cache), made at its first `wss://`
    /// dial when it may re-dial and resumption is on.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// What a batch of frames asks the connection to do next.
#[derive(Debug, Default)]
pub struct Inbox {
    /// Payload of the latest ping (RFC 6455 allows answering only the most recent one).
    pub pong: Option<Vec<u8>>,
    /// A close frame arrived, with its code if any.
    pub close: Option<Option<u16>>,
    /// The server broke the framing rules; close with this code.
    pub violation: Option<u16>,
}

/// Outcome of one read attempt.
#[derive(Debug)]
pub enum ReadResult {
    Data,
    WouldBlock,
    Eof,
    Error(io::Error),
}

/// Reads once from a ready socket and decodes everything that arrived.
pub fn read_once(
    stream: &mut Stream,
    decoder: &mut Decoder,
    sess: &mut Session,
    stats: &Stats,
    inbox: &mut Inbox,
) -> ReadResult {
    let mut buf = [0u8; READ_BUF];
    match stream.try_read(&mut buf) {
        Ok(0) => ReadResult::Eof,
        Ok(n) => {
            if let Some(data) = buf.get_mut(..n) {
                feed(decoder, data, sess, stats, inbox);
            }
            ReadResult::Data
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadResult::WouldBlock,
        Err(e) => ReadResult::Error(e),
    }
}

/// Feeds bytes to the decoder and handles every complete frame.
pub fn feed(
    decoder: &mut Decoder,
    data: &mut [u8],
    sess: &mut Session,
    stats: &Stats,
    inbox: &mut Inbox,
) {
    let result = decoder.feed(data, &mut |m| match m {
        Message::Text(text) => {
            on_text(text.as_bytes(), sess, stats);
            Flow::Continue
        }
        // Our protocol is text-only; binary frames from other servers are just counted.
        Message::Binary(_) => {
            stats.c.undecodable.fetch_add(1, Relaxed);
            Flow::Continue
        }
        Message::Ping(payload) => {
            inbox.pong = Some(payload.to_vec());
            Flow::Continue
        }
        Message::Pong(_) => Flow::Continue,
        Message::Close(c) => {
            inbox.close = Some(c.map(|(code, _)| code));
            Flow::Stop
        }
    });
    if let Err(v) = result {
        inbox.violation = Some(v.close_code);
    }
}

impl Session {
    fn track_mut(&mut self, channel: &str) -> Option<&mut Track> {
        self.tracks.iter_mut().find(|t| &*t.name == channel)
    }
}

/// The fields of a `message` frame the generator uses, borrowed from the frame. Every
/// delivery went through `ServerMessage::decode` before: an internally tagged enum (serde
/// buffers the whole object first) with `data` built as a `serde_json::Value` — in a dense
/// fan-out run about three quarters of the generator's CPU, on the same two cores as the
/// servers it measures. Anything this does not match takes the full decode below.
#[derive(serde::Deserialize)]
struct Delivery<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    epoch: Cow<'a, str>,
    seq: u64,
    data: Stamp,
}

/// `data`'s `ts_us` (the publisher's clock), other fields skipped unparsed.
#[derive(serde::Deserialize)]
struct Stamp {
    #[serde(default)]
    ts_us: Option<u64>,
}

fn on_text(bytes: &[u8], sess: &mut Session, stats: &Stats) {
    if let Ok(d) = serde_json::from_slice::<Delivery<'_>>(bytes) {
        if d.kind == "message" {
            return on_delivery(sess, stats, &d.channel, &d.epoch, d.seq, d.data.ts_us);
        }
    }
    let Ok(msg) = ServerMessage::decode(bytes) else {
        // Not our protocol (an echo server, say): counted, never fatal.
        stats.c.undecodable.fetch_add(1, Relaxed);
        return;
    };
    match msg {
        ServerMessage::Subscribed {
            channel,
            epoch,
            seq,
            recovered,
        } => {
            sess.subscribed += 1;
            if let Some(t) = sess.track_mut(&channel) {
                if t.resuming && !recovered {
                    stats.c.recovered_false.fetch_add(1, Relaxed);
                }
                // After a recovered resubscribe the server replays from our position, so we
                // keep it; otherwise the reply's position is where the stream starts.
                if !(t.resuming && recovered) {
                    t.pos = Some((epoch, seq));
                }
                t.resuming = false;
            }
        }
        ServerMessage::Message {
            channel,
            epoch,
            seq,
            data,
        } => {
            let ts = data.get("ts_us").and_then(serde_json::Value::as_u64);
            on_delivery(sess, stats, &channel, &epoch, seq, ts);
        }
        ServerMessage::Error { .. } => {
            sess.error_reply = true;
            stats.c.server_errors.fetch_add(1, Relaxed);
        }
        ServerMessage::Pong { .. }
        | ServerMessage::Unsubscribed { .. }
        | ServerMessage::Refreshed { .. } => {}
    }
}

/// A `message` frame: counted, its latency recorded, its position checked.
fn on_delivery(
    sess: &mut Session,
    stats: &Stats,
    channel: &str,
    epoch: &str,
    seq: u64,
    ts_us: Option<u64>,
) {
    sess.received += 1;
    // Same machine, same clock: a negative difference is clock noise.
    let latency = ts_us.map(|ts| unix_us().saturating_sub(ts));
    let id = sess.id;
    let track = sess.track_mut(channel);
    stats.delivery(id, track.as_ref().map(|t| t.channel), latency);
    if let Some(t) = track {
        track_seq(t, epoch, seq, stats);
    }
}

/// Compares a message's position with the last one seen on its channel.
fn track_seq(t: &mut Track, epoch: &str, seq: u64, stats: &Stats) {
    match &mut t.pos {
        Some((e, last)) if *e == epoch => {
            if seq <= *last {
                stats.c.duplicates.fetch_add(1, Relaxed);
            } else {
                if seq > *last + 1 {
                    stats.c.gaps.fetch_add(1, Relaxed);
                    stats.c.gap_messages.fetch_add(seq - *last - 1, Relaxed);
                }
                *last = seq;
            }
        }
        Some(_) => {
            // A new epoch restarts numbering; positions across epochs are not comparable.
            stats.c.epoch_changes.fetch_add(1, Relaxed);
            t.pos = Some((epoch.to_owned(), seq));
        }
        None => t.pos = Some((epoch.to_owned(), seq)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;
    use ws_protocol::frame::{encode_close, encode_frame, Limits, Role, OP_PING, OP_TEXT};

    fn session() -> Session {
        let name: Arc<str> = Arc::from("trades.A");
        Session {
            id: 1,
            tracks: vec![Track {
                channel: 0,
                name,
                pos: None,
                resuming: false,
            }],
            received: 0,
            subscribed: 0,
            error_reply: false,
            tls: None,
        }
    }

    fn msg(seq: u64) -> Vec<u8> {
        let m = format!(
            r#"{{"type":"message","channel":"trades.A","epoch":"e1","seq":{seq},"data":{{"ts_us":1}}}}"#
        );
        encode_frame(OP_TEXT, m.as_bytes()).to_vec()
    }

    #[test]
    fn detects_gaps_duplicates_and_control_frames() {
        let stats = Stats::new(Instant::now(), 1);
        let mut sess = session();
        let mut d = Decoder::new(Role::Client, Limits::new(1 << 16));
        let sub =
            r#"{"type":"subscribed","channel":"trades.A","epoch":"e1","seq":10,"recovered":true}"#;
        let mut stream = encode_frame(OP_TEXT, sub.as_bytes()).to_vec();
        for seq in [11, 12, 15, 15, 16] {
            stream.extend(msg(seq));
        }
        stream.extend(encode_frame(OP_PING, b"hb").to_vec());
        stream.extend(encode_close(1012, "restart").to_vec());
        stream.extend(msg(17)); // after the close: never decoded
        let mut inbox = Inbox::default();
        // Feed in small pieces to exercise the decoder's reassembly as well.
        for piece in stream.chunks_mut(7) {
            feed(&mut d, piece, &mut sess, &stats, &mut inbox);
        }
        assert_eq!(sess.subscribed, 1);
        assert_eq!(sess.received, 5);
        assert_eq!(stats.c.gaps.load(Relaxed), 1);
        assert_eq!(stats.c.gap_messages.load(Relaxed), 2);
        assert_eq!(stats.c.duplicates.load(Relaxed), 1);
        assert_eq!(stats.per_channel(), vec![5]);
        assert_eq!(stats.histograms().delivery.len(), 5);
        assert_eq!(inbox.pong.as_deref(), Some(&b"hb"[..]));
        assert_eq!(inbox.close, Some(Some(1012)));
        assert_eq!(sess.tracks[0].pos, Some(("e1".to_owned(), 16)));
    }

    /// Deliveries take the borrowed fast decode when they can and the full one otherwise
    /// (`data` not an object, a `ts_us` that is not an integer); both count the same way.
    #[test]
    fn fast_and_full_decodes_count_alike() {
        let stats = Stats::new(Instant::now(), 1);
        let mut sess = session();
        let mut d = Decoder::new(Role::Client, Limits::new(1 << 16));
        let frames = [
            // Fast: other fields in `data` skipped, an escaped epoch.
            r#"{"type":"message","channel":"trades.A","epoch":"e\"1","seq":1,"data":{"px":[1.5,{"a":"}"}],"ts_us":1}}"#,
            // Fast, no stamp: delivered, no latency.
            r#"{"type":"message","channel":"trades.A","epoch":"e\"1","seq":2,"data":{"px":2}}"#,
            // Full: `data` is not an object.
            r#"{"type":"message","channel":"trades.A","epoch":"e\"1","seq":3,"data":7}"#,
            // Full: a stamp that is not an integer is no latency.
            r#"{"type":"message","channel":"trades.A","epoch":"e\"1","seq":5,"data":{"ts_us":"x"}}"#,
            // Fast shape, other type: not a delivery.
            r#"{"type":"other","channel":"trades.A","epoch":"e1","seq":9,"data":{}}"#,
        ];
        // Which frames the borrowed decode takes (the rest go through `ServerMessage`).
        let fast: Vec<bool> = frames
            .iter()
            .map(|f| serde_json::from_slice::<Delivery<'_>>(f.as_bytes()).is_ok())
            .collect();
        assert_eq!(fast, [true, true, false, false, true]);
        let mut stream = Vec::new();
        for f in frames {
            stream.extend(encode_frame(OP_TEXT, f.as_bytes()).to_vec());
        }
        let mut inbox = Inbox::default();
        feed(&mut d, &mut stream, &mut sess, &stats, &mut inbox);
        assert_eq!(sess.received, 4);
        assert_eq!(stats.per_channel(), vec![4]);
        assert_eq!(stats.histograms().delivery.len(), 1);
        assert_eq!(stats.c.gaps.load(Relaxed), 1);
        assert_eq!(stats.c.undecodable.load(Relaxed), 1);
        assert_eq!(sess.tracks[0].pos, Some(("e\"1".to_owned(), 5)));
    }

    #[test]
    fn counts_unrecovered_resubscribes_and_foreign_text() {
        let stats = Stats::new(Instant::now(), 1);
        let mut sess = session();
        sess.tracks[0].pos = Some(("e1".into(), 5));
        sess.tracks[0].resuming = true;
        let mut d = Decoder::new(Role::Client, Limits::new(1 << 16));
        let sub =
            r#"{"type":"subscribed","channel":"trades.A","epoch":"e2","seq":40,"recovered":false}"#;
        let mut stream = encode_frame(OP_TEXT, sub.as_bytes()).to_vec();
        stream.extend(encode_frame(OP_TEXT, b"hello").to_vec());
        let mut inbox = Inbox::default();
        feed(&mut d, &mut stream, &mut sess, &stats, &mut inbox);
        assert_eq!(stats.c.recovered_false.load(Relaxed), 1);
        assert_eq!(stats.c.undecodable.load(Relaxed), 1);
        assert_eq!(sess.tracks[0].pos, Some(("e2".to_owned(), 40)));
        // A masked server frame is a violation the caller must answer with a close.
        let mut bad = ws_protocol::frame::encode_masked_frame(OP_TEXT, b"x", [1, 2, 3, 4]).to_vec();
        let mut d = Decoder::new(Role::Client, Limits::new(64));
        feed(&mut d, &mut bad, &mut sess, &stats, &mut inbox);
        assert_eq!(inbox.violation, Some(1002));
    }
}
