//! Fan-out: one publication (encoded once) pushed to N subscriber queues.
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::VecDeque;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shard_core::hub::{Publication, Subscriber};
use shard_core::queue::ConnQueue;
use shard_core::{Hub, HubConfig};
use ws_protocol::ChannelName;

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub publish");
    for n in [100usize, 1_000, 10_000] {
        let hub = Hub::new(HubConfig::default(), 1, "e");
        let channel = ChannelName::new("trades.BTC-USD").unwrap();
        let queues: Vec<Arc<ConnQueue>> =
            (0..n).map(|_| Arc::new(ConnQueue::new(1 << 20))).collect();
        for q in &queues {
            hub.subscribe(
                &channel,
                None,
                Subscriber {
                    id: hub.next_subscriber_id(),
                    shard: 0,
                    queue: q.clone(),
                },
            )
            .unwrap();
        }
        let mut seq = 0u64;
        let data = r#"{"px":64012.5,"qty":0.3125,"side":"buy","ts":1795803982627}"#;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("encode once + deliver to {n} subscribers"), |b| {
            b.iter(|| {
                seq += 1;
                let p = Publication::encode(channel.clone(), Arc::from("e"), seq, 1, data, None);
                hub.publish(&p);
                // Drain so queues never fill: the cost measured is the publisher's.
                if seq % 64 == 0 {
                    let mut sink = VecDeque::new();
                    for q in &queues {
                        q.drain_into(&mut sink);
                        sink.clear();
                    }
                }
            })
        });
    }
    g.finish();
}

criterion_group!(fanout, benches);
criterion_main!(fanout);
