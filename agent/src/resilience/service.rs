//! Per-service thresholds (Envoy's circuit breakers), the connect-retry
//! budget, and the service's counters. All atomics; no lock.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::clock::Millis;

/// Why a connection was failed fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    MaxConnections,
    MaxPendingConnects,
    MaxRetries,
    /// No endpoint was eligible and the panic policy is fail_closed.
    NoEligibleEndpoint,
    /// A request service's requests waiting for their answers.
    MaxPendingRequests,
}

impl Overflow {
    pub const ALL: [Overflow; 5] = [
        Overflow::MaxConnections,
        Overflow::MaxPendingConnects,
        Overflow::MaxRetries,
        Overflow::NoEligibleEndpoint,
        Overflow::MaxPendingRequests,
    ];

    /// Stable name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Overflow::MaxConnections => "max_connections",
            Overflow::MaxPendingConnects => "max_pending_connects",
            Overflow::MaxRetries => "max_retries",
            Overflow::NoEligibleEndpoint => "no_eligible_endpoint",
            Overflow::MaxPendingRequests => "max_pending_requests",
        }
    }
}

/// Thresholds, resolved from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub max_connections: u32,
    pub max_pending_connects: u32,
    pub max_retries: u32,
    pub max_pending_requests: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_connects: 1024,
            max_retries: 3,
            max_pending_requests: 1024,
        }
    }
}

/// Retry budget settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetSettings {
    pub percent: u32,
    pub min_per_second: u32,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        BudgetSettings {
            percent: 20,
            min_per_second: 10,
        }
    }
}

/// Length of the retry budget's window, in one-second buckets.
const WINDOW_SECS: usize = 10;

/// Counts events over the last [`WINDOW_SECS`] seconds in one-second
/// buckets. A bucket is reset by the first writer of a new second; a race
/// there can lose a count, which a budget tolerates.
#[derive(Debug, Default)]
struct Window {
    counts: [AtomicU64; WINDOW_SECS],
    seconds: [AtomicU64; WINDOW_SECS],
}

impl Window {
    fn add(&self, now: Millis) {
        let second = now / 1000;
        let i = (second as usize) % WINDOW_SECS;
        if self.seconds[i].swap(second, Ordering::AcqRel) != second {
            self.counts[i].store(0, Ordering::Release);
        }
        self.counts[i].fetch_add(1, Ordering::AcqRel);
    }

    fn total(&self, now: Millis) -> u64 {
        let second = now / 1000;
        (0..WINDOW_SECS)
            .filter(|&i| {
                second.saturating_sub(self.seconds[i].load(Ordering::Acquire)) < WINDOW_SECS as u64
            })
            .map(|i| self.counts[i].load(Ordering::Acquire))
            .sum()
    }
}

/// One service's live state. Shared across catalog reloads.
#[derive(Debug, Default)]
pub struct ServiceState {
    connections: AtomicU32,
    pending: AtomicU32,
    pending_requests: AtomicU32,
    retries: AtomicU32,
    attempts: Window,
    retried: Window,
    overflowing: AtomicBool,
    panicking: AtomicBool,
    falling_back: AtomicBool,
    fallbacks_total: AtomicU64,
    fast_failures: [AtomicU64; 5],
    retries_total: AtomicU64,
    budget_exhausted: AtomicU64,
}

/// Holds one unit of a threshold until dropped.
#[derive(Debug)]
pub struct Slot<'a>(&'a AtomicU32);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn take<'a>(counter: &'a AtomicU32, max: u32) -> Option<Slot<'a>> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(counter))
}

