//! The idle and lifetime limits of a copy: one timer that compares the
//! byte counters the copy keeps anyway, so the data path reads no clock.

use std::{sync::atomic::Ordering, time::Duration};

use super::CopyEnd;
use crate::{clock::now_ms, telemetry::ByteCounters};

/// The idle watchdog's view: since when ([`now_ms`]) the byte counters
/// have stood at `seen`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Quiet {
    pub(super) since: u64,
    pub(super) seen: u64,
}

pub(super) fn bytes_moved(bytes: &ByteCounters) -> u64 {
    bytes.sent.load(Ordering::Relaxed) + bytes.received.load(Ordering::Relaxed)
}

/// How many looks per idle period the watchdog takes: a connection idle
/// for `idle` is cut within `idle * (1 + 1/IDLE_CHECKS)`.
pub(super) const IDLE_CHECKS: u64 = 4;

/// Resolves once no byte moved for the idle time, or at `deadline` (in
/// [`now_ms`] terms). It compares the byte counters the copy keeps anyway,
/// so the data path reads no clock; one timer serves both limits, to keep
/// idle connections small. `quiet` is when a byte last moved as far
/// as it knows, kept for a suspension to carry.
// Not an `async fn`, as [`Progress::carry`].
#[expect(clippy::manual_async_fn, reason = "see above")]
pub(super) fn watchdog<'a>(
    bytes: &'a ByteCounters,
    idle: Duration,
    deadline: Option<u64>,
    quiet: &'a mut Quiet,
) -> impl Future<Output = CopyEnd> + 'a {
    async move {
        let idle_ms = (idle.as_millis() as u64).max(1);
        let step = (idle_ms / IDLE_CHECKS).max(1);
        loop {
            let now = now_ms();
            if deadline.is_some_and(|d| now >= d) {
                return CopyEnd::MaxDuration;
            }
            let current = bytes_moved(bytes);
            if current != quiet.seen {
                *quiet = Quiet {
                    since: now,
                    seen: current,
                };
            } else if now.saturating_sub(quiet.since) >= idle_ms {
                return CopyEnd::Idle;
            }
            let next = deadline.map_or(now + step, |d| d.min(now + step));
            tokio::time::sleep(Duration::from_millis(next.saturating_sub(now).max(1))).await;
        }
    }
}
