//! Choosing an endpoint for a new connection: the policies, each over an
//! index range `0..n` and a predicate saying which indices may be chosen
//! (eligibility, locality and already-tried endpoints are the caller's
//! business). Every pick is lock-free.

mod hash;
mod maglev;
mod random;
mod round_robin;
mod weighted;

use std::net::IpAddr;

pub use maglev::Maglev;
pub use random::fast_random;
pub use round_robin::RoundRobin;
pub use weighted::{WeightedRoundRobin, bounded_cycle};

use crate::config::{HashKey, Policy};

/// What the caller knows about the connection being balanced.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    pub source_workload: Option<&'a str>,
    pub source_addr: IpAddr,
}

/// One service's balancer, built with its endpoint list.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin(RoundRobin),
    WeightedRoundRobin(WeightedRoundRobin),
    Random,
    LeastRequest { ewma: bool },
    ConsistentHash { table: Maglev, key: HashKey },
}

/// Random tries before a policy falls back to a full scan.
const RANDOM_TRIES: usize = 4;

impl Balancer {
    /// Whether this policy sends traffic in proportion to endpoint weights.
    pub fn honours_weights(&self) -> bool {
        matches!(self, Balancer::WeightedRoundRobin(_))
    }

    /// Builds the balancer for endpoints with these weights and names (the
    /// names place endpoints in a consistent-hash table).
    pub fn new(
        policy: Policy,
        ewma: bool,
        hash_key: Option<HashKey>,
        weights: &[u32],
        names: &[String],
    ) -> Balancer {
        match policy {
            Policy::RoundRobin => Balancer::RoundRobin(RoundRobin::default()),
            Policy::WeightedRoundRobin => {
                Balancer::WeightedRoundRobin(WeightedRoundRobin::new(weights))
            }
            Policy::Random => Balancer::Random,
            Policy::LeastRequest => Balancer::LeastRequest { ewma },
            Policy::ConsistentHash => Balancer::ConsistentHash {
                table: Maglev::new(names),
                key: hash_key.unwrap_or(HashKey::SourceAddress),
            },
        }
    }

    /// Picks an index in `0..n` for which `ok` holds. `load(i)` is the
    /// endpoint's load estimate (least_request), `weight(i)` its weight.
    pub fn pick(
        &self,
        n: usize,
        ctx: &PickContext<'_>,
        ok: impl Fn(usize) -> bool,
        load: impl Fn(usize, bool) -> u64,
        weight: impl Fn(usize) -> u32,
    ) -> Option<usize> {
        if n == 0 {
            return None;
        }
        match self {
            Balancer::RoundRobin(rr) => rr.pick_where(n, ok),
            Balancer::WeightedRoundRobin(w) => w.pick_where(ok, weight),
            Balancer::Random => random::pick_where(n, ok),
            Balancer::LeastRequest { ewma } => least_request(n, ok, |i| load(i, *ewma)),
            Balancer::ConsistentHash { table, key } => {
                let h = match (key, ctx.source_workload) {
                    (HashKey::SourceWorkload, Some(w)) => hash::hash_bytes(0, w.as_bytes()),
                    _ => hash::hash_ip(ctx.source_addr),
                };
                table.pick_where(h, ok)
            }
        }
    }
}

