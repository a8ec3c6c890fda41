//! What the agent knows about services, their endpoints and the workloads
//! on this node, from whichever source (today: the config file).
//!
//! A [`Catalog`] is immutable; a change builds a new one and swaps it in
//! whole, so the accept path reads it without a lock. Live state (breaker
//! phases, in-flight counts, thresholds in use) is carried over from the
//! previous catalog for every service and endpoint that is still there, so
//! a reload neither forgets an ejection nor drops a connection.

pub mod capture;
mod labels;

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use crate::{
    authz::Policy,
    config::{
        Config, HealthCheck, Mode, OnAgentDown, Panic, PodRef, ServiceSpec,
        policy::DEFAULT_IDLE_TIMEOUT,
    },
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
    pub async fn resolve<F, Fut>(&self, lookup: F) -> Result<&Identity, String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Identity, String>>,
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
    /// What connects do while the agent is down (proxy modes only).
    pub on_agent_down: OnAgentDown,
    /// Who may reach this service's endpoints on this node (`authorization`).
    pub authz: Option<Arc<Policy>>,
    /// Metric handles of this service's connections, resolved on first use.
    pub metrics: MetricsCache,
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

impl ServicePolicy {
    fn from_spec(s: &ServiceSpec, default_connect_timeout: Duration) -> ServicePolicy {
        let od = &s.outlier_detection;
        let cb = &s.circuit_breakers;
        let ms = |d: Duration| d.as_millis() as u64;
        ServicePolicy {
            outlier: OutlierSettings {
                consecutive_failures: od.consecutive_failures,
                base_ejection: ms(od.base_ejection_time.value.0),
                max_ejection: ms(od.max_ejection_time.value.0),
                max_ejection_percent: od.max_ejection_percent.value,
                half_open_max: od.half_open_max_connections.value,
            },
            thresholds: Thresholds {
                max_connections: cb.max_connections.value,
                max_pending_connects: cb.max_pending_connects.value,
                max_retries: cb.max_retries.value,
            },
            budget: BudgetSettings {
                percent: s.retries.budget_percent.value,
                min_per_second: s.retries.min_retries_per_second,
            },
            max_connect_attempts: s.retries.max_connect_attempts.value,
            connect_timeout: s
                .timeouts
                .connect
                .as_ref()
                .map_or(default_connect_timeout, |d| d.value.0),
            idle_timeout: s
                .timeouts
                .idle
                .as_ref()
                .map_or(DEFAULT_IDLE_TIMEOUT, |d| d.value.0),
            max_connection_duration: s
                .timeouts
                .max_connection_duration
                .as_ref()
                .map(|d| d.value.0),
            panic: s.panic,
            locality: s.load_balancer.locality,
            health_check: s.health_check.clone(),
        }
    }
}

/// Endpoints on this node served by a local workload, with the policies
/// that guard them.
fn local_targets(
    services: &[&Arc<Service>],
    workloads: &[Arc<Workload>],
) -> HashMap<SocketAddr, Arc<LocalTarget>> {
    let mut targets: HashMap<SocketAddr, LocalTarget> = HashMap::new();
    for s in services {
        for e in s.endpoints.iter().filter(|e| e.local) {
            let Some(w) = e
                .workload
                .as_ref()
                .and_then(|name| workloads.iter().find(|x| x.name == *name))
            else {
                continue;
            };
            let target = targets.entry(e.addr).or_insert_with(|| LocalTarget {
                addr: e.addr,
                workload: w.clone(),
                policies: w.policy.iter().cloned().collect(),
            });
            if let Some(p) = &s.authz {
                target.policies.push(p.clone());
            }
        }
    }
    targets
        .into_iter()
        .map(|(addr, t)| (addr, Arc::new(t)))
        .collect()
}

/// What building one service needs to know of the node and the mesh.
struct BuildContext<'a> {
    node: &'a str,
    node_zone: Option<&'a str>,
    trust_domain: &'a str,
    peers: HashMap<&'a str, SocketAddr>,
    connect_timeout: Duration,
    workloads: &'a [Arc<Workload>],
}

