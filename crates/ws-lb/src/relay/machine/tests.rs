//! The relay's lifecycle without sockets: in-memory peers, tokio's paused clock, and the
//! driver's loop reduced to "deliver every readiness event until nothing changes".

use std::collections::VecDeque;
use std::io;

use proptest::prelude::*;
use ws_protocol::frame::{
    close_payload, encode_close, encode_frame, encode_masked_frame, FrameTracker,
};

use super::*;

const TIMERS: Timers = Timers {
    close_timeout: Duration::from_secs(5),
    stall_timeout: Duration::from_secs(30),
};
const MASK: [u8; 4] = [1, 2, 3, 4];

/// The far end of one socket.
#[derive(Debug, Default)]
struct Peer {
    /// Bytes this peer sent that the relay has not read yet.
    outbox: VecDeque<u8>,
    /// Every byte this peer ever sent.
    sent: Vec<u8>,
    /// The peer has finished sending: reads return 0 once `outbox` is empty.
    fin: bool,
    /// The connection was reset: reads and writes fail.
    reset: bool,
    /// Bytes the relay wrote to this peer.
    got: Vec<u8>,
    /// How many more bytes the peer's receive side takes (None: any number).
    window: Option<usize>,
}

impl Peer {
    fn send(&mut self, bytes: &[u8]) {
        self.outbox.extend(bytes);
        self.sent.extend_from_slice(bytes);
    }

    fn readable(&self) -> bool {
        !self.outbox.is_empty() || self.fin || self.reset
    }

    fn writable(&self) -> bool {
        self.window != Some(0) || self.reset
    }
}

impl Read for Peer {
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

impl Write for Peer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.reset {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let n = self.window.map_or(data.len(), |w| w.min(data.len()));
        if n == 0 && !data.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if let Some(w) = &mut self.window {
            *w -= n;
        }
        self.got.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A relay between two in-memory peers, driven like `super::super::relay` drives it.
struct Net {
    relay: Relay<'static>,
    client: Peer,
    shard: Peer,
    /// Actions the relay asked for, in order.
    actions: Vec<Action>,
    buf: Vec<u8>,
}

impl Net {
    fn new() -> Self {
        Self::with_prefixes(b"", b"")
    }

    fn with_prefixes(client: &[u8], shard: &[u8]) -> Self {
        Self {
            relay: Relay::new(client, shard, &TIMERS, Instant::now()),
            client: Peer::default(),
            shard: Peer::default(),
            actions: Vec::new(),
            buf: vec![0; CHUNK],
        }
    }

    /// Delivers every readiness event the peers allow, in the driver's order, until nothing
    /// changes. Panics if that never happens (a busy loop).
    fn settle(&mut self) {
        let now = Instant::now();
        for _ in 0..100_000 {
            self.actions.extend(self.relay.poll_action());
            if self.relay.end().is_some() {
                return;
            }
            let want = self.relay.interest();
            let r = &mut self.relay;
            if want.write_client && self.client.writable() {
                r.on_writable(Side::Client, &mut self.client, now);
            } else if want.write_shard && self.shard.writable() {
                r.on_writable(Side::Shard, &mut self.shard, now);
            } else if want.read_client && self.client.readable() {
                r.on_readable(
                    Side::Client,
                    &mut self.client,
                    &mut self.shard,
                    &mut self.buf,
                    now,
                );
            } else if want.read_shard && self.shard.readable() {
                r.on_readable(
                    Side::Shard,
                    &mut self.shard,
                    &mut self.client,
                    &mut self.buf,
                    now,
                );
            } else {
                return;
            }
        }
        panic!("the relay never settles");
    }

    /// Lets `d` pass on the paused clock, firing every deadline on the way, and checks that
    /// a deadline that fired is never the next one again.
    async fn advance(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while let Some(at) = self.relay.next_deadline().filter(|at| *at <= until) {
            tokio::time::advance(at.saturating_duration_since(Instant::now())).await;
            let now = Instant::now();
            self.relay.on_timer(now);
            if let Some(next) = self.relay.next_deadline() {
                assert!(
                    next > now,
                    "deadline {next:?} is not after {now:?}: a busy loop"
                );
            }
            self.settle();
        }
        tokio::time::advance(until.saturating_duration_since(Instant::now())).await;
    }

