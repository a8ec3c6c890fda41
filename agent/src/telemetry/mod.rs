//! What the agent tells operators, as the data plane records it: metric
//! families and their handles, the counters read at scrape time, rate-limited
//! warnings and the live redirect trace. A leaf: it knows no catalog or
//! listener; those hand it labels and counts.

pub mod log_limit;
pub mod metrics;
pub mod requests;
pub mod stats;
pub mod trace;
pub mod tunnels;

pub use log_limit::LogLimiter;
pub use metrics::{CloseReason, ConnectionMetrics, Metrics, MetricsCache};
pub use stats::{ByteCounters, InboundStats, Refusal};
pub use trace::TraceLog;
pub use tunnels::TunnelMetrics;
