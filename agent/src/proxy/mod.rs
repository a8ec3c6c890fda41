//! The connection handlers: each takes a connection a listener accepted
//! ([`crate::accept`]), routes it ([`crate::route`]), connects upstream
//! ([`crate::connect`]) and carries the bytes ([`crate::carry`]), counting
//! it in metrics and the live-connections registry.
//!
//! - [`outbound`]: connections the connect hook redirected from a workload.
//! - [`inbound`]: mTLS connections from peer agents to local workloads.
//! - [`capture`]: connections that arrived at a captured workload's own
//!   address from outside the mesh.
//!
//! Each connected one lives as a [`lifecycle::ConnectionLife`]: listed in
//! [`Connections`] for `sluice conns`, counted in metrics, audited at its
//! close. In an upgrade the plaintext ones move, open, to the next agent
//! ([`moved`]).

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;

use crate::{
    audit::Audit,
    catalog::Catalog,
    telemetry::{InboundStats, LogLimiter, Metrics},
    tls::TlsContext,
};

pub mod capture;
pub mod connections;
pub mod inbound;
mod l7;
pub mod lifecycle;
pub mod moved;
pub mod outbound;
pub mod paused;
pub mod tunnels;
mod upstream;

pub use connections::{Connections, LiveConnection};
pub use outbound::{OutboundContext, OutboundListener};

/// What every handler reads, built once at start and shared by the
/// listeners, the admin API and the metrics collector. Only the catalog
/// changes, swapped whole per generation, so a reader never takes a lock.
pub struct ProxyInputs {
    pub catalog: Arc<ArcSwap<Catalog>>,
    pub tls: Arc<TlsContext>,
    pub metrics: Arc<Metrics>,
    pub connections: Arc<Connections>,
    pub inbound_stats: Arc<InboundStats>,
    pub audit: Arc<Audit>,
    /// Refusals are logged at most once per reason per interval.
    pub refusals: Arc<LogLimiter>,
    /// The mark on every socket the agent makes, which the hooks let pass.
    pub mark: u32,
    pub connect_timeout: Duration,
    /// The outbound tunnel pools, when `mesh.tunnels.enabled` (set once,
    /// at the start; a moved tunnelled connection is opened again on them).
    pub tunnels: std::sync::OnceLock<Arc<tunnels::Tunnels>>,
    /// Tunnelled connections a peer agent paused for its upgrade, waiting
    /// for its successor.
    pub parked: paused::Parked,
}
