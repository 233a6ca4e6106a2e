//! The session's lifecycle without sockets: an in-memory client, a real hub fed by the
//! embedded bus, tokio's paused clock, and the driver's loop reduced to "deliver every event
//! until nothing changes".

use std::collections::VecDeque;

use proptest::prelude::*;
use ws_protocol::frame::{close_payload, encode_frame, encode_masked_frame};
use ws_protocol::ChannelName;

use super::*;
use crate::config::HubConfig;
use crate::hub::Hub;
use crate::metrics::ShardMetrics;
use crate::source::bus::EmbeddedBus;

const MASK: [u8; 4] = [9, 8, 7, 6];

fn config() -> SessionConfig {
    SessionConfig {
        outbound_queue: 8,
        ..SessionConfig::default()
    }
}

/// The client end of the connection.
#[derive(Debug, Default)]
struct Client {
    /// Bytes the client sent that the session has not read yet.
    outbox: VecDeque<u8>,
    fin: bool,
    reset: bool,
    /// Bytes the session wrote to the client.
    got: Vec<u8>,
    /// How many more bytes the client's receive side takes (None: any number).
    window: Option<usize>,
    /// Write calls the session made that took bytes (the system calls of a real socket).
    writes: usize,
}

impl Client {
    fn send(&mut self, bytes: &[u8]) {
        self.outbox.extend(bytes);
    }

    fn send_text(&mut self, text: &str) {
        self.send(&encode_masked_frame(frame::OP_TEXT, text.as_bytes(), MASK));
    }

    fn send_close(&mut self, code: u16) {
        self.send(&encode_masked_frame(
            frame::OP_CLOSE,
            &close_payload(code, ""),
            MASK,
        ));
    }

    fn readable(&self) -> bool {
        !self.outbox.is_empty() || self.fin || self.reset
    }

    fn writable(&self) -> bool {
        self.window != Some(0) || self.reset
    }
}

impl Read for Client {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.reset {
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        if self.outbox.is_empty() {
            return if self.fin {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(self.outbox.len());
        for (slot, b) in buf.iter_mut().zip(self.outbox.drain(..n)) {
            *slot = b;
        }
        Ok(n)
    }
}

impl Write for Client {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(data)])
    }

    /// Like a socket: takes as much of all the buffers as the window allows, in one call.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        if self.reset {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let n = self.window.map_or(total, |w| w.min(total));
        if n == 0 && total > 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if let Some(w) = &mut self.window {
            *w -= n;
        }
        let mut left = n;
        for b in bufs {
            let take = left.min(b.len());
            self.got.extend_from_slice(&b[..take]);
            left -= take;
        }
        self.writes += 1;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the client received, decoded.
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Text(String),
    Binary(Vec<u8>),
    Ping,
    Pong(Vec<u8>),
    Close(Option<u16>),
}

fn decode(bytes: &[u8]) -> Vec<Got> {
    let mut d = Decoder::new(Role::Client, Limits::new(1 << 24));
    let mut out = Vec::new();
    let _ = d.feed(&mut bytes.to_vec(), &mut |m| {
        out.push(match m {
            Message::Text(t) => Got::Text(t.to_owned()),
            Message::Binary(b) => Got::Binary(b.to_vec()),
            Message::Ping(_) => Got::Ping,
            Message::Pong(p) => Got::Pong(p.to_vec()),
            Message::Close(c) => Got::Close(c.map(|(code, _)| code)),
        });
        Flow::Continue
    });
    out
}

/// A session with its client, hub and bus, driven like `super::super::run` drives it.
struct Net {
    session: Session,
    client: Client,
    bus: EmbeddedBus,
    /// The hub pushed to the connection's queue since the session last looked (the
    /// driver's `Notify` permit).
    notified: bool,
    buf: Vec<u8>,
}

impl Net {
    fn new(mode: Mode, cfg: SessionConfig) -> Self {
        let hub = Hub::new(HubConfig::default(), 1, "test");
        let ctx = Arc::new(ShardContext {
            shard_id: 0,
            hub: hub.clone(),
            pubsub: cfg,
            echo: cfg,
            metrics: ShardMetrics::new(0),
            drain: Arc::default(),
            auth: Arc::new(::auth::Verifier::new(::auth::AuthConfig::default()).unwrap()),
        });
        Self {
            session: Session::new(ctx, mode, Instant::now()),
            client: Client::default(),
            bus: EmbeddedBus::new(hub, "test"),
            notified: false,
            buf: vec![0; 64 * 1024],
        }
    }

