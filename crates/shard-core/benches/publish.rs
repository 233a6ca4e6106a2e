//! Publish throughput of the hub, for `bench/publish_budget.py`, which builds this file
//! twice — against this tree and, with the `baseline` feature, against the hub before the
//! history budget existed — and runs the two binaries alternately.
//!
//!     cargo bench -p shard-core --bench publish -- [--budget BYTES] [--rounds N]
//!
//! Prints one JSON line per workload and round: `{"workload","round","ops","secs","ops_per_sec"}`,
//! where `secs` is the publishing thread's CPU time (the machine these run on is shared).
//! Workloads (each on a fresh hub, history_len 1000):
//! - `fanout`: one channel, 1,000 subscribers;
//! - `hot`: 100 channels in turn, no subscribers (the history ring and its accounting);
//! - `keys`: 1,000,000 distinct keys, one message each (the budget is enforced: eviction
//!   runs all along once it is reached);
//! - `mixed`: 9 distinct keys to 1 message on one of 100 hot channels, 1,000,000 messages.
#![allow(missing_docs, clippy::unwrap_used, unexpected_cfgs)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use shard_core::hub::{Publication, Subscriber};
use shard_core::queue::ConnQueue;
use shard_core::{Hub, HubConfig};
use ws_protocol::ChannelName;

const DATA: &str = r#"{"px":64012.5,"qty":0.3125,"side":"buy","ts":1795803982627}"#;

#[cfg(feature = "baseline")]
fn hub(_budget: usize) -> Arc<Hub> {
    Hub::new(HubConfig { history_len: 1000 }, 1, "e")
}

#[cfg(not(feature = "baseline"))]
fn hub(budget: usize) -> Arc<Hub> {
    Hub::new(
        HubConfig {
            history_len: 1000,
            history_budget: budget,
            ..HubConfig::default()
        },
        1,
        "e",
    )
}

#[cfg(feature = "baseline")]
fn subscribe(hub: &Hub, c: &ChannelName, s: Subscriber) {
    hub.subscribe(c, None, s);
}

#[cfg(not(feature = "baseline"))]
fn subscribe(hub: &Hub, c: &ChannelName, s: Subscriber) {
    hub.subscribe(c, None, s).unwrap();
}

/// Prints the hub's eviction counts to stderr when dropped (the current hub only).
struct Report(Arc<Hub>);

impl Drop for Report {
    fn drop(&mut self) {
        #[cfg(not(feature = "baseline"))]
        {
            use shard_core::hub::EvictionCause;
            let hub = &self.0;
            eprintln!(
                "evictions: budget {} idle {} position {}; {:?}",
                hub.evictions(EvictionCause::Budget),
                hub.evictions(EvictionCause::Idle),
                hub.evictions(EvictionCause::Position),
                hub.stats()
            );
        }
    }
}

fn name(prefix: &str, i: u64) -> ChannelName {
    ChannelName::new(&format!("{prefix}{i}")).unwrap()
}

/// Publications are encoded before the clock starts: the hub's cost is measured, not JSON.
fn encoded(names: impl Iterator<Item = (ChannelName, u64)>) -> Vec<Publication> {
    let epoch: Arc<str> = Arc::from("e");
    names
        .map(|(c, seq)| Publication::encode(c, epoch.clone(), seq, 1, DATA, None))
        .collect()
}

/// CPU time of this thread in nanoseconds (first field of `/proc/thread-self/schedstat`):
/// unlike wall time, it does not count the time other processes on a busy machine take the
/// core away.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Publishes `pubs`; returns the thread's CPU seconds (wall seconds where the kernel does
/// not report it).
fn timed(hub: &Hub, pubs: &[Publication], mut between: impl FnMut(usize)) -> f64 {
    let start = Instant::now();
    let cpu = thread_cpu_ns();
    for (i, p) in pubs.iter().enumerate() {
        hub.publish(p);
        between(i);
    }
    let cpu = thread_cpu_ns().saturating_sub(cpu);
    if cpu > 0 {
        cpu as f64 / 1e9
    } else {
        start.elapsed().as_secs_f64()
    }
}

fn fanout(budget: usize) -> (usize, f64) {
    let hub = hub(budget);
    let c = name("trades.BTC-USD", 0);
    let queues: Vec<Arc<ConnQueue>> = (0..1000)
        .map(|_| Arc::new(ConnQueue::new(1 << 20)))
        .collect();
    for q in &queues {
        let s = Subscriber {
            id: hub.next_subscriber_id(),
            shard: 0,
            queue: q.clone(),
        };
        subscribe(&hub, &c, s);
    }
    let pubs = encoded((1..=20_000).map(|s| (c.clone(), s)));
    let mut sink = VecDeque::new();
    let secs = timed(&hub, &pubs, |i| {
        // Drain so queues never fill: the cost measured is the publisher's.
        if i % 64 == 63 {
            for q in &queues {
                q.drain_into(&mut sink);
                sink.clear();
            }
        }
    });
    (pubs.len(), secs)
}

fn hot(budget: usize) -> (usize, f64) {
    let hub = hub(budget);
    let names: Vec<ChannelName> = (0..100).map(|i| name("trades.HOT-", i)).collect();
    let pubs = encoded((0..1_000_000u64).map(|i| (names[(i % 100) as usize].clone(), i / 100 + 1)));
    (pubs.len(), timed(&hub, &pubs, |_| {}))
}

fn keys(budget: usize) -> (usize, f64) {
    let hub = hub(budget);
    let _report = Report(hub.clone());
    let pubs = encoded((0..1_000_000u64).map(|i| (name("user.user-", i), 1)));
    (pubs.len(), timed(&hub, &pubs, |_| {}))
}

fn mixed(budget: usize) -> (usize, f64) {
    let hub = hub(budget);
    let _report = Report(hub.clone());
    let hot: Vec<ChannelName> = (0..100).map(|i| name("trades.HOT-", i)).collect();
    let pubs = encoded((0..1_000_000u64).map(|i| {
        if i % 10 == 0 {
            let n = i / 10;
            (hot[(n % 100) as usize].clone(), n / 100 + 1)
        } else {
            (name("user.user-", i), 1)
        }
    }));
    (pubs.len(), timed(&hub, &pubs, |_| {}))
}

/// A workload: publications made and seconds taken, given the budget.
type Workload = fn(usize) -> (usize, f64);

fn main() {
    let mut budget: usize = 64 << 20;
    let mut rounds = 1;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--budget" => budget = args.next().unwrap().parse().unwrap(),
            "--rounds" => rounds = args.next().unwrap().parse().unwrap(),
            "--only" => only = args.next(),
            // cargo bench passes --bench; anything else is ignored.
            _ => {}
        }
    }
    let workloads: [(&str, Workload); 4] = [
        ("fanout", fanout),
        ("hot", hot),
        ("keys", keys),
        ("mixed", mixed),
    ];
    for round in 1..=rounds {
        for (w, f) in workloads {
            if only.as_deref().is_some_and(|o| o != w) {
                continue;
            }
            let (ops, secs) = f(budget);
            println!(
                r#"{{"workload":"{w}","round":{round},"ops":{ops},"secs":{secs:.6},"ops_per_sec":{:.1}}}"#,
                ops as f64 / secs
            );
        }
    }
}
