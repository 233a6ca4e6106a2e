//! The per-client policy decision: pick a shard (breaker check + P2C on scores) and record
//! the outcome, for a pool of 10 shards.
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use lb_core::pool::NoObserver;
use lb_core::retry::Tried;
use lb_core::{BreakerConfig, ScoreConfig, ShardPool};
use rand::rngs::SmallRng;
use rand::SeedableRng;

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let pool = ShardPool::new(
        (0..10).map(|i| (format!("ws://s{i}:1/ws"), ())).collect(),
        BreakerConfig::default(),
        ScoreConfig::default(),
        std::time::Duration::ZERO,
        Arc::new(NoObserver),
    )
    .unwrap();
    for i in 0..10 {
        pool.set_health(
            i,
            i as f64 / 10.0,
            1000,
            lb_core::pool::Reported::Ok,
            tokio::time::Instant::now(),
        );
    }
    let mut rng = SmallRng::seed_from_u64(1);
    c.bench_function("select + succeed (10 shards)", |b| {
        b.iter(|| {
            let lease = pool
                .select(Tried::default(), tokio::time::Instant::now(), &mut rng)
                .unwrap();
            drop(lease.succeed());
        })
    });
}

criterion_group!(decision, benches);
criterion_main!(decision);