/// Power of two choices: two random candidates, the less loaded wins.
fn least_request(
    n: usize,
    ok: impl Fn(usize) -> bool,
    load: impl Fn(usize) -> u64,
) -> Option<usize> {
    for _ in 0..RANDOM_TRIES {
        let r = fast_random();
        let a = (r % n as u64) as usize;
        let b = if n > 1 {
            // A second index different from the first.
            (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n
        } else {
            a
        };
        match (ok(a), ok(b)) {
            (true, true) => return Some(if load(b) < load(a) { b } else { a }),
            (true, false) => return Some(a),
            (false, true) => return Some(b),
            (false, false) => {}
        }
    }
    (0..n).filter(|&i| ok(i)).min_by_key(|&i| load(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> PickContext<'static> {
        PickContext {
            source_workload: None,
            source_addr: "127.0.0.1".parse().unwrap(),
        }
    }

    /// Share of `picks` each of `n` indices got.
    fn shares(
        b: &Balancer,
        n: usize,
        picks: usize,
        weight: impl Fn(usize) -> u32 + Copy,
    ) -> Vec<f64> {
        random::reseed(0x5eed);
        let mut counts = vec![0usize; n];
        for _ in 0..picks {
            let i = b.pick(n, &ctx(), |_| true, |_, _| 1, weight).unwrap();
            counts[i] += 1;
        }
        counts.iter().map(|&c| c as f64 / picks as f64).collect()
    }

    fn assert_within(shares: &[f64], expected: &[f64], tolerance: f64) {
        for (i, (got, want)) in shares.iter().zip(expected).enumerate() {
            assert!(
                (got - want).abs() <= tolerance * want,
                "endpoint {i}: share {got:.4}, expected {want:.4} ± {}%",
                tolerance * 100.0
            );
        }
    }

    const PICKS: usize = 100_000;

    #[test]
    fn round_robin_random_and_least_request_share_evenly() {
        for policy in [Policy::RoundRobin, Policy::Random, Policy::LeastRequest] {
            let b = Balancer::new(policy, false, None, &[1; 5], &[]);
            assert_within(&shares(&b, 5, PICKS, |_| 1), &[0.2; 5], 0.02);
        }
    }

    #[test]
    fn weighted_round_robin_honours_weights() {
        let weights = [1u32, 2, 3, 4];
        let b = Balancer::new(Policy::WeightedRoundRobin, false, None, &weights, &[]);
        let expected: Vec<f64> = weights.iter().map(|&w| f64::from(w) / 10.0).collect();
        assert_within(&shares(&b, 4, PICKS, |i| weights[i]), &expected, 0.02);
    }

    #[test]
    fn consistent_hash_spreads_sources_evenly() {
        let names: Vec<String> = (0..4).map(|i| format!("10.0.0.{i}:80")).collect();
        let b = Balancer::new(
            Policy::ConsistentHash,
            false,
            Some(HashKey::SourceAddress),
            &[1; 4],
            &names,
        );
        let mut counts = [0usize; 4];
        for k in 0..PICKS as u32 {
            let c = PickContext {
                source_workload: None,
                source_addr: IpAddr::from(k.to_be_bytes()),
            };
            counts[b.pick(4, &c, |_| true, |_, _| 1, |_| 1).unwrap()] += 1;
        }
        let got: Vec<f64> = counts.iter().map(|&c| c as f64 / PICKS as f64).collect();
        assert_within(&got, &[0.25; 4], 0.02);
    }

    #[test]
    fn least_request_prefers_the_less_loaded() {
        let b = Balancer::new(Policy::LeastRequest, false, None, &[1; 2], &[]);
        for _ in 0..100 {
            let i = b
                .pick(
                    2,
                    &ctx(),
                    |_| true,
                    |i, _| if i == 0 { 10 } else { 1 },
                    |_| 1,
                )
                .unwrap();
            assert_eq!(i, 1);
        }
    }

    #[test]
    fn every_policy_skips_what_is_not_ok() {
        let names: Vec<String> = (0..4).map(|i| format!("e{i}")).collect();
        for policy in [
            Policy::RoundRobin,
            Policy::WeightedRoundRobin,
            Policy::Random,
            Policy::LeastRequest,
            Policy::ConsistentHash,
        ] {
            let b = Balancer::new(
                policy,
                false,
                Some(HashKey::SourceAddress),
                &[1, 2, 3, 4],
                &names,
            );
            for _ in 0..1000 {
                let i = b.pick(4, &ctx(), |i| i == 2, |_, _| 1, |i| i as u32 + 1);
                assert_eq!(i, Some(2), "{policy:?}");
            }
            assert_eq!(
                b.pick(4, &ctx(), |_| false, |_, _| 1, |_| 1),
                None,
                "{policy:?}"
            );
        }
    }
}
