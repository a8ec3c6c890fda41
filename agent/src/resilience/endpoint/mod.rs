//! Per-endpoint state: outlier detection as a closed / open / half-open
//! breaker, the active health-check verdict, in-flight connections and an
//! EWMA of connect latency. Reads on the pick path are plain atomic loads;
//! transitions take this endpoint's own small lock, never a shared one.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering},
};

use crate::clock::Millis;

mod snapshot;
pub use snapshot::EndpointSnapshot;

/// Where an endpoint stands in outlier detection (Hystrix/resilience4j
/// vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Trusted: takes traffic, failures are counted.
    Closed = 0,
    /// Ejected until `ejected_until`.
    Open = 1,
    /// Ejection time is over: takes a limited number of probe connections;
    /// one success closes it, one failure opens it again.
    HalfOpen = 2,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Open,
            2 => Phase::HalfOpen,
            _ => Phase::Closed,
        }
    }

    /// Lower-case name for display.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Closed => "closed",
            Phase::Open => "open",
            Phase::HalfOpen => "half_open",
        }
    }
}

/// Outlier-detection settings, resolved from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSettings {
    /// 0 disables ejection.
    pub consecutive_failures: u32,
    pub base_ejection: Millis,
    pub max_ejection: Millis,
    pub max_ejection_percent: u32,
    pub half_open_max: u32,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            consecutive_failures: 5,
            base_ejection: 30_000,
            max_ejection: 300_000,
            max_ejection_percent: 50,
            half_open_max: 1,
        }
    }
}

/// How a connection was let through to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The endpoint is closed (trusted).
    Normal,
    /// A half-open probe; holds one of the probe slots until reported.
    Probe,
}

/// What happened to a connection, as far as the endpoint's health goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Connected, in this many microseconds; how the connection ends is
    /// still to come, so this ends a run of connect failures only: an
    /// endpoint that takes every connection and resets it is still
    /// counted.
    Connected { micros: u64 },
    /// A request was answered, not with a failure, in this many
    /// microseconds (the request path): ends any run of failures.
    Answered { micros: u64 },
    /// A connection ended without the endpoint resetting it: ends any run
    /// of failures.
    Closed,
    /// The connect was refused or timed out.
    ConnectFailed,
    /// The endpoint reset an established connection (or failed a request).
    Reset,
}

/// Marks, in `consecutive_failures`, a run that holds a reset: a later
/// connect that succeeds does not end it.
pub(super) const RESET_IN_RUN: u32 = 1 << 31;

/// What [`EndpointState::report`] changed, for logging and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// Ejected for this long.
    Ejected {
        for_ms: Millis,
    },
    /// A half-open probe succeeded: trusted again.
    Restored,
    /// Enough consecutive failures, but max_ejection_percent forbids it.
    EjectionRefused,
}

/// One endpoint's live state. Shared across catalog reloads for as long as
/// the endpoint stays in its service.
#[derive(Debug)]
pub struct EndpointState {
    phase: AtomicU8,
    ejected_until: AtomicU64,
    probes: AtomicU32,
    consecutive_failures: AtomicU32,
    /// Ejections so far: the multiplier of the next ejection time.
    ejections: AtomicU32,
    /// When the endpoint last became trusted again; a long quiet spell
    /// resets the multiplier.
    closed_since: AtomicU64,
    /// Verdict of the active health checks (true when there are none).
    healthy: AtomicBool,
    in_flight: AtomicU32,
    /// EWMA of connect latency in microseconds; 0 until the first sample.
    ewma_connect_us: AtomicU64,
    total_ejections: AtomicU64,
    /// Serialises phase changes; held for a few instructions.
    transition: Mutex<()>,
}

impl Default for EndpointState {
    fn default() -> Self {
        EndpointState {
            phase: AtomicU8::new(Phase::Closed as u8),
            ejected_until: AtomicU64::new(0),
            probes: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            closed_since: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            in_flight: AtomicU32::new(0),
            ewma_connect_us: AtomicU64::new(0),
            total_ejections: AtomicU64::new(0),
            transition: Mutex::new(()),
        }
    }
}

/// Weight of a new latency sample in the EWMA (Linkerd uses time decay;
/// a fixed weight keeps the pick path free of clock reads).
const EWMA_NEW_SAMPLE_PERCENT: u64 = 30;

impl EndpointState {
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// When the current ejection ends (meaningful in [`Phase::Open`]).
    pub fn ejected_until(&self) -> Millis {
        self.ejected_until.load(Ordering::Acquire)
    }

    pub fn ejections(&self) -> u64 {
        self.total_ejections.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Sets the active health-check verdict; returns whether it changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::AcqRel) != healthy
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn ewma_connect_us(&self) -> u64 {
        self.ewma_connect_us.load(Ordering::Relaxed)
    }

    /// Load estimate for least-request: in-flight connections, times the
    /// connect-latency EWMA when `ewma` is on (Linkerd's cost).
    pub fn load(&self, ewma: bool) -> u64 {
        let in_flight = u64::from(self.in_flight()) + 1;
        if ewma {
            in_flight * self.ewma_connect_us().max(1)
        } else {
            in_flight
        }
    }