    fn end(&self) -> Option<RelayEnd> {
        self.relay.end()
    }
}

fn client_text(s: &str) -> Bytes {
    encode_masked_frame(frame::OP_TEXT, s.as_bytes(), MASK)
}

fn client_close(code: u16) -> Bytes {
    encode_masked_frame(frame::OP_CLOSE, &close_payload(code, ""), MASK)
}

fn shard_text(s: &str) -> Bytes {
    encode_frame(frame::OP_TEXT, s.as_bytes())
}

fn lb_close(reason: &str) -> Bytes {
    encode_close(close::SERVICE_RESTART, reason)
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn every_end_is_listed_at_its_index() {
    for (i, end) in RelayEnd::ALL.iter().enumerate() {
        assert_eq!(end.index(), i);
    }
    assert_eq!(RelayEnd::ShardLost { notified: false }.index(), 2);
}

#[tokio::test(start_paused = true)]
async fn forwards_both_ways_and_holds_no_buffer_or_timer_when_idle() {
    let mut net = Net::with_prefixes(&client_text("early"), &shard_text("welcome"));
    net.settle();
    net.client.send(&client_text("subscribe"));
    net.shard.send(&shard_text("tick"));
    net.settle();
    assert_eq!(
        net.shard.got,
        concat(&[&client_text("early"), &client_text("subscribe")])
    );
    assert_eq!(
        net.client.got,
        concat(&[&shard_text("welcome"), &shard_text("tick")])
    );
    assert_eq!(net.relay.next_deadline(), None);
    assert_eq!(net.relay.up.pending.capacity(), 0);
    assert_eq!(net.relay.down.pending.capacity(), 0);
    let want = net.relay.interest();
    assert!(want.read_client && want.read_shard && want.drain);
    assert!(!want.write_client && !want.write_shard);
    net.advance(Duration::from_secs(3600)).await;
    assert_eq!(net.end(), None);
}

#[tokio::test(start_paused = true)]
async fn clean_close_started_by_the_client() {
    let mut net = Net::new();
    net.client.send(&client_close(1000));
    net.settle();
    assert_eq!(net.shard.got, client_close(1000).to_vec());
    assert_eq!(net.end(), None, "waits for the shard's answer");
    net.shard.send(&encode_close(1000, ""));
    net.shard.fin = true;
    net.settle();
    assert_eq!(net.client.got, encode_close(1000, "").to_vec());
    assert_eq!(net.end(), Some(RelayEnd::Closed));
    assert!(net.actions.is_empty(), "the LB said nothing itself");
}

#[tokio::test(start_paused = true)]
async fn clean_close_started_by_the_shard() {
    let mut net = Net::new();
    net.shard
        .send(&concat(&[&shard_text("last"), &encode_close(4000, "slow")]));
    net.shard.fin = true;
    net.settle();
    assert_eq!(
        net.client.got,
        concat(&[&shard_text("last"), &encode_close(4000, "slow")])
    );
    assert_eq!(net.end(), Some(RelayEnd::Closed));
}

#[tokio::test(start_paused = true)]
async fn client_gone_without_a_close() {
    let mut net = Net::new();
    net.client.fin = true;
    net.settle();
    assert_eq!(net.end(), Some(RelayEnd::ClientGone));

    let mut net = Net::new();
    net.client.reset = true;
    net.settle();
    assert_eq!(net.end(), Some(RelayEnd::ClientGone));

    let mut net = Net::new();
    net.relay.on_read_failed(Side::Client, Instant::now());
    assert_eq!(net.end(), Some(RelayEnd::ClientGone));
}

#[tokio::test(start_paused = true)]
async fn shard_lost_between_frames_is_reported_with_1012() {
    let mut net = Net::new();
    net.shard.send(&shard_text("a"));
    net.shard.fin = true;
    net.settle();
    let reason = "shard connection lost, reconnect";
    assert_eq!(
        net.client.got,
        concat(&[&shard_text("a"), &lb_close(reason)])
    );
    assert_eq!(
        net.actions,
        [Action::LbClose {
            code: 1012,
            tell_shard: false
        }],
        "nothing to tell a shard that is gone"
    );
    assert_eq!(net.end(), None, "waits for the client's close");
    net.client.send(&client_close(1012));
    net.settle();
    assert_eq!(net.end(), Some(RelayEnd::ShardLost { notified: true }));
    assert!(net.shard.got.is_empty(), "nothing went to the lost shard");
}

#[tokio::test(start_paused = true)]
async fn shard_lost_mid_frame_cannot_be_reported() {
    let mut net = Net::new();
    let frame = shard_text("half of this frame");
    net.shard.send(&frame[..6]);
    net.shard.fin = true;
    net.settle();
    assert_eq!(net.client.got, frame[..6].to_vec());
    assert_eq!(net.end(), Some(RelayEnd::ShardLost { notified: false }));
}

#[tokio::test(start_paused = true)]
async fn drain_closes_at_its_moment_and_between_two_frames() {
    let mut net = Net::new();
    let start = Instant::now();
    net.relay.on_drain(start, Duration::from_millis(700));
    assert_eq!(
        net.relay.next_deadline(),
        Some(start + Duration::from_millis(700))
    );
    assert!(!net.relay.interest().drain, "a drain is taken once");
    let first = shard_text("first, split across the drain moment");
    net.shard.send(&first[..10]);
    net.settle();
    net.advance(Duration::from_millis(699)).await;
    assert!(net.actions.is_empty(), "not before its moment");
    net.advance(Duration::from_millis(1)).await;
    assert!(net.actions.is_empty(), "not in the middle of a frame");
    // The rest of the frame and a second one arrive: the close goes between them, and the
    // second frame is not read any more.
    net.shard
        .send(&concat(&[&first[10..], &shard_text("second")]));
    net.settle();
    let reason = "load balancer restarting, reconnect";
    assert_eq!(net.client.got, concat(&[&first, &lb_close(reason)]));
    assert_eq!(
        net.actions,
        [Action::LbClose {
            code: 1012,
            tell_shard: true
        }]
    );
    // The shard is abandoned: the client's close does not go there.
    net.client.send(&client_close(1012));
    net.settle();
    assert!(net.shard.got.is_empty());
    assert_eq!(net.end(), Some(RelayEnd::Drained));
}

#[tokio::test(start_paused = true)]
async fn close_timeout_ends_a_client_that_never_answers() {
    let mut net = Net::new();
    net.relay.on_drain(Instant::now(), Duration::ZERO);
    net.advance(Duration::ZERO).await;
    net.settle();
    assert!(!net.actions.is_empty(), "the 1012 went out");
    net.client.send(&client_text("still talking"));
    net.advance(TIMERS.close_timeout - Duration::from_millis(1))
        .await;
    assert_eq!(net.end(), None);
    net.advance(Duration::from_millis(1)).await;
    assert_eq!(net.end(), Some(RelayEnd::Drained));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_dropped_after_the_stall_timeout() {
    let mut net = Net::new();
    net.client.window = Some(100);
    net.shard.send(&shard_text(&"x".repeat(1000)));
    net.settle();
    assert!(net.relay.down.has_pending());
    assert!(
        !net.relay.interest().read_shard,
        "backpressure: no more reads"
    );
    net.advance(TIMERS.stall_timeout - Duration::from_secs(1))
        .await;
    // Progress restarts the clock.
    net.client.window = Some(10);
    net.settle();
    net.advance(TIMERS.stall_timeout - Duration::from_secs(1))
        .await;
    assert_eq!(net.end(), None);
    net.advance(Duration::from_secs(1)).await;
    assert_eq!(net.end(), Some(RelayEnd::ClientStalled));
}

#[tokio::test(start_paused = true)]
async fn a_shard_that_stops_reading_is_handled_as_lost() {
    let mut net = Net::new();
    net.shard.window = Some(0);
    net.client.send(&client_text("hello"));
    net.settle();
    net.advance(TIMERS.stall_timeout).await;
    assert_eq!(
        net.client.got,
        lb_close("shard connection lost, reconnect").to_vec()
    );
    net.client.fin = true;
    net.settle();
    assert_eq!(net.end(), Some(RelayEnd::ShardLost { notified: true }));
}

#[tokio::test(start_paused = true)]
async fn a_shard_that_fails_a_write_is_handled_as_lost() {
    let mut net = Net::new();
    net.shard.reset = true;
    net.client.send(&client_text("hello"));
    net.settle();
    assert_eq!(net.end(), None);
    assert_eq!(
        net.client.got,
        lb_close("shard connection lost, reconnect").to_vec()
    );
}

/// The shard is found gone (here: it stopped reading the client's bytes) while bytes of
/// its own still wait for a slow client: they get `close_timeout`, not a full stall timeout.
#[tokio::test(start_paused = true)]
async fn the_shards_last_bytes_wait_for_the_client_at_most_close_timeout() {
    let mut net = Net::new();
    net.shard.window = Some(0);
    net.client.send(&client_text("hello"));
    net.settle();
    net.advance(Duration::from_secs(10)).await;
    net.client.window = Some(3);
    net.shard.send(&shard_text(&"x".repeat(500)));
    net.settle();
    // At 30 s the shard's stall ends it; the client's bytes have waited only 20 s.
    net.advance(Duration::from_secs(20)).await;
    assert_eq!(net.end(), None);
    assert_eq!(
        net.relay.next_deadline(),
        Some(Instant::now() + TIMERS.close_timeout),
        "sooner than the client's own stall timeout"
    );
    net.advance(TIMERS.close_timeout).await;
    assert_eq!(net.end(), Some(RelayEnd::ClientGone));
}

#[tokio::test(start_paused = true)]
async fn a_failed_write_to_the_client_ends_the_relay() {
    let mut net = Net::new();
    net.client.window = Some(0);
    net.shard.send(&shard_text("to nowhere"));
    net.settle();
    assert_eq!(net.end(), None);
    net.client.reset = true;
    net.settle();
    assert_eq!(net.end(), Some(RelayEnd::ClientGone));
}

/// Regression: once a drain had picked its moment and that moment had passed, the old relay
/// kept the drain moment as its timer while waiting for a frame boundary behind a slow
/// client, and woke up again and again until the client took the bytes.
#[tokio::test(start_paused = true)]
async fn a_drain_behind_a_slow_client_does_not_spin() {
    let mut net = Net::new();
    net.client.window = Some(0);
    let frame = shard_text(&"y".repeat(200));
    net.shard.send(&frame[..50]);
    net.settle();
    net.relay
        .on_drain(Instant::now(), Duration::from_millis(10));
    // `advance` checks that every deadline, once fired, lies in the future.
    net.advance(Duration::from_secs(1)).await;
    assert_eq!(net.end(), None);
    net.advance(TIMERS.stall_timeout).await;
    assert_eq!(net.end(), Some(RelayEnd::ClientStalled));
}

/// One thing that can happen to a relay.
#[derive(Debug, Clone)]
enum Op {
    /// The client has these frames to send (see `ClientSends`).
    ClientWrites(Vec<u8>),
    /// The client sends this many of the bytes it has, cutting frames anywhere.
    ClientSends(usize),
    ShardWrites(Vec<u8>),
    ShardSends(usize),
    ClientFin,
    ShardFin,
    ClientReset,
    ShardReset,
    ClientWindow(Option<usize>),
    ShardWindow(Option<usize>),
    Drain(u64),
    Advance(u64),
}

/// A stream of whole frames.
fn frames(masked: bool) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((0u8..3, 0usize..300), 1..4).prop_map(move |fs| {
        let mut out = Vec::new();
        for (kind, len) in fs {
            let payload = vec![b'p'; len];
            let (op, payload) = match kind {
                0 => (frame::OP_TEXT, payload),
                1 => (frame::OP_BINARY, payload),
                _ => (frame::OP_CLOSE, close_payload(1000, "")),
            };
            let f = if masked {
                encode_masked_frame(op, &payload, MASK)
            } else {
                encode_frame(op, &payload)
            };
            out.extend_from_slice(&f);
        }
        out
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => frames(true).prop_map(Op::ClientWrites),
        3 => (1usize..400).prop_map(Op::ClientSends),
        2 => frames(false).prop_map(Op::ShardWrites),
        3 => (1usize..400).prop_map(Op::ShardSends),
        1 => Just(Op::ClientFin),
        1 => Just(Op::ShardFin),
        1 => Just(Op::ClientReset),
        1 => Just(Op::ShardReset),
        2 => prop::option::of(0usize..500).prop_map(Op::ClientWindow),
        2 => prop::option::of(0usize..500).prop_map(Op::ShardWindow),
        1 => (0u64..2000).prop_map(Op::Drain),
        3 => (0u64..40_000).prop_map(Op::Advance),
    ]
}

/// Splits `got` (what the client received) into the shard's bytes and what the LB added;
/// checks that the shard's part is exactly the start of what the shard sent and that the
/// LB only added one close frame, at a frame boundary.
fn check_client_stream(got: &[u8], shard_sent: &[u8]) {
    let common = got
        .iter()
        .zip(shard_sent)
        .take_while(|(a, b)| a == b)
        .count();
    let (relayed, added) = got.split_at(common);
    if added.is_empty() {
        return;
    }
    // The LB's close may begin with the same byte as the shard's next frame.
    let starts = (0..=relayed.len()).rev().find(|&k| {
        let mut t = FrameTracker::new();
        t.observe(&relayed[..k]);
        t.at_boundary() && got[k..].starts_with(&[0x88])
    });
    let k = starts.expect("the LB added bytes that are not a close frame at a boundary");
    let close = &got[k..];
    let expected = [SHARD_LOST, DRAINED].map(|c| encode_close(c.code, c.reason));
    assert!(
        expected
            .iter()
            .any(|e| close.len() <= e.len() && e.starts_with(close)),
        "the LB added {close:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the peers do, the relay never spins on a deadline, never splits a frame with
    /// its own close, never invents bytes, and ends once both peers are gone and time passes.
    #[test]
    fn any_sequence_of_events_keeps_the_invariants(ops in prop::collection::vec(op(), 1..30)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut net = Net::new();
            let (mut client_script, mut shard_script) = (Vec::new(), Vec::new());
            let take = |script: &mut Vec<u8>, n: usize| -> Vec<u8> {
                script.drain(..n.min(script.len())).collect()
            };
            for op in ops {
                match op {
                    Op::ClientWrites(b) => client_script.extend(b),
                    Op::ClientSends(n) => net.client.send(&take(&mut client_script, n)),
                    Op::ShardWrites(b) => shard_script.extend(b),
                    Op::ShardSends(n) => net.shard.send(&take(&mut shard_script, n)),
                    Op::ClientFin => net.client.fin = true,
                    Op::ShardFin => net.shard.fin = true,
                    Op::ClientReset => net.client.reset = true,
                    Op::ShardReset => net.shard.reset = true,
                    Op::ClientWindow(w) => net.client.window = w,
                    Op::ShardWindow(w) => net.shard.window = w,
                    Op::Drain(ms) => {
                        if net.relay.interest().drain {
                            net.relay.on_drain(Instant::now(), Duration::from_millis(ms));
                        }
                    }
                    Op::Advance(ms) => net.advance(Duration::from_millis(ms)).await,
                }
                net.settle();
                check_client_stream(&net.client.got, &net.shard.sent);
                if net.end().is_some() {
                    assert_eq!(net.relay.interest(), Interest::default());
                    assert_eq!(net.relay.next_deadline(), None);
                    break;
                }
            }
            // Both peers hang up (without reading more): the relay ends, within its timers.
            net.client.fin = true;
            net.shard.fin = true;
            net.settle();
            net.advance(TIMERS.stall_timeout + TIMERS.close_timeout).await;
            assert!(net.end().is_some(), "the relay outlived both peers");
        });
    }
}
