//! Local rate limits (a workload's `rate_limit`): token buckets kept as
//! the generic cell rate algorithm, one atomic per bucket holding the
//! theoretical arrival time of the next request. A request is let through
//! when that time is no further ahead than the burst allows, and moves it
//! on by one interval; so a bucket takes no lock, and `burst` requests may
//! pass at once before the rate holds.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::tls::Identity;

/// Most sources a per-source limit keeps a bucket for; beyond, sources
/// whose bucket is full again are forgotten, and if none is, a new source
/// shares one overflow bucket (a flood of identities cannot grow memory).
const MAX_SOURCES: usize = 10_000;

/// One workload's limit.
#[derive(Debug)]
pub struct RateLimiter {
    /// Microseconds between requests at the limit.
    interval: u64,
    /// How far ahead the next arrival may be: `burst - 1` intervals.
    tolerance: u64,
    per_source: bool,
    shared: AtomicU64,
    sources: Mutex<HashMap<Identity, Arc<AtomicU64>>>,
}

impl RateLimiter {
    pub fn new(per_second: u32, burst: u32, per_source: bool) -> RateLimiter {
        let interval = 1_000_000 / u64::from(per_second.max(1));
        RateLimiter {
            interval: interval.max(1),
            tolerance: interval * u64::from(burst.max(1) - 1),
            per_source,
            shared: AtomicU64::new(0),
            sources: Mutex::default(),
        }
    }

    /// Lets a request from `source` through, or says how long until one
    /// would be.
    pub fn admit(&self, source: Option<&Identity>) -> Result<(), Duration> {
        let now = micros_now();
        match source.filter(|_| self.per_source) {
            Some(source) => {
                let bucket = self.bucket_of(source, now);
                self.take(bucket.as_deref().unwrap_or(&self.shared), now)
            }
            None => self.take(&self.shared, now),
        }
    }

    fn bucket_of(&self, source: &Identity, now: u64) -> Option<Arc<AtomicU64>> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = sources.get(source) {
            return Some(bucket.clone());
        }
        if sources.len() >= MAX_SOURCES {
            sources.retain(|_, b| b.load(Ordering::Relaxed) > now);
            if sources.len() >= MAX_SOURCES {
                return None;
            }
        }
        let bucket = Arc::new(AtomicU64::new(0));
        sources.insert(source.clone(), bucket.clone());
        Some(bucket)
    }

    fn take(&self, bucket: &AtomicU64, now: u64) -> Result<(), Duration> {
        let mut next = bucket.load(Ordering::Acquire);
        loop {
            let from = next.max(now);
            let ahead = from - now;
            if ahead > self.tolerance {
                return Err(Duration::from_micros(ahead - self.tolerance));
            }
            match bucket.compare_exchange_weak(
                next,
                from + self.interval,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => next = seen,
            }
        }
    }
}

/// Microseconds since the first call (never 0, so that a fresh bucket,
/// at 0, is always behind).
fn micros_now() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(|| Instant::now() - Duration::from_secs(1));
    start.elapsed().as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_source() {
        let limit = RateLimiter::new(100, 5, true);
        let a = Identity::new("td", "payments", "checkout");
        let b = Identity::new("td", "payments", "batch");
        let passed = (0..20).filter(|_| limit.admit(Some(&a)).is_ok()).count();
        assert_eq!(passed, 5);
        // The wait asked is about one interval (10 ms).
        let wait = limit.admit(Some(&a)).unwrap_err();
        assert!(wait <= Duration::from_millis(10), "{wait:?}");
        assert!(limit.admit(Some(&b)).is_ok(), "another source has its own");
        std::thread::sleep(Duration::from_millis(25));
        assert!(limit.admit(Some(&a)).is_ok(), "refilled");
    }

    #[test]
    fn without_per_source_every_caller_shares_one_bucket() {
        let limit = RateLimiter::new(10, 2, false);
        let a = Identity::new("td", "payments", "checkout");
        let b = Identity::new("td", "payments", "batch");
        assert!(limit.admit(Some(&a)).is_ok());
        assert!(limit.admit(Some(&b)).is_ok());
        assert!(limit.admit(Some(&b)).is_err());
        assert!(limit.admit(None).is_err());
    }
}
