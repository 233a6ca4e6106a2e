//! Choosing a shard for one handshake attempt.
//!
//! First, a shard whose breaker can take a trial call (half-open with a free trial slot, or
//! open with its timeout passed) gets it, least-recently-failed first. Probing promptly is
//! what lets a recovered shard return to service right after `open_timeout`: left to the
//! score, its window of recent failures would keep it out of every pair for a whole window.
//! The cost is bounded by the breaker — at most `half_open_max_calls` clients at a time, once
//! per `open_timeout` while the shard stays down — and a failed trial is simply the client's
//! first attempt, retried elsewhere.
//!
//! Otherwise, among closed shards, power-of-two-choices on the health score: sample two at
//! random and take the better. Unlike "always the best", this keeps ten independent LB
//! instances from stampeding the same shard between two health polls, while still steering
//! most traffic away from loaded or failing shards.
//!
//! The two samples are drawn in proportion to each shard's weight: 1 for a full member, less
//! for a shard in slow start ([`crate::membership::slow_start_weight`]), so a newly added
//! (empty, best-scored) shard wins only the pairs it is sampled into, which start rare and
//! grow over the slow-start window.

use rand::Rng;
use tokio::time::Instant;

/// How a shard's breaker would treat a call right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: normal calls.
    Closed,
    /// Half-open with a free trial slot, or open with its timeout passed.
    Trial,
    /// Open, or half-open with every trial slot taken.
    Refused,
}

/// One shard as the selector sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub index: usize,
    pub admission: Admission,
    pub score: f64,
    /// Sampling weight in (0, 1]: 1 for a full member, less during slow start.
    pub weight: f64,
    pub last_failure: Option<Instant>,
}

/// Picks a shard among `candidates` (already filtered for shards tried by this client and
/// shards that are draining). Returns `None` when none is admitted.
pub fn pick<R: Rng + ?Sized>(candidates: &[Candidate], rng: &mut R) -> Option<usize> {
    let trial = candidates
        .iter()
        .filter(|c| c.admission == Admission::Trial)
        .min_by_key(|c| c.last_failure)
        .map(|c| c.index);
    if trial.is_some() {
        return trial;
    }
    let closed: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.admission == Admission::Closed)
        .collect();
    match closed.len() {
        0 => {}
        1 => return closed.first().map(|c| c.index),
        _ => {
            let a = weighted(&closed, None, rng)?;
            let b = weighted(&closed, Some(a), rng)?;
            let (ca, cb) = (closed.get(a)?, closed.get(b)?);
            return Some(if cb.score > ca.score {
                cb.index
            } else {
                ca.index
            });
        }
    }
    None
}

/// A position in `cands` drawn in proportion to the candidates' weights, never `skip`.
fn weighted<R: Rng + ?Sized>(
    cands: &[&Candidate],
    skip: Option<usize>,
    rng: &mut R,
) -> Option<usize> {
    let w = |c: &Candidate| {
        if c.weight.is_finite() {
            c.weight.clamp(f64::MIN_POSITIVE, 1.0)
        } else {
            1.0
        }
    };
    let total: f64 = cands
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .map(|(_, c)| w(c))
        .sum();
    let mut r = rng.random::<f64>() * total;
    let mut last = None;
    for (i, c) in cands.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        last = Some(i);
        r -= w(c);
        if r < 0.0 {
            return Some(i);
        }
    }
    // Rounding left a sliver: the last eligible candidate.
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn c(index: usize, admission: Admission, score: f64) -> Candidate {
        Candidate {
            index,
            admission,
            score,
            weight: 1.0,
            last_failure: None,
        }
    }

    #[test]
    fn prefers_lightly_loaded_shards_without_starving_others() {
        let mut rng = StdRng::seed_from_u64(7);
        let cands = [
            c(0, Admission::Closed, 0.46),
            c(1, Admission::Closed, 0.94),
            c(2, Admission::Closed, 0.94),
        ];
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[pick(&cands, &mut rng).unwrap()] += 1;
        }
        // With P2C the worst of three is chosen only when both samples hit it: never, since
        // samples are distinct. The two good shards share the load.
        assert_eq!(counts[0], 0);
        assert!(counts[1] > 9_000 && counts[2] > 9_000, "{counts:?}");
    }

    #[test]
    fn p2c_with_many_shards_still_uses_the_worst_sometimes_only_against_worse() {
        let mut rng = StdRng::seed_from_u64(1);
        let cands: Vec<_> = (0..5)
            .map(|i| c(i, Admission::Closed, i as f64 / 10.0))
            .collect();
        let mut counts = [0usize; 5];
        for _ in 0..50_000 {
            counts[pick(&cands, &mut rng).unwrap()] += 1;
        }
        assert_eq!(counts[0], 0, "the worst shard never wins a pair");
        assert!(counts.windows(2).all(|w| w[0] < w[1]), "{counts:?}");
    }

    #[test]
    fn trial_shards_are_probed_least_recently_failed_first() {
        let mut rng = StdRng::seed_from_u64(1);
        let t0 = Instant::now();
        let cands = [
            Candidate {
                index: 0,
                admission: Admission::Trial,
                score: 0.9,
                weight: 1.0,
                last_failure: Some(t0 + std::time::Duration::from_secs(5)),
            },
            Candidate {
                index: 1,
                admission: Admission::Trial,
                score: 0.1,
                weight: 1.0,
                last_failure: Some(t0),
            },
            Candidate {
                index: 2,
                admission: Admission::Refused,
                score: 1.0,
                weight: 1.0,
                last_failure: None,
            },
        ];
        assert_eq!(pick(&cands, &mut rng), Some(1));
        let refused = [c(0, Admission::Refused, 1.0)];
        assert_eq!(pick(&refused, &mut rng), None);
        assert_eq!(pick(&[], &mut rng), None);
    }

    #[test]
    fn a_trial_is_taken_before_closed_shards_then_p2c_resumes() {
        let mut rng = StdRng::seed_from_u64(3);
        let cands = [c(0, Admission::Trial, 0.1), c(1, Admission::Closed, 1.0)];
        assert_eq!(pick(&cands, &mut rng), Some(0));
        let cands = [c(0, Admission::Refused, 0.1), c(1, Admission::Closed, 1.0)];
        assert_eq!(pick(&cands, &mut rng), Some(1));
    }

    #[test]
    fn a_light_shard_wins_only_the_pairs_its_weight_lets_it_into() {
        let mut rng = StdRng::seed_from_u64(5);
        // Ten equal full members and one empty newcomer at the slow-start floor: sampled
        // about a tenth as often, it wins about 2 × 0.1 / 10.1 of the picks, not 2/11.
        let mut cands: Vec<_> = (0..10).map(|i| c(i, Admission::Closed, 0.5)).collect();
        cands.push(Candidate {
            weight: 0.1,
            ..c(10, Admission::Closed, 1.0)
        });
        let n = 100_000;
        let newcomer = (0..n)
            .filter(|_| pick(&cands, &mut rng) == Some(10))
            .count() as f64
            / n as f64;
        assert!((0.015..0.025).contains(&newcomer), "{newcomer}");
        if let Some(last) = cands.last_mut() {
            last.weight = 1.0;
        }
        let full = (0..n)
            .filter(|_| pick(&cands, &mut rng) == Some(10))
            .count() as f64
            / n as f64;
        assert!((0.17..0.195).contains(&full), "{full}");
    }
}
