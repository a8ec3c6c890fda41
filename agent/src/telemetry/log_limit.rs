//! Warnings an outsider can provoke (refused connections) are logged at
//! most once per reason per interval, with a count of the ones held back,
//! so that an attacker cannot set the log volume. The counters in the
//! metrics stay exact; only the log is thinned.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use log::warn;

/// How often one reason may be logged by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// Rate limit for warnings, per reason.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    /// reason -> (when last logged, held back since).
    seen: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new(DEFAULT_INTERVAL)
    }
}

impl LogLimiter {
    pub fn new(interval: Duration) -> LogLimiter {
        LogLimiter {
            interval,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Logs `message()` as a warning unless `reason` was logged within the
    /// interval; returns whether it was logged. The message is only built
    /// when it is logged.
    pub fn warn(&self, reason: &'static str, message: impl FnOnce() -> String) -> bool {
        let held_back = {
            let Ok(mut seen) = self.seen.lock() else {
                return false;
            };
            let now = Instant::now();
            match seen.get_mut(reason) {
                Some((last, held)) if now.duration_since(*last) < self.interval => {
                    *held += 1;
                    return false;
                }
                Some((last, held)) => {
                    *last = now;
                    std::mem::take(held)
                }
                None => {
                    seen.insert(reason, (now, 0));
                    0
                }
            }
        };
        if held_back > 0 {
            warn!(
                "{} ({held_back} more `{reason}` held back in the last {:?})",
                message(),
                self.interval
            );
        } else {
            warn!("{}", message());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_reason_per_interval() {
        let limiter = LogLimiter::new(Duration::from_secs(3600));
        let logged = (0..500)
            .filter(|_| limiter.warn("not_tls", || "x".into()))
            .count();
        assert_eq!(logged, 1);
        assert!(limiter.warn("unknown_ca", || "y".into()));
        assert_eq!(limiter.seen.lock().unwrap()["not_tls"].1, 499);
    }

    #[test]
    fn logs_again_after_the_interval_with_the_count() {
        let limiter = LogLimiter::new(Duration::ZERO);
        assert!(limiter.warn("a", || "1".into()));
        assert!(limiter.warn("a", || "2".into()));
    }
}
