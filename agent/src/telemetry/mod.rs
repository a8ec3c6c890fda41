//! What the agent tells operators: Prometheus metrics and the registry of
//! live connections behind `sluice conns`.

pub mod connections;
pub mod log_limit;
pub mod metrics;
pub mod trace;

pub use connections::{Connections, LiveConnection};
pub use log_limit::LogLimiter;
pub use metrics::{CloseReason, ConnectionMetrics, Metrics, MetricsCache, StateCollector};
pub use trace::TraceLog;
