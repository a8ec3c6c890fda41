//! What the agent knows about services, their endpoints and the workloads
//! on this node, from whichever source (today: the config file).
//!
//! A [`Catalog`] is immutable; a change builds a new one and swaps it in
//! whole, so the accept path reads it without a lock. Live state (breaker
//! phases, in-flight counts, thresholds in use) is carried over from the
//! previous catalog for every service and endpoint that is still there, so
//! a reload neither forgets an ejection nor drops a connection.

mod build;
pub mod capture;
mod labels;
pub mod state;

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use crate::{
    authz::Policy,
    config::{HealthCheck, Mode, OnAgentDown, Panic, PodRef, Protocol},
    lb::Balancer,
    netns::Netns,
    resilience::{BudgetSettings, EndpointState, OutlierSettings, ServiceState, Thresholds},
    telemetry::MetricsCache,
    tls::Identity,
};

/// Locality tiers of an endpoint seen from this node: 0 this node, 1 this
/// zone, 2 anywhere.
pub const TIER_ANYWHERE: u8 = 2;

/// One snapshot of services and workloads.
#[derive(Debug, Default)]
pub struct Catalog {
    /// This node's name.
    pub node: String,
    /// Peer agents' inbound addresses, by their node's name.
    peers: HashMap<String, SocketAddr>,
    services: HashMap<SocketAddr, Arc<Service>>,
    workloads_by_cgroup: HashMap<u64, Arc<Workload>>,
    workloads: Vec<Arc<Workload>>,
    /// What peer agents may ask the inbound listener for: endpoints on this
    /// node that a local workload serves.
    local_targets: HashMap<SocketAddr, Arc<LocalTarget>>,
    /// Workloads whose inbound connections are captured, by CAPTURE key.
    captures: HashMap<SocketAddr, Arc<capture::CaptureTarget>>,
    /// Each captured workload's mode, by its cgroup id (read per same-node
    /// connection, so a lookup rather than a scan).
    inbound_modes: HashMap<u64, capture::InboundMode>,
}

/// An endpoint on this node, as the inbound listener sees it.
#[derive(Debug)]
pub struct LocalTarget {
    pub addr: SocketAddr,
    pub workload: Arc<Workload>,
    /// Every policy that applies: the workload's and those of the services
    /// the endpoint belongs to. All must allow.
    pub policies: Vec<Arc<Policy>>,
    /// The HTTP its services declare for it (`tcp` when none does).
    pub protocol: Protocol,
}

impl LocalTarget {
    /// Whether a request to it must be checked on its own before it
    /// reaches the workload: it speaks HTTP, and its workload has a rate
    /// limit or its policies have request rules. Requests from other
    /// nodes are then served by this node's agent request by request.
    pub fn checks_requests(&self) -> bool {
        self.protocol != Protocol::Tcp
            && (self.workload.rate_limit.is_some()
                || self.policies.iter().any(|p| p.has_request_rules()))
    }
}

/// The identity of a pod on another node, read from the API server the
/// first time a connection goes to it and kept for the pod's life (a pod's
/// service account cannot change). Shared by every catalog that still has
/// the endpoint, so a rebuild does not ask again.
#[derive(Debug)]
pub struct PodIdentity {
    pub pod: PodRef,
    identity: tokio::sync::OnceCell<Identity>,
}

impl PodIdentity {
    pub fn new(pod: PodRef) -> PodIdentity {
        PodIdentity {
            pod,
            identity: tokio::sync::OnceCell::new(),
        }
    }

    /// The identity, once learnt.
    pub fn known(&self) -> Option<&Identity> {
        self.identity.get()
    }

    /// The identity, learnt through `lookup` if not yet known. Concurrent
    /// first connections wait for one lookup; a failed one is tried again
    /// by the next connection.
    pub async fn resolve<F, Fut, E>(&self, lookup: F) -> Result<&Identity, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Identity, E>>,
    {
        self.identity.get_or_try_init(lookup).await
    }
}

/// A meshed service, reached at its virtual address.
#[derive(Debug)]
pub struct Service {
    /// Stable number of the service in the SERVICES map.
    pub id: u32,
    pub name: String,
    pub namespace: String,
    pub vip: SocketAddr,
    pub endpoints: Vec<Endpoint>,
    pub balancer: Balancer,
    pub policy: ServicePolicy,
    pub state: Arc<ServiceState>,
    pub mode: Mode,
    /// What it speaks: its connections or its requests are balanced.
    pub protocol: Protocol,
    /// What connects do while the agent is down (proxy modes only).
    pub on_agent_down: OnAgentDown,
    /// Who may reach this service's endpoints on this node (`authorization`).
    pub authz: Option<Arc<Policy>>,
    /// Metric handles of this service's connections, resolved on first use.
    pub metrics: MetricsCache,
    /// Those of its requests (`protocol: http`), resolved on first use.
    pub requests: std::sync::OnceLock<crate::telemetry::requests::RequestCounters>,
    /// The connections its requests share, per endpoint (none for tcp).
    pub pools: crate::request::Pools,
}