impl<'a> BuildContext<'a> {
    fn new(config: &'a Config, workloads: &'a [Arc<Workload>]) -> BuildContext<'a> {
        BuildContext {
            node: &config.node.name.value,
            node_zone: config.node.zone.as_deref(),
            trust_domain: &config.mesh.trust_domain.value,
            peers: config
                .nodes
                .iter()
                .map(|n| {
                    (
                        n.name.value.as_str(),
                        SocketAddr::new(n.address, config.agent.inbound_port),
                    )
                })
                .collect(),
            connect_timeout: config.agent.connect_timeout.0,
            workloads,
        }
    }

    /// One service, with the state of `old` (the same service in the
    /// running catalog) carried over for it and its endpoints still there.
    fn service(&self, s: &ServiceSpec, id: u32, old: Option<&Arc<Service>>) -> Service {
        let (node, node_zone, td) = (self.node, self.node_zone, self.trust_domain);
        let workload_named = |name: &str| self.workloads.iter().find(|w| w.name == name);
        let vip = SocketAddr::new(s.address.value, s.port.value);
        let endpoints: Vec<Endpoint> = s
            .endpoints
            .iter()
            .map(|e| {
                let addr = SocketAddr::new(e.address.value, e.port.value);
                let on_node = e.node.as_deref().unwrap_or(node);
                let zone = e.zone.clone().or_else(|| {
                    (on_node == node)
                        .then(|| node_zone.map(str::to_owned))
                        .flatten()
                });
                let tier = if on_node == node {
                    0
                } else if zone.is_some() && zone.as_deref() == node_zone {
                    1
                } else {
                    TIER_ANYWHERE
                };
                let old_endpoint = old.and_then(|o| o.endpoints.iter().find(|oe| oe.addr == addr));
                let state = old_endpoint.map_or_else(Default::default, |oe| oe.state.clone());
                let local = on_node == node;
                let workload = e.workload.as_ref().map(|w| w.value.clone());
                let identity = match (&workload, &e.service_account) {
                    (Some(w), _) if local => workload_named(w).map(|w| w.identity.clone()),
                    (_, Some(sa)) => Some(Identity::new(td, &s.namespace, sa)),
                    _ => None,
                };
                let pod = match (&identity, &e.pod) {
                    (None, Some(pod)) if !local => Some(
                        old_endpoint
                            .and_then(|oe| oe.pod.as_ref())
                            .filter(|known| known.pod == *pod)
                            .cloned()
                            .unwrap_or_else(|| Arc::new(PodIdentity::new(pod.clone()))),
                    ),
                    _ => None,
                };
                Endpoint {
                    addr,
                    weight: e.weight.value,
                    node: on_node.to_owned(),
                    zone,
                    workload,
                    tier,
                    state,
                    local,
                    identity,
                    pod,
                    peer: (!local).then(|| self.peers.get(on_node).copied()).flatten(),
                }
            })
            .collect();
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let names: Vec<String> = endpoints.iter().map(|e| e.addr.to_string()).collect();
        let lb = &s.load_balancer;
        Service {
            id,
            name: s.name.value.clone(),
            namespace: s.namespace.clone(),
            vip,
            balancer: Balancer::new(lb.policy.value, lb.ewma, lb.hash_key, &weights, &names),
            endpoints,
            policy: ServicePolicy::from_spec(s, self.connect_timeout),
            state: old.map_or_else(Default::default, |o| o.state.clone()),
            mode: s.mode,
            on_agent_down: s
                .on_agent_down
                .as_ref()
                .map_or(OnAgentDown::default_for(s.mode), |o| o.value),
            authz: s.authorization.as_ref().map(|a| {
                Arc::new(Policy::new(
                    format!("service {}/{}", s.namespace, s.name.value),
                    a,
                ))
            }),
            metrics: MetricsCache::default(),
        }
    }
}

