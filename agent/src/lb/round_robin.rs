//! Plain round robin: endpoints in turn, weights ignored.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Hands out indices `0..n` in turn. Lock-free: concurrent callers each get
/// a distinct ticket, so the order holds under load too.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// The next index in `0..n`, or `None` when there is nothing to pick.
    pub fn pick(&self, n: usize) -> Option<usize> {
        self.pick_where(n, |_| true)
    }

    /// The next index in turn for which `ok` holds; skipped indices keep
    /// their place in the rotation.
    pub fn pick_where(&self, n: usize, ok: impl Fn(usize) -> bool) -> Option<usize> {
        if n == 0 {
            return None;
        }
        // Relaxed: the counter orders nothing but itself.
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_in_order() {
        let rr = RoundRobin::default();
        let picks: Vec<_> = (0..7).map(|_| rr.pick(3).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(rr.pick(0), None);
    }

    #[test]
    fn skips_what_is_not_ok() {
        let rr = RoundRobin::default();
        let picks: Vec<_> = (0..4)
            .map(|_| rr.pick_where(3, |i| i != 1).unwrap())
            .collect();
        assert_eq!(picks, [0, 2, 2, 0]);
    }

    #[test]
    fn concurrent_callers_share_the_load_evenly() {
        let rr = std::sync::Arc::new(RoundRobin::default());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let rr = rr.clone();
                std::thread::spawn(move || {
                    let mut counts = [0usize; 3];
                    for _ in 0..3000 {
                        counts[rr.pick(3).unwrap()] += 1;
                    }
                    counts
                })
            })
            .collect();
        let mut total = [0usize; 3];
        for h in handles {
            for (t, c) in total.iter_mut().zip(h.join().unwrap()) {
                *t += c;
            }
        }
        assert_eq!(total, [4000, 4000, 4000]);
    }
}