    fn pubsub() -> Self {
        Self::new(Mode::PubSub, config())
    }

    fn publish(&mut self, channel: &str, n: usize) {
        for i in 0..n {
            let c = ChannelName::new(channel).unwrap();
            self.bus.publish(c, &format!("{{\"i\":{i}}}"));
        }
        self.notified = true;
    }

    /// Delivers every event the client and the hub allow, in the driver's order, until
    /// nothing changes. Panics if that never happens (a busy loop).
    fn settle(&mut self) {
        let now = Instant::now();
        for _ in 0..100_000 {
            if self.session.is_done() {
                return;
            }
            let want = self.session.interest();
            let s = &mut self.session;
            if want.write && self.client.writable() {
                s.on_writable(&mut self.client, now);
            } else if want.read && self.client.readable() {
                s.on_readable(&mut self.client, &mut self.buf, now);
            } else if want.queue && self.notified {
                self.notified = false;
                s.on_queue(now);
            } else {
                return;
            }
        }
        panic!("the session never settles");
    }

    /// Lets `d` pass on the paused clock, firing every deadline on the way, and checks that
    /// a deadline that fired is never the next one again.
    async fn advance(&mut self, d: Duration) {
        let until = Instant::now() + d;
        loop {
            if self.session.is_done() {
                break;
            }
            let at = self.session.next_deadline();
            if at > until {
                break;
            }
            tokio::time::advance(at.saturating_duration_since(Instant::now())).await;
            let now = Instant::now();
            self.session.on_timer(now);
            if !self.session.is_done() {
                let next = self.session.next_deadline();
                assert!(
                    next > now,
                    "deadline {next:?} is not after {now:?}: a busy loop"
                );
            }
            self.settle();
        }
        tokio::time::advance(until.saturating_duration_since(Instant::now())).await;
    }

    fn got(&self) -> Vec<Got> {
        decode(&self.client.got)
    }

    fn last(&self) -> Option<Got> {
        self.got().pop()
    }