/// One instance of a service.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    pub node: String,
    pub zone: Option<String>,
    pub workload: Option<String>,
    /// Locality tier from this node: 0 same node, 1 same zone, 2 other.
    pub tier: u8,
    pub state: Arc<EndpointState>,
    /// On this node: reached directly.
    pub local: bool,
    /// The identity the endpoint serves as, when known.
    pub identity: Option<Identity>,
    /// Otherwise, the pod whose service account it is (learnt at first use).
    pub pod: Option<Arc<PodIdentity>>,
    /// The inbound listener of the endpoint's node agent, for endpoints on
    /// other nodes whose node is known.
    pub peer: Option<SocketAddr>,
}

/// A service's resolved traffic policy.
#[derive(Debug, Clone)]
pub struct ServicePolicy {
    pub outlier: OutlierSettings,
    pub thresholds: Thresholds,
    pub budget: BudgetSettings,
    pub max_connect_attempts: u32,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connection_duration: Option<Duration>,
    pub panic: Panic,
    pub locality: bool,
    pub health_check: Option<HealthCheck>,
    /// Request timeouts and retries (request services only).
    pub requests: crate::request::RequestPolicy,
}

/// A local workload: a cgroup whose processes the agent meshes.
#[derive(Debug)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// Absolute path of its cgroup.
    pub cgroup: PathBuf,
    /// Kernel id of that cgroup, as the connect hook records it.
    pub cgroup_id: u64,
    pub identity: Identity,
    /// The workload's own authorization policy.
    pub policy: Option<Arc<Policy>>,
    /// Its own network namespace (a pod); none: the agent's.
    pub netns: Option<Arc<Netns>>,
    /// Its `rate_limit`, with the count of requests it refused. Shared
    /// with the catalog before while the limit is the same, so that a
    /// rebuild (a reload, a pod coming or going) does not refill its
    /// buckets.
    pub rate_limit: Option<Arc<WorkloadLimit>>,
}

/// A workload's rate limit. Its buckets start full again when the catalog
/// is rebuilt (a reload, a change in Kubernetes).
#[derive(Debug)]
pub struct WorkloadLimit {
    /// requests_per_second, burst, per_source: what it was made from.
    pub settings: (u32, u32, bool),
    pub limiter: crate::resilience::RateLimiter,
    /// Resolved on first use.
    pub refused: std::sync::OnceLock<prometheus_client::metrics::counter::Counter>,
}

/// Where a configured workload lives on this node, found by the daemon.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Absolute path of its cgroup.
    pub cgroup: PathBuf,
    /// Kernel id of that cgroup.
    pub cgroup_id: u64,
    pub netns: Option<Arc<Netns>>,
}

/// `namespace/name` of a workload, for messages and the audit trail. Pods
/// from Kubernetes are named that way already (`shop/checkout-1`).
pub fn workload_name(namespace: &str, name: &str) -> String {
    match name.strip_prefix(namespace) {
        Some(rest) if rest.starts_with('/') => name.to_owned(),
        _ => format!("{namespace}/{name}"),
    }
}

impl Workload {
    /// `namespace/name`, for messages and the audit trail.
    pub fn qualified_name(&self) -> String {
        workload_name(&self.namespace, &self.name)
    }
}

impl Service {
    /// `namespace/name`, for messages.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Catalog {
    /// The captured workload a connection accepted on a capture listener
    /// with local address `local` was meant for.
    pub fn capture_for(&self, local: SocketAddr) -> Option<&Arc<capture::CaptureTarget>> {
        capture::lookup(&self.captures, local)
    }

    /// Every captured workload's CAPTURE keys.
    pub fn capture_keys(
        &self,
    ) -> impl Iterator<Item = (&SocketAddr, &Arc<capture::CaptureTarget>)> {
        self.captures.iter()
    }

    /// The inbound mode of a local workload.
    pub fn inbound_mode(&self, workload: &Workload) -> capture::InboundMode {
        self.inbound_modes
            .get(&workload.cgroup_id)
            .copied()
            .unwrap_or(capture::InboundMode::Open)
    }

    /// The inbound address of the agent on node `name`, when it is a
    /// known peer.
    pub fn peer_agent(&self, name: &str) -> Option<SocketAddr> {
        self.peers.get(name).copied()
    }

    /// The local endpoint a peer agent may ask for at `addr`.
    pub fn local_target(&self, addr: SocketAddr) -> Option<&Arc<LocalTarget>> {
        self.local_targets.get(&addr)
    }

    /// The service whose virtual address is `vip`.
    pub fn service(&self, vip: SocketAddr) -> Option<&Arc<Service>> {
        self.services.get(&vip)
    }

    /// The workload whose cgroup has id `cgroup_id`.
    pub fn workload_by_cgroup(&self, cgroup_id: u64) -> Option<&Arc<Workload>> {
        self.workloads_by_cgroup.get(&cgroup_id)
    }

    /// The workload a caller belongs to: its own cgroup's, else the
    /// nearest of its ancestors' (a pod's, for a process in one of the
    /// pod's container cgroups, as the kubelet lays them out). A restarted
    /// container gets a new cgroup but keeps its pod, and so its identity.
    pub fn workload_of_caller(&self, cgroup_id: u64, ancestors: &[u64]) -> Option<&Arc<Workload>> {
        self.workload_by_cgroup(cgroup_id).or_else(|| {
            ancestors
                .iter()
                .rev()
                .filter(|&&id| id != 0)
                .find_map(|id| self.workloads_by_cgroup.get(id))
        })
    }

    /// Every local workload, in config order.
    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    /// Every service.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }
}

#[cfg(test)]
mod tests;
