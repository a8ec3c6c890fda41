//! An endpoint's state as it leaves one agent and enters the next in an
//! upgrade: phase, ejection, failure counts, health verdict and latency
//! estimate, with times made relative (each agent's clock starts at its
//! own start). In-flight counts are not carried: the connections they
//! count are counted again as they are adopted.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::{EndpointState, Phase, RESET_IN_RUN};
use crate::clock::Millis;

/// What an endpoint's state says, in plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSnapshot {
    /// 0 closed, 1 open (ejected), 2 half-open.
    pub phase: u8,
    /// How much longer an ejection lasts.
    pub ejected_for_ms: u64,
    pub probes: u32,
    pub consecutive_failures: u32,
    /// The run of failures holds a reset (a successful connect does not
    /// end it). Absent from an older agent's snapshot.
    #[serde(default)]
    pub reset_in_run: bool,
    pub ejections: u32,
    /// How long ago it was last trusted again, if ever.
    pub closed_ms_ago: Option<u64>,
    pub healthy: bool,
    pub ewma_connect_us: u64,
    pub total_ejections: u64,
}

impl EndpointSnapshot {
    /// Whether it says what a new endpoint's state says, so that it need
    /// not travel.
    pub fn is_fresh(&self) -> bool {
        *self
            == EndpointSnapshot {
                healthy: true,
                ewma_connect_us: self.ewma_connect_us,
                ..EndpointSnapshot::default()
            }
    }
}

impl EndpointState {
    /// This state at `now`.
    pub fn snapshot(&self, now: Millis) -> EndpointSnapshot {
        let closed_since = self.closed_since.load(Ordering::Acquire);
        let run = self.consecutive_failures.load(Ordering::Acquire);
        EndpointSnapshot {
            phase: self.phase.load(Ordering::Acquire),
            ejected_for_ms: self
                .ejected_until
                .load(Ordering::Acquire)
                .saturating_sub(now),
            probes: self.probes.load(Ordering::Acquire),
            consecutive_failures: run & !RESET_IN_RUN,
            reset_in_run: run & RESET_IN_RUN != 0,
            ejections: self.ejections.load(Ordering::Acquire),
            closed_ms_ago: (closed_since != 0).then(|| now.saturating_sub(closed_since)),
            healthy: self.is_healthy(),
            ewma_connect_us: self.ewma_connect_us.load(Ordering::Relaxed),
            total_ejections: self.total_ejections.load(Ordering::Relaxed),
        }
    }

    /// Takes on what `snapshot` says, at `now`.
    pub fn restore(&self, snapshot: &EndpointSnapshot, now: Millis) {
        let _serial = self.transition.lock();
        let phase = match snapshot.phase {
            1 => Phase::Open,
            2 => Phase::HalfOpen,
            _ => Phase::Closed,
        };
        self.ejected_until
            .store(now + snapshot.ejected_for_ms, Ordering::Release);
        self.probes.store(snapshot.probes, Ordering::Release);
        let mark = if snapshot.reset_in_run {
            RESET_IN_RUN
        } else {
            0
        };
        self.consecutive_failures.store(
            snapshot.consecutive_failures.min(RESET_IN_RUN - 1) | mark,
            Ordering::Release,
        );
        self.ejections.store(snapshot.ejections, Ordering::Release);
        let closed_since = snapshot
            .closed_ms_ago
            .map_or(0, |ago| now.saturating_sub(ago).max(1));
        self.closed_since.store(closed_since, Ordering::Release);
        self.healthy.store(snapshot.healthy, Ordering::Release);
        self.ewma_connect_us
            .store(snapshot.ewma_connect_us, Ordering::Relaxed);
        self.total_ejections
            .store(snapshot.total_ejections, Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resilience::endpoint::{Outcome, OutlierSettings};

    fn settings() -> OutlierSettings {
        OutlierSettings {
            consecutive_failures: 2,
            base_ejection: 30_000,
            max_ejection: 300_000,
            max_ejection_percent: 100,
            half_open_max: 1,
        }
    }

    /// An ejected, unhealthy endpoint stays so in the next agent, whose
    /// clock started later: the ejection ends when it would have.
    #[test]
    fn an_ejection_and_a_health_verdict_carry_over_to_another_clock() {
        let old = EndpointState::default();
        let s = settings();
        for _ in 0..2 {
            let admitted = old.admit(1_000, &s).expect("admitted");
            old.report(admitted, Outcome::ConnectFailed, 1_000, &s, || true);
        }
        assert_eq!(old.phase(), Phase::Open);
        old.set_healthy(false);
        let snapshot = old.snapshot(11_000);
        assert!(!snapshot.is_fresh());
        let json = serde_json::to_string(&snapshot).unwrap();
        let snapshot: EndpointSnapshot = serde_json::from_str(&json).unwrap();

        // The next agent's clock reads 500 where the old one read 11 000.
        let new = EndpointState::default();
        new.restore(&snapshot, 500);
        assert_eq!(new.phase(), Phase::Open);
        assert!(!new.is_healthy());
        assert!(!new.is_eligible(500 + 19_999, &s), "still ejected");
        assert_eq!(new.snapshot(500), snapshot);
        assert!(EndpointState::default().snapshot(7).is_fresh());
    }

    /// A run of failures that holds a reset carries over as one: in the
    /// next agent a successful connect does not end it and one more reset
    /// ejects. An older agent's snapshot, without the mark, still reads.
    #[test]
    fn a_run_with_a_reset_carries_over_whole() {
        let old = EndpointState::default();
        let s = settings();
        let admitted = old.admit(1_000, &s).expect("admitted");
        old.report(admitted, Outcome::Reset, 1_000, &s, || true);
        let snapshot = old.snapshot(1_000);
        assert_eq!(
            (snapshot.consecutive_failures, snapshot.reset_in_run),
            (1, true)
        );
        let json = serde_json::to_string(&snapshot).unwrap();
        let new = EndpointState::default();
        new.restore(&serde_json::from_str(&json).unwrap(), 10);
        for outcome in [Outcome::Connected { micros: 30 }, Outcome::Reset] {
            let admitted = new.admit(10, &s).expect("admitted");
            new.report(admitted, outcome, 10, &s, || true);
        }
        assert_eq!(new.phase(), Phase::Open);

        let older = json.replace(",\"reset_in_run\":true", "");
        assert_ne!(older, json);
        let read: EndpointSnapshot = serde_json::from_str(&older).unwrap();
        assert_eq!((read.consecutive_failures, read.reset_in_run), (1, false));
    }
}