    fn texts(&self) -> Vec<serde_json::Value> {
        self.got()
            .into_iter()
            .filter_map(|g| match g {
                Got::Text(t) => serde_json::from_str(&t).ok(),
                _ => None,
            })
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn subscribes_receives_in_order_and_unsubscribes() {
    let mut net = Net::pubsub();
    net.client
        .send_text(r#"{"type":"subscribe","channels":["trades.A"]}"#);
    net.settle();
    net.publish("trades.A", 3);
    net.settle();
    net.client
        .send_text(r#"{"type":"unsubscribe","channels":["trades.A"]}"#);
    net.settle();
    net.publish("trades.A", 1);
    net.settle();
    let kinds: Vec<_> = net
        .texts()
        .iter()
        .map(|v| format!("{}{}", v["type"], v["seq"]))
        .collect();
    assert_eq!(
        kinds,
        [
            "\"subscribed\"0",
            "\"message\"1",
            "\"message\"2",
            "\"message\"3",
            "\"unsubscribed\"null"
        ]
    );
    assert!(!net.session.is_done());
}

#[tokio::test(start_paused = true)]
async fn echo_mode_echoes_and_answers_pings() {
    let mut net = Net::new(Mode::Echo, config());
    net.client.send_text("hello");
    net.client
        .send(&encode_masked_frame(frame::OP_BINARY, b"\x01\x02", MASK));
    net.client
        .send(&encode_masked_frame(frame::OP_PING, b"p", MASK));
    net.settle();
    assert_eq!(
        net.got(),
        [
            Got::Text("hello".into()),
            Got::Binary(vec![1, 2]),
            Got::Pong(b"p".to_vec())
        ]
    );
    assert!(net.session.queue().is_none());
    assert!(!net.session.interest().queue);
}

#[tokio::test(start_paused = true)]
async fn clean_close_by_the_client_is_echoed_then_over() {
    let mut net = Net::pubsub();
    net.client.send_close(1000);
    net.settle();
    assert_eq!(net.got(), [Got::Close(Some(1000))]);
    assert!(net.session.is_done());
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_without_a_close_ends_the_session() {
    let mut net = Net::pubsub();
    net.client.fin = true;
    net.settle();
    assert!(net.session.is_done());

    let mut net = Net::pubsub();
    net.client.reset = true;
    net.settle();
    assert!(net.session.is_done());
}

#[tokio::test(start_paused = true)]
async fn keepalive_pings_once_then_closes_1001_then_gives_up_after_close_timeout() {
    let cfg = config();
    let mut net = Net::pubsub();
    net.advance(cfg.ping_interval).await;
    assert_eq!(net.got(), [Got::Ping]);
    net.advance(cfg.idle_timeout - cfg.ping_interval).await;
    assert_eq!(net.last(), Some(Got::Close(Some(close::GOING_AWAY))));
    assert!(!net.session.is_done(), "waits for the client's close");
    assert_eq!(
        net.session.next_deadline(),
        Instant::now() + cfg.close_timeout,
        "while closing, the close deadline is the only timer"
    );
    net.advance(cfg.close_timeout).await;
    assert!(net.session.is_done());
}

#[tokio::test(start_paused = true)]
async fn any_byte_from_the_client_keeps_it_alive() {
    let cfg = config();
    let mut net = Net::pubsub();
    for _ in 0..10 {
        net.advance(cfg.ping_interval - Duration::from_secs(1))
            .await;
        net.client
            .send(&encode_masked_frame(frame::OP_PONG, b"", MASK));
        net.settle();
    }
    assert!(net.got().is_empty(), "{:?}", net.got());
}

#[tokio::test(start_paused = true)]
async fn drain_closes_1012_at_its_moment_and_a_clean_answer_ends_it() {
    let mut net = Net::pubsub();
    let start = Instant::now();
    net.session.on_drain(start, Duration::from_millis(1500));
    assert!(!net.session.interest().drain, "a drain is taken once");
    assert_eq!(
        net.session.next_deadline(),
        start + Duration::from_millis(1500)
    );
    net.advance(Duration::from_millis(1499)).await;
    assert!(net.got().is_empty());
    net.advance(Duration::from_millis(1)).await;
    assert_eq!(net.got(), [Got::Close(Some(close::SERVICE_RESTART))]);
    net.client.send_close(1000);
    net.settle();
    assert!(net.session.is_done());
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_is_closed_4000_and_then_waits_quietly_for_its_close() {
    let cfg = config();
    let mut net = Net::pubsub();
    net.client
        .send_text(r#"{"type":"subscribe","channels":["trades.A"]}"#);
    net.settle();
    // The client takes 20 bytes and then nothing.
    net.client.window = Some(20);
    // Close just before the ping is due, so that the ping deadline passes while closing.
    net.advance(cfg.ping_interval - Duration::from_secs(2))
        .await;
    net.publish("trades.A", 100);
    net.settle();
    assert!(!net.session.interest().queue, "no more deliveries");
    // `advance` checks that no handled deadline comes back (the old busy loop).
    net.advance(cfg.close_timeout - Duration::from_secs(1))
        .await;
    assert!(!net.session.is_done());
    // The client reads again: a partly written frame is completed, then the 4000.
    net.client.window = None;
    net.settle();
    assert_eq!(net.last(), Some(Got::Close(Some(close::SLOW_CONSUMER))));
    net.client.send_close(4000);
    net.settle();
    assert!(net.session.is_done());
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_that_never_reads_is_dropped_at_the_close_deadline() {
    let cfg = config();
    let mut net = Net::pubsub();
    net.client
        .send_text(r#"{"type":"subscribe","channels":["trades.A"]}"#);
    net.settle();
    net.client.window = Some(0);
    net.publish("trades.A", 100);
    net.settle();
    net.advance(cfg.close_timeout).await;
    assert!(net.session.is_done());
}

#[tokio::test(start_paused = true)]
async fn a_protocol_violation_is_closed_at_once_without_waiting() {
    let mut net = Net::pubsub();
    // An unmasked client frame.
    net.client.send(&encode_frame(frame::OP_TEXT, b"hi"));
    net.settle();
    assert_eq!(net.got(), [Got::Close(Some(close::PROTOCOL_ERROR))]);
    assert!(net.session.is_done());
}

#[tokio::test(start_paused = true)]
async fn the_message_rate_is_enforced_with_1008() {
    let cfg = SessionConfig {
        rate_per_sec: 10,
        rate_burst: 3,
        ..config()
    };
    let mut net = Net::new(Mode::PubSub, cfg);
    for _ in 0..4 {
        net.client.send_text(r#"{"type":"ping","id":1}"#);
    }
    net.settle();
    let got = net.got();
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[3], Got::Close(Some(close::POLICY_VIOLATION)));
    assert!(net.session.is_done());
}

#[tokio::test(start_paused = true)]
async fn eof_while_closing_waits_for_the_output_until_the_deadline() {
    let cfg = config();
    let mut net = Net::pubsub();
    net.client.window = Some(0);
    net.session.on_drain(Instant::now(), Duration::ZERO);
    net.advance(Duration::ZERO).await;
    net.client.fin = true;
    net.settle();
    assert!(!net.session.is_done(), "the 1012 is still unwritten");
    net.advance(cfg.close_timeout).await;
    assert!(net.session.is_done());
}

#[tokio::test(start_paused = true)]
async fn a_failed_write_ends_the_session() {
    let mut net = Net::pubsub();
    net.client.send_text(r#"{"type":"ping","id":1}"#);
    net.client.window = Some(0);
    net.settle();
    net.client.reset = true;
    net.settle();
    assert!(net.session.is_done());
}

#[tokio::test(start_paused = true)]
async fn deliveries_waiting_at_a_wake_up_share_one_write() {
    let mut net = Net::pubsub();
    net.client
        .send_text(r#"{"type":"subscribe","channels":["trades.A","trades.B"]}"#);
    net.settle();
    let before = net.client.writes;
    // Six deliveries queued before the session looks: one write.
    net.publish("trades.A", 3);
    net.publish("trades.B", 3);
    net.settle();
    assert_eq!(net.client.writes - before, 1);
    assert_eq!(net.texts().len(), 2 + 6);
    // A lone delivery is written at once (write_delay is off by default): no timer needed.
    net.publish("trades.A", 1);
    net.settle();
    assert_eq!(net.client.writes - before, 2);
    assert_eq!(net.texts().len(), 2 + 7);
}

#[tokio::test(start_paused = true)]
async fn deliveries_queued_while_the_socket_was_full_go_out_with_what_waited() {
    let mut net = Net::pubsub();
    net.client
        .send_text(r#"{"type":"subscribe","channels":["trades.A"]}"#);
    net.settle();
    net.client.window = Some(0);
    net.publish("trades.A", 2);
    net.settle();
    net.publish("trades.A", 3);
    net.settle();
    let before = net.client.writes;
    net.client.window = None;
    net.settle();
    assert_eq!(net.client.writes - before, 1, "5 deliveries, one write");
    let seqs: Vec<_> = net
        .texts()
        .iter()
        .skip(1)
        .map(|v| v["seq"].clone())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn write_delay_gathers_deliveries_for_one_write_and_no_longer() {
    let delay = Duration::from_millis(5);
    let mut net = Net::new(
        Mode::PubSub,
        SessionConfig {
            write_delay: delay,
            ..config()
        },
    );
    net.client
        .send_text(r#"{"type":"subscribe","channels":["trades.A"]}"#);
    net.settle();
    // The reply to a request is not delayed.
    assert_eq!(net.texts().len(), 1);
    let before = net.client.writes;
    net.publish("trades.A", 1);
    net.settle();
    assert_eq!(net.client.writes, before, "waits for more");
    assert_eq!(net.session.next_deadline(), Instant::now() + delay);
    net.advance(Duration::from_millis(3)).await;
    net.publish("trades.A", 2);
    net.settle();
    assert_eq!(net.client.writes, before);
    // At the deadline (5 ms after the first delivery, not after the last) all three go in
    // one write; `advance` checks the deadline does not come back.
    net.advance(Duration::from_millis(2)).await;
    assert_eq!(net.client.writes - before, 1);
    let seqs: Vec<_> = net
        .texts()
        .iter()
        .skip(1)
        .map(|v| v["seq"].clone())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert!(net.session.next_deadline() > Instant::now() + delay);
}

#[tokio::test(start_paused = true)]
async fn a_draining_connection_writes_delayed_deliveries_at_once() {
    let mut net = Net::new(
        Mode::PubSub,
        SessionConfig {
            write_delay: Duration::from_millis(50),
            ..config()
        },
    );
    net.client
        .send_text(r#"{"type":"subscribe","channels":["trades.A"]}"#);
    net.settle();
    net.publish("trades.A", 1);
    net.settle();
    assert_eq!(net.texts().len(), 1, "delayed");
    net.session.on_drain(Instant::now(), Duration::from_secs(5));
    net.settle();
    assert_eq!(net.texts().len(), 2, "written at once once draining");
    net.publish("trades.A", 1);
    net.settle();
    assert_eq!(net.texts().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn write_delay_still_closes_a_slow_consumer() {
    let mut net = Net::new(
        Mode::PubSub,
        SessionConfig {
            write_delay: Duration::from_millis(5),
            ..config()
        },
    );
    net.client
        .send_text(r#"{"type":"subscribe","channels":["trades.A"]}"#);
    net.settle();
    net.publish("trades.A", 1);
    net.settle();
    // The queue (8 frames) overflows while the session waits for its write delay.
    net.publish("trades.A", 20);
    net.advance(Duration::from_millis(5)).await;
    assert_eq!(net.last(), Some(Got::Close(Some(close::SLOW_CONSUMER))));
}

/// One thing that can happen to a session.
#[derive(Debug, Clone)]
enum Op {
    Request(&'static str),
    Garbage(Vec<u8>),
    Ping,
    Close(u16),
    Publish(usize),
    Window(Option<usize>),
    Fin,
    Drain(u64),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => prop::sample::select(vec![
            r#"{"type":"subscribe","channels":["trades.A","trades.B"]}"#,
            r#"{"type":"unsubscribe","channels":["trades.A"]}"#,
            r#"{"type":"ping","id":7}"#,
            r#"{"type":"nonsense"}"#,
        ])
        .prop_map(Op::Request),
        1 => prop::collection::vec(any::<u8>(), 1..20).prop_map(Op::Garbage),
        1 => Just(Op::Ping),
        1 => prop::sample::select(vec![1000u16, 1001, 4001]).prop_map(Op::Close),
        3 => (1usize..20).prop_map(Op::Publish),
        2 => prop::option::of(0usize..300).prop_map(Op::Window),
        1 => Just(Op::Fin),
        1 => (0u64..20_000).prop_map(Op::Drain),
        3 => (0u64..70_000).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever the client and the hub do, the session never spins on a deadline, never
    /// stops settling, and is over within its timers once the client stops reading and
    /// hangs up.
    #[test]
    fn any_sequence_of_events_keeps_the_invariants(
        ops in prop::collection::vec(op(), 1..40),
        write_delay_ms in prop::sample::select(vec![0u64, 0, 2, 50]),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let cfg = SessionConfig {
                write_delay: Duration::from_millis(write_delay_ms),
                ..config()
            };
            let mut net = Net::new(Mode::PubSub, cfg);
            for op in ops {
                match op {
                    Op::Request(r) => net.client.send_text(r),
                    Op::Garbage(b) => net.client.send(&b),
                    Op::Ping => net.client.send(&encode_masked_frame(frame::OP_PING, b"", MASK)),
                    Op::Close(code) => net.client.send_close(code),
                    Op::Publish(n) => {
                        net.publish("trades.A", n);
                        net.publish("trades.B", n);
                    }
                    Op::Window(w) => net.client.window = w,
                    Op::Fin => net.client.fin = true,
                    Op::Drain(ms) => {
                        if net.session.interest().drain {
                            net.session.on_drain(Instant::now(), Duration::from_millis(ms));
                        }
                    }
                    Op::Advance(ms) => net.advance(Duration::from_millis(ms)).await,
                }
                net.settle();
                if net.session.is_done() {
                    assert_eq!(net.session.interest(), Interest::default());
                    break;
                }
            }
            net.client.fin = true;
            net.client.window = Some(0);
            net.settle();
            net.advance(cfg.idle_timeout + cfg.close_timeout).await;
            assert!(net.session.is_done(), "the session outlived its client");
        });
    }
}
