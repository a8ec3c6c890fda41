//! Smooth weighted round robin (nginx's algorithm), precomputed: the cycle
//! of `sum(weights) / gcd` picks is built once, and picking is one atomic
//! increment and one load. Each endpoint appears exactly `weight / gcd`
//! times per cycle, interleaved rather than in runs.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::fast_random;

#[derive(Debug)]
pub struct WeightedRoundRobin {
    cycle: Vec<u32>,
    next: AtomicUsize,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The weights divided by their greatest common divisor.
fn reduced(weights: &[u32]) -> impl Iterator<Item = u32> + '_ {
    let g = weights
        .iter()
        .copied()
        .filter(|&w| w > 0)
        .fold(0, gcd)
        .max(1);
    weights.iter().map(move |&w| w / g)
}

/// The smooth weighted round-robin order of indices into `weights`: each
/// index appears `weight / gcd` times, interleaved rather than in runs.
pub fn smooth_cycle(weights: &[u32]) -> Vec<u32> {
    let reduced: Vec<i64> = reduced(weights).map(i64::from).collect();
    let total: i64 = reduced.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in reduced.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best as u32);
    }
    cycle
}

/// [`smooth_cycle`] in at most `max_len` slots: when the reduced weights
/// add up to more, they are scaled down (every positive weight keeps at
/// least one slot), which bends proportions by at most one slot each.
pub fn bounded_cycle(weights: &[u32], max_len: usize) -> Vec<u32> {
    let total: u64 = reduced(weights).map(u64::from).sum();
    if total as usize <= max_len {
        return smooth_cycle(weights);
    }
    let positive = weights.iter().filter(|&&w| w > 0).count() as u64;
    // Leave room for the slot every weight keeps.
    let room = (max_len as u64).saturating_sub(positive);
    let scaled: Vec<u32> = reduced(weights)
        .map(|w| {
            if w == 0 {
                0
            } else {
                1 + (u64::from(w) * room / total) as u32
            }
        })
        .collect();
    smooth_cycle(&scaled)
}

impl WeightedRoundRobin {
    /// Builds the cycle. Weights of 0 never appear; validation bounds the
    /// sum (config::MAX_WEIGHT_SUM).
    pub fn new(weights: &[u32]) -> WeightedRoundRobin {
        WeightedRoundRobin {
            cycle: smooth_cycle(weights),
            next: AtomicUsize::new(0),
        }
    }

    /// The next index of the cycle if `ok`; otherwise a weighted random
    /// choice among the indices that are ok.
    pub fn pick_where(
        &self,
        ok: impl Fn(usize) -> bool,
        weight: impl Fn(usize) -> u32,
    ) -> Option<usize> {
        if self.cycle.is_empty() {
            return None;
        }
        let ticket = self.next.fetch_add(1, Ordering::Relaxed) % self.cycle.len();
        let i = self.cycle[ticket] as usize;
        if ok(i) {
            return Some(i);
        }
        let n = self.cycle.iter().max().map_or(0, |&m| m as usize + 1);
        let total: u64 = (0..n)
            .filter(|&i| ok(i))
            .map(|i| u64::from(weight(i)))
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = fast_random() % total;
        for i in (0..n).filter(|&i| ok(i)) {
            let w = u64::from(weight(i));
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cycle_holds_each_weight_exactly_and_interleaves() {
        let w = WeightedRoundRobin::new(&[5, 1, 1]);
        assert_eq!(w.cycle, [0, 0, 1, 0, 2, 0, 0]);
        let w = WeightedRoundRobin::new(&[20, 40, 60]);
        assert_eq!(w.cycle.len(), 6, "reduced by the gcd");
        let mut counts = [0; 3];
        for &i in &w.cycle {
            counts[i as usize] += 1;
        }
        assert_eq!(counts, [1, 2, 3]);
    }
}
