//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table
//! of prime size M where each endpoint fills slots in its own permutation
//! order. Balanced to within about N/M, and when an endpoint leaves only
//! about 1/N of keys move. Lookup is one hash and one load.

use super::hash::{hash_bytes, mix};

#[derive(Debug)]
pub struct Maglev {
    table: Vec<u32>,
    endpoints: usize,
}

/// Table sizes (primes). The size must not change when an endpoint comes
/// or goes, or every key would move, so it depends only on a coarse bound:
/// at least 100 slots per endpoint keeps each share within ~1%.
const TABLE_SIZES: [usize; 2] = [65_537, 655_373];

fn is_prime(n: usize) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

impl Maglev {
    /// Builds the table for endpoints named `names` (their identity: the
    /// same name lands on the same slots in every build).
    pub fn new(names: &[String]) -> Maglev {
        let n = names.len();
        if n == 0 {
            return Maglev {
                table: Vec::new(),
                endpoints: 0,
            };
        }
        let m = TABLE_SIZES
            .into_iter()
            .find(|&m| m >= 100 * n)
            .unwrap_or_else(|| {
                (100 * n..)
                    .find(|&c| is_prime(c))
                    .expect("primes are unbounded")
            });
        let perms: Vec<(usize, usize)> = names
            .iter()
            .map(|name| {
                let offset = (hash_bytes(1, name.as_bytes()) % m as u64) as usize;
                let skip = (hash_bytes(2, name.as_bytes()) % (m as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; n];
        let mut table = vec![u32::MAX; m];
        let mut filled = 0;
        'fill: loop {
            for (i, &(offset, skip)) in perms.iter().enumerate() {
                let mut slot = (offset + next[i] * skip) % m;
                while table[slot] != u32::MAX {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m;
                }
                table[slot] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Maglev {
            table,
            endpoints: n,
        }
    }

    /// The endpoint for key hash `h`; if it is not `ok`, the key is
    /// rehashed a few times (so keys of healthy endpoints never move), then
    /// the table is scanned.
    pub fn pick_where(&self, h: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let m = self.table.len() as u64;
        let mut key = h;
        for _ in 0..super::RANDOM_TRIES * 2 {
            let i = self.table[(key % m) as usize] as usize;
            if ok(i) {
                return Some(i);
            }
            key = mix(key.wrapping_add(0x9e37_79b9_7f4a_7c15));
        }
        let start = (key % self.endpoints as u64) as usize;
        (0..self.endpoints)
            .map(|k| (start + k) % self.endpoints)
            .find(|&i| ok(i))
    }

    /// The endpoint key hash `h` maps to, ignoring health.
    pub fn lookup(&self, h: u64) -> Option<usize> {
        self.pick_where(h, |_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_one_of_n_moves_about_one_nth_of_keys() {
        for n in [3usize, 10, 50] {
            let names: Vec<String> = (0..n).map(|i| format!("10.1.0.{i}:8080")).collect();
            let before = Maglev::new(&names);
            // Remove the middle endpoint; survivors keep their names.
            let mut fewer = names.clone();
            let gone = fewer.remove(n / 2);
            let after = Maglev::new(&fewer);
            let keys = 100_000u64;
            let moved = (0..keys)
                .filter(|&k| {
                    let h = mix(k);
                    let b = &names[before.lookup(h).unwrap()];
                    let a = &fewer[after.lookup(h).unwrap()];
                    a != b
                })
                .count();
            let share = moved as f64 / keys as f64;
            assert!(
                share <= 1.5 / n as f64,
                "n={n}: {share:.4} of keys moved (limit {:.4}); removed {gone}",
                1.5 / n as f64
            );
        }
    }

    #[test]
    fn an_unavailable_endpoint_moves_only_its_own_keys() {
        let names: Vec<String> = (0..5).map(|i| format!("e{i}")).collect();
        let t = Maglev::new(&names);
        for k in 0..10_000u64 {
            let h = mix(k);
            let home = t.lookup(h).unwrap();
            let now = t.pick_where(h, |i| i != 3).unwrap();
            if home != 3 {
                assert_eq!(now, home);
            } else {
                assert_ne!(now, 3);
            }
        }
    }
}