impl ServiceState {
    /// A slot under max_connections, for the life of one connection.
    pub fn open_connection(&self, t: &Thresholds) -> Option<Slot<'_>> {
        take(&self.connections, t.max_connections)
    }

    /// A slot for a connection that is already open (moved here from the
    /// previous agent): counted like the others, never refused.
    pub fn adopt_connection(&self) -> Slot<'_> {
        self.connections.fetch_add(1, Ordering::AcqRel);
        Slot(&self.connections)
    }

    /// A slot under max_pending_connects, for one connect attempt.
    pub fn start_connect(&self, t: &Thresholds, now: Millis) -> Option<Slot<'_>> {
        let slot = take(&self.pending, t.max_pending_connects)?;
        self.attempts.add(now);
        Some(slot)
    }

    /// A slot under max_pending_requests, held by one request from its
    /// arrival until its answer's head (every attempt included).
    pub fn start_request(&self, t: &Thresholds) -> Option<Slot<'_>> {
        take(&self.pending_requests, t.max_pending_requests)
    }

    /// Counts one request's first attempt, so that the retry budget is a
    /// share of requests as it is of connects.
    pub fn note_request(&self, now: Millis) {
        self.attempts.add(now);
    }

    /// Permission for one connect retry: under max_retries and within the
    /// budget (`percent` of recent attempts plus `min_per_second`).
    pub fn start_retry(
        &self,
        t: &Thresholds,
        budget: &BudgetSettings,
        now: Millis,
    ) -> Result<Slot<'_>, RetryDenied> {
        let allowed = u64::from(budget.min_per_second) * WINDOW_SECS as u64
            + self.attempts.total(now) * u64::from(budget.percent) / 100;
        if self.retried.total(now) >= allowed {
            self.budget_exhausted.fetch_add(1, Ordering::Relaxed);
            return Err(RetryDenied::BudgetExhausted);
        }
        let slot = take(&self.retries, t.max_retries).ok_or(RetryDenied::MaxRetries)?;
        self.retried.add(now);
        self.retries_total.fetch_add(1, Ordering::Relaxed);
        Ok(slot)
    }

    /// Counts a fast failure. Returns true when this starts an overflow
    /// episode (log it once), see [`Self::note_served`].
    pub fn fail_fast(&self, why: Overflow) -> bool {
        self.fast_failures[why as usize].fetch_add(1, Ordering::Relaxed);
        !self.overflowing.swap(true, Ordering::AcqRel)
    }

    /// A connection was served: returns true when this ends an overflow
    /// episode.
    pub fn note_served(&self) -> bool {
        self.overflowing.load(Ordering::Relaxed) && self.overflowing.swap(false, Ordering::AcqRel)
    }

    /// Counts a request its fallback answered. Returns true when this
    /// starts an episode (log it once).
    pub fn start_fallback(&self) -> bool {
        self.fallbacks_total.fetch_add(1, Ordering::Relaxed);
        !self.falling_back.swap(true, Ordering::AcqRel)
    }

    /// An endpoint was eligible again: returns true when this ends a
    /// fallback episode.
    pub fn end_fallback(&self) -> bool {
        self.falling_back.load(Ordering::Relaxed) && self.falling_back.swap(false, Ordering::AcqRel)
    }

    /// Requests answered by the fallback so far.
    pub fn fallbacks_total(&self) -> u64 {
        self.fallbacks_total.load(Ordering::Relaxed)
    }

    /// Records whether the last pick had to ignore eligibility; returns
    /// true on a change (log it once).
    pub fn set_panicking(&self, panicking: bool) -> bool {
        self.panicking.load(Ordering::Relaxed) != panicking
            && self.panicking.swap(panicking, Ordering::AcqRel) != panicking
    }

    pub fn is_panicking(&self) -> bool {
        self.panicking.load(Ordering::Relaxed)
    }

    /// Open connections now.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Connects in progress now.
    pub fn pending_connects(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Requests waiting for their answers now.
    pub fn pending_requests(&self) -> u32 {
        self.pending_requests.load(Ordering::Relaxed)
    }

    /// Fast failures so far, by reason.
    pub fn fast_failures(&self, why: Overflow) -> u64 {
        self.fast_failures[why as usize].load(Ordering::Relaxed)
    }

    pub fn retries_total(&self) -> u64 {
        self.retries_total.load(Ordering::Relaxed)
    }

    pub fn budget_exhausted(&self) -> u64 {
        self.budget_exhausted.load(Ordering::Relaxed)
    }
}

/// Why a retry was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDenied {
    BudgetExhausted,
    MaxRetries,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_hold_and_release() {
        let s = ServiceState::default();
        let t = Thresholds {
            max_connections: 2,
            max_pending_connects: 1,
            max_retries: 1,
            max_pending_requests: 1,
        };
        let a = s.open_connection(&t).unwrap();
        let _b = s.open_connection(&t).unwrap();
        assert!(s.open_connection(&t).is_none());
        drop(a);
        assert!(s.open_connection(&t).is_some());
        let p = s.start_connect(&t, 0).unwrap();
        assert!(s.start_connect(&t, 0).is_none());
        drop(p);
        assert_eq!(s.pending_connects(), 0);
        let r = s.start_request(&t).unwrap();
        assert!(s.start_request(&t).is_none());
        assert_eq!(s.pending_requests(), 1);
        drop(r);
        assert!(s.start_request(&t).is_some());
    }

    #[test]
    fn retry_budget_is_a_share_of_recent_attempts_plus_a_floor() {
        let s = ServiceState::default();
        let t = Thresholds {
            max_retries: 1000,
            ..Thresholds::default()
        };
        let budget = BudgetSettings {
            percent: 20,
            min_per_second: 1,
        };
        for _ in 0..100 {
            drop(s.start_connect(&t, 500).unwrap());
        }
        // 10 (floor over 10 s) + 20% of 100.
        let granted = (0..100)
            .filter(|_| s.start_retry(&t, &budget, 500).is_ok())
            .count();
        assert_eq!(granted, 30);
        assert_eq!(s.budget_exhausted(), 70);
        // Eleven seconds later the window has forgotten all of it.
        assert!(s.start_retry(&t, &budget, 11_500).is_ok());
    }

    #[test]
    fn max_retries_bounds_retries_in_flight() {
        let s = ServiceState::default();
        let t = Thresholds {
            max_retries: 1,
            ..Thresholds::default()
        };
        let b = BudgetSettings::default();
        let r = s.start_retry(&t, &b, 0).unwrap();
        assert_eq!(
            s.start_retry(&t, &b, 0).unwrap_err(),
            RetryDenied::MaxRetries
        );
        drop(r);
        assert!(s.start_retry(&t, &b, 0).is_ok());
    }

    #[test]
    fn overflow_and_panic_episodes_are_reported_once() {
        let s = ServiceState::default();
        assert!(s.fail_fast(Overflow::MaxConnections));
        assert!(!s.fail_fast(Overflow::MaxConnections));
        assert_eq!(s.fast_failures(Overflow::MaxConnections), 2);
        assert!(s.note_served());
        assert!(!s.note_served());
        assert!(s.set_panicking(true));
        assert!(!s.set_panicking(true));
        assert!(s.set_panicking(false));
    }
}
