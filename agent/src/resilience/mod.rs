//! Per-endpoint and per-service state that decides eligibility: outlier
//! detection (closed / open / half-open), concurrency thresholds and the
//! retry budget. Pure state machines on the [`crate::clock`]; [`crate::route`]
//! reads them to choose, metrics and the CLI to show them.

pub mod endpoint;
pub mod rate;
pub mod service;

pub use endpoint::{
    Admission, EndpointSnapshot, EndpointState, InFlight, Outcome, OutlierSettings, Phase,
    Transition,
};
pub use rate::RateLimiter;
pub use service::{BudgetSettings, Overflow, RetryDenied, ServiceState, Slot, Thresholds};
