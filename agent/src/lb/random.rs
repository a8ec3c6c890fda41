//! Uniform random choice, and the small generator every policy shares.

use std::cell::Cell;

thread_local! {
    static STATE: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    // Distinct per thread and per run; quality comes from the mixing below.
    let local = 0u8;
    let addr = &local as *const u8 as u64;
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    super::hash::mix(addr ^ time.rotate_left(17)) | 1
}

/// Sets this thread's generator, so a statistical test sees the same
/// sequence every run instead of failing now and then at its band's edge.
#[cfg(test)]
pub fn reseed(seed: u64) {
    STATE.with(|s| s.set(seed));
}

/// A fast thread-local pseudo-random number (splitmix64 over a counter):
/// good enough to spread load, not for anything secret.
pub fn fast_random() -> u64 {
    STATE.with(|s| {
        let next = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(next);
        super::hash::mix(next)
    })
}

/// A random index in `0..n` for which `ok` holds.
pub fn pick_where(n: usize, ok: impl Fn(usize) -> bool) -> Option<usize> {
    for _ in 0..super::RANDOM_TRIES {
        let i = (fast_random() % n as u64) as usize;
        if ok(i) {
            return Some(i);
        }
    }
    // Mostly not ok: scan from a random start, so the choice stays spread.
    let start = (fast_random() % n as u64) as usize;
    (0..n).map(|k| (start + k) % n).find(|&i| ok(i))
}
