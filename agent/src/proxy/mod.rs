//! The connection handlers: each takes a connection a listener accepted
//! ([`crate::accept`]), routes it ([`crate::route`]), connects upstream
//! ([`crate::connect`]) and carries the bytes ([`crate::carry`]), counting
//! it in metrics and the live-connections registry.
//!
//! - [`outbound`]: connections the connect hook redirected from a workload.
//! - [`inbound`]: mTLS connections from peer agents to local workloads.
//! - [`capture`]: connections that arrived at a captured workload's own
//!   address from outside the mesh.

pub mod capture;
pub mod connections;
pub mod inbound;
pub mod outbound;

pub use connections::{Connections, LiveConnection};
pub use outbound::{OutboundContext, OutboundListener};