    /// Counts one open connection (or request) until the returned guard
    /// drops; the guard may outlive the catalog (a response body).
    pub fn open_connection(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Whether the endpoint could take a connection now, without taking
    /// anything (used to filter candidates).
    pub fn is_eligible(&self, now: Millis, settings: &OutlierSettings) -> bool {
        if !self.is_healthy() {
            return false;
        }
        match self.phase() {
            Phase::Closed => true,
            Phase::Open => now >= self.ejected_until(),
            Phase::HalfOpen => self.probes.load(Ordering::Acquire) < settings.half_open_max,
        }
    }

    /// Lets a connection through, or not. In half-open this takes a probe
    /// slot, released by [`Self::report`].
    pub fn admit(&self, now: Millis, settings: &OutlierSettings) -> Option<Admission> {
        if !self.is_healthy() {
            return None;
        }
        match self.phase() {
            Phase::Closed => return Some(Admission::Normal),
            Phase::Open => {
                if now < self.ejected_until() {
                    return None;
                }
                let _t = self.lock();
                if self.phase() == Phase::Open && now >= self.ejected_until() {
                    self.probes.store(0, Ordering::Release);
                    self.phase.store(Phase::HalfOpen as u8, Ordering::Release);
                }
            }
            Phase::HalfOpen => {}
        }
        match self.phase() {
            Phase::Closed => Some(Admission::Normal),
            Phase::Open => None,
            Phase::HalfOpen => self
                .probes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                    (p < settings.half_open_max).then_some(p + 1)
                })
                .ok()
                .map(|_| Admission::Probe),
        }
    }

    /// Gives back what [`Self::admit`] took when no connect was made.
    pub fn cancel(&self, admission: Admission) {
        if admission == Admission::Probe {
            self.release_probe();
        }
    }

    /// Feeds one outcome in. `may_eject` answers whether the service can
    /// afford one more ejected endpoint (max_ejection_percent); it is only
    /// asked when this endpoint has failed often enough.
    pub fn report(
        &self,
        admission: Admission,
        outcome: Outcome,
        now: Millis,
        settings: &OutlierSettings,
        may_eject: impl FnOnce() -> bool,
    ) -> Transition {
        let probe = admission == Admission::Probe;
        match outcome {
            Outcome::Closed => {
                self.end_run(false);
                Transition::None
            }
            Outcome::Connected { micros } | Outcome::Answered { micros } => {
                self.record_latency(micros);
                self.end_run(matches!(outcome, Outcome::Connected { .. }));
                if probe {
                    let _t = self.lock();
                    self.release_probe();
                    if self.phase() == Phase::HalfOpen {
                        self.phase.store(Phase::Closed as u8, Ordering::Release);
                        self.closed_since.store(now, Ordering::Release);
                        return Transition::Restored;
                    }
                }
                Transition::None
            }
            Outcome::ConnectFailed | Outcome::Reset => {
                if probe {
                    let _t = self.lock();
                    self.release_probe();
                    if self.phase() == Phase::HalfOpen {
                        return self.eject(now, settings);
                    }
                    return Transition::None;
                }
                if settings.consecutive_failures == 0 {
                    return Transition::None;
                }
                let mark = match outcome {
                    Outcome::Reset => RESET_IN_RUN,
                    _ => 0,
                };
                let run = self
                    .consecutive_failures
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |run| {
                        Some(
                            ((run & !RESET_IN_RUN) + 1).min(RESET_IN_RUN - 1)
                                | (run & RESET_IN_RUN)
                                | mark,
                        )
                    })
                    .unwrap_or_default();
                let failures = (run & !RESET_IN_RUN) + 1;
                if failures < settings.consecutive_failures || self.phase() != Phase::Closed {
                    return Transition::None;
                }
                let _t = self.lock();
                if self.phase() != Phase::Closed {
                    return Transition::None;
                }
                if !may_eject() {
                    return Transition::EjectionRefused;
                }
                self.eject(now, settings)
            }
        }
    }

    /// Ends the run of failures after a success; `connect_only` (a connect
    /// that succeeded) leaves a run that holds a reset. Read first: on the
    /// common path, with no run, nothing is written to the shared line.
    fn end_run(&self, connect_only: bool) {
        let run = self.consecutive_failures.load(Ordering::Acquire);
        match (run, connect_only) {
            (0, _) => {}
            (_, false) => self.consecutive_failures.store(0, Ordering::Release),
            // Not over a reset counted meanwhile.
            (run, true) if run & RESET_IN_RUN == 0 => {
                let _ = self.consecutive_failures.compare_exchange(
                    run,
                    0,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
            (_, true) => {}
        }
    }

    /// Opens the breaker. Caller holds the transition lock.
    fn eject(&self, now: Millis, settings: &OutlierSettings) -> Transition {
        let quiet = now.saturating_sub(self.closed_since.load(Ordering::Acquire));
        if self.phase() == Phase::Closed && quiet >= settings.max_ejection {
            // Trusted for a long spell: start the multiplier afresh.
            self.ejections.store(0, Ordering::Release);
        }
        let n = u64::from(self.ejections.fetch_add(1, Ordering::AcqRel)) + 1;
        let for_ms = settings
            .base_ejection
            .saturating_mul(n)
            .min(settings.max_ejection);
        self.ejected_until.store(now + for_ms, Ordering::Release);
        self.consecutive_failures.store(0, Ordering::Release);
        self.phase.store(Phase::Open as u8, Ordering::Release);
        self.total_ejections.fetch_add(1, Ordering::Relaxed);
        Transition::Ejected { for_ms }
    }

    fn release_probe(&self) {
        let _ = self
            .probes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1));
    }

    fn record_latency(&self, micros: u64) {
        let _ = self
            .ewma_connect_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    micros.max(1)
                } else {
                    (old * (100 - EWMA_NEW_SAMPLE_PERCENT) + micros * EWMA_NEW_SAMPLE_PERCENT) / 100
                })
            });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // The lock guards no data: a panic elsewhere cannot leave it invalid.
        self.transition
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One open connection to an endpoint; counted until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
