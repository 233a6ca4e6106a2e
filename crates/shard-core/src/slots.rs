//! Connection slots: a shard's capacity, taken before the upgrade completes and released
//! by ownership.
//!
//! A [`SlotGuard`] is the only way to hold a slot and its `Drop` is the only way to release
//! one, so every exit path — clean close, error, timeout, a panic unwinding the connection
//! task, shutdown — gives the slot back without anyone remembering to.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use metrics::Gauge;

/// The slot pool of one shard.
#[derive(Debug)]
pub struct Slots {
    max: usize,
    current: AtomicUsize,
    gauge: Option<Gauge>,
}

/// One taken slot; released on drop.
#[derive(Debug)]
pub struct SlotGuard {
    slots: Arc<Slots>,
}

impl Slots {
    /// A pool of `max` slots. `gauge`, if given, mirrors the live count.
    pub fn new(max: usize, gauge: Option<Gauge>) -> Arc<Self> {
        Arc::new(Self {
            max,
            current: AtomicUsize::new(0),
            gauge,
        })
    }

    /// Takes a slot, or `None` if all are taken.
    pub fn try_acquire(self: &Arc<Self>) -> Option<SlotGuard> {
        let mut cur = self.current.load(Ordering::Relaxed);
        loop {
            if cur >= self.max {
                return None;
            }
            match self.current.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if let Some(g) = &self.gauge {
                        g.increment(1.0);
                    }
                    return Some(SlotGuard {
                        slots: self.clone(),
                    });
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Slots taken now.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }

    /// Capacity.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.current.fetch_sub(1, Ordering::AcqRel);
        if let Some(g) = &self.slots.gauge {
            g.decrement(1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn full_pool_refuses_and_frees_on_drop() {
        let s = Slots::new(2, None);
        let a = s.try_acquire().unwrap();
        let b = s.try_acquire().unwrap();
        assert!(s.try_acquire().is_none());
        drop(a);
        let c = s.try_acquire().unwrap();
        assert_eq!(s.current(), 2);
        drop((b, c));
        assert_eq!(s.current(), 0);
    }

    #[test]
    fn panic_while_holding_releases() {
        let s = Slots::new(1, None);
        let s2 = s.clone();
        let r = std::thread::spawn(move || {
            let _g = s2.try_acquire().unwrap();
            panic!("handler bug");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(s.current(), 0);
    }

    #[test]
    fn concurrent_acquire_never_exceeds_max() {
        let s = Slots::new(100, None);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..10_000 {
                        if let Some(g) = s.try_acquire() {
                            held.push(g);
                        }
                        assert!(s.current() <= 100);
                        if i % 3 == 0 {
                            held.pop();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.current(), 0);
    }

    proptest! {
        /// Model test: a random interleaving of acquires and drops agrees with a counter.
        #[test]
        fn matches_a_counter_model(max in 0usize..20, ops in proptest::collection::vec((any::<bool>(), 0usize..32), 0..300)) {
            let s = Slots::new(max, None);
            let mut held = Vec::new();
            for (acquire, idx) in ops {
                if acquire {
                    let expect = held.len() < max;
                    match s.try_acquire() {
                        Some(g) => { prop_assert!(expect); held.push(g); }
                        None => prop_assert!(!expect),
                    }
                } else if !held.is_empty() {
                    held.swap_remove(idx % held.len());
                }
                prop_assert_eq!(s.current(), held.len());
            }
            drop(held);
            prop_assert_eq!(s.current(), 0);
        }
    }
}