impl Catalog {
    /// Builds the catalog from a validated config. `placements` gives each
    /// workload's cgroup and namespace, in config order. State is carried
    /// over from `previous` for services and endpoints still present.
    pub fn from_config(
        config: &Config,
        placements: &[Placement],
        previous: Option<&Catalog>,
    ) -> Catalog {
        let td = &config.mesh.trust_domain.value;
        let workloads: Vec<Arc<Workload>> = config
            .workloads
            .iter()
            .zip(placements)
            .map(|(w, place)| {
                Arc::new(Workload {
                    name: w.name.value.clone(),
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.clone(),
                    cgroup: place.cgroup.clone(),
                    cgroup_id: place.cgroup_id,
                    netns: place.netns.clone(),
                    identity: Identity::new(td, &w.namespace, &w.service_account),
                    policy: w.authorization.as_ref().map(|a| {
                        Arc::new(Policy::new(
                            format!("workload {}", workload_name(&w.namespace, &w.name.value)),
                            a,
                        ))
                    }),
                })
            })
            .collect();
        let ctx = BuildContext::new(config, &workloads);
        let old_services = previous.map(Catalog::services_by_name).unwrap_or_default();
        let services = config
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let old = old_services.get(&(s.namespace.as_str(), s.name.value.as_str()));
                let service = ctx.service(s, i as u32 + 1, old.copied());
                (service.vip, Arc::new(service))
            })
            .collect();
        Catalog::assemble(config.node.name.value.clone(), services, workloads)
    }

    /// The running catalog with `specs` built anew (new services, or ones
    /// replacing the service of the same namespace and name) and `removed`
    /// dropped; every other service is the very same as here, state and
    /// all, and so are the workloads. `config` gives the node and mesh
    /// settings and must have validated `specs` (with this catalog's
    /// workloads). What a watch event changes is applied this way, without
    /// building the thousands of services it did not touch.
    pub fn with_services(
        &self,
        config: &Config,
        specs: &[&ServiceSpec],
        removed: &[(String, String)],
    ) -> Catalog {
        let ctx = BuildContext::new(config, &self.workloads);
        let by_name = self.services_by_name();
        let mut services = self.services.clone();
        let mut next_id = self.services.values().map(|s| s.id).max().unwrap_or(0) + 1;
        let forget = |ns: &str, name: &str, services: &mut HashMap<SocketAddr, Arc<Service>>| {
            if let Some(old) = by_name.get(&(ns, name)) {
                services.remove(&old.vip);
            }
        };
        for (ns, name) in removed {
            forget(ns, name, &mut services);
        }
        for s in specs {
            forget(&s.namespace, &s.name.value, &mut services);
        }
        for s in specs {
            let old = by_name
                .get(&(s.namespace.as_str(), s.name.value.as_str()))
                .copied();
            let id = old.map_or_else(
                || {
                    next_id += 1;
                    next_id - 1
                },
                |o| o.id,
            );
            let service = ctx.service(s, id, old);
            services.insert(service.vip, Arc::new(service));
        }
        Catalog::assemble(self.node.clone(), services, self.workloads.clone())
    }

    /// The services by (namespace, name).
    fn services_by_name(&self) -> HashMap<(&str, &str), &Arc<Service>> {
        self.services
            .values()
            .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
            .collect()
    }

    /// The indexes over services and workloads.
    fn assemble(
        node: String,
        services: HashMap<SocketAddr, Arc<Service>>,
        workloads: Vec<Arc<Workload>>,
    ) -> Catalog {
        let mut ordered: Vec<&Arc<Service>> = services.values().collect();
        ordered.sort_by_key(|s| s.id);
        let workloads_by_cgroup = workloads.iter().map(|w| (w.cgroup_id, w.clone())).collect();
        let local_targets = local_targets(&ordered, &workloads);
        let captures = capture::targets(&ordered, &workloads);
        let inbound_modes = captures
            .values()
            .map(|t| (t.workload.cgroup_id, t.mode))
            .collect();
        Catalog {
            node,
            services,
            workloads_by_cgroup,
            workloads,
            local_targets,
            captures,
            inbound_modes,
        }
    }

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
