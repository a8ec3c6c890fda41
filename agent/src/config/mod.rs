//! The agent's configuration file, modelled with serde.
//!
//! One [`Config`] is read and validated once ([`Config::load`]) and then
//! passed down. Unknown fields are rejected, defaults live in the `Default`
//! impls and `default_*` functions beside each section, and
//! [`Config::validate`] reports every problem at once, each with the file,
//! line and field it is about. `config/REFERENCE.md` is the reference; a
//! test checks that it names every field.
//!
//! One file per section of the file: [`node`](NodeConfig), `agent`
//! ([`AgentConfig`], and the [`Listener`]s it opens), `workloads`,
//! `services` and their `endpoints`, [`mesh`], `kubernetes`, `audit`, and
//! [`policy`] (a service's traffic policy). Each checks its own section;
//! `validate.rs` runs them in file order, `load.rs` reads and parses the
//! file, `error.rs` says what went wrong. A second source of services and
//! workloads (Kubernetes) is read beside the file's through [`Entries`],
//! and checked by the same rules.

mod agent;
mod audit;
mod duration;
mod endpoint;
mod entries;
mod error;
mod kubernetes;
mod listeners;
mod load;
pub mod mesh;
mod node;
pub mod policy;
pub mod requests;
mod restart;
mod service;
mod spanned;
pub mod tunnels;
mod validate;
mod workload;

use std::path::PathBuf;

use serde::Deserialize;

pub use agent::AgentConfig;
pub use audit::{AuditConfig, AuditOutput};
pub use duration::HumanDuration;
pub use endpoint::{EndpointSpec, PodRef};
pub use entries::{Entries, Origin};
pub use error::{ConfigError, Problem, Problems};
pub use kubernetes::{KubeMode, KubernetesConfig};
pub use listeners::Listener;
pub use mesh::{Authorization, CertificateSource, Decision, MeshConfig, Mode, PeerNode};
pub use node::NodeConfig;
pub use policy::{
    CircuitBreakers, HashKey, HealthCheck, HttpCheck, LoadBalancer, OnAgentDown, OutlierDetection,
    Panic, Policy, Retries, Timeouts,
};
pub use requests::{Fallback, GrpcCode, RateLimit, Requests};
pub use restart::RESTART_ONLY;
pub use service::{Protocol, ServiceSpec, fallback_of};
pub use spanned::Spanned;
pub use workload::WorkloadSpec;

/// Largest sum of endpoint weights weighted_round_robin accepts: its cycle
/// is precomputed, one slot per unit of weight.
pub const MAX_WEIGHT_SUM: u64 = 1 << 20;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This machine.
    pub node: NodeConfig,
    /// How the agent itself runs.
    #[serde(default)]
    pub agent: AgentConfig,
    /// Processes the agent meshes, each in its own cgroup.
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// Services reached through their virtual address.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Mutual TLS between agents.
    #[serde(default)]
    pub mesh: MeshConfig,
    /// Other nodes whose agents serve endpoints of these services.
    #[serde(default)]
    pub nodes: Vec<PeerNode>,
    /// Discover services, endpoints and this node's pods from the
    /// Kubernetes API server, in addition to the ones listed here.
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
    /// The audit trail: denials, and optionally every closed connection.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Where this config was read from; used in messages.
    #[serde(skip)]
    pub source: PathBuf,
}

impl Config {
    /// The workload named `name`, if the config defines it.
    pub fn workload(&self, name: &str) -> Option<&WorkloadSpec> {
        self.workloads.iter().find(|w| w.name.value == name)
    }
}

/// A value the file did not set: its location is unknown.
pub(crate) fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned {
        value,
        referenced: serde_saphyr::Location::UNKNOWN,
    }
}

#[cfg(test)]
mod tests;
