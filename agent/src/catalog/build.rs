//! Building a catalog: from the whole validated entries of both sources
//! (carrying live state over from the previous catalog for what is still
//! there), or by rebuilding only the services a watch event changed.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderName, StatusCode};

use crate::{
    authz::Policy,
    config::{
        Config, Entries, HealthCheck, OnAgentDown, Origin, Protocol, Requests, ServiceSpec,
        fallback_of, policy::DEFAULT_IDLE_TIMEOUT,
    },
    lb::Balancer,
    request::{FallbackTo, Pools, RequestPolicy},
    resilience::{BudgetSettings, OutlierSettings, RateLimiter, Thresholds},
    telemetry::MetricsCache,
    tls::Identity,
};

use super::*;

impl ServicePolicy {
    fn from_spec(
        s: &ServiceSpec,
        health_check: Option<&HealthCheck>,
        default_connect_timeout: Duration,
    ) -> ServicePolicy {
        let od = &s.outlier_detection;
        let cb = &s.circuit_breakers;
        let ms = |d: Duration| d.as_millis() as u64;
        ServicePolicy {
            outlier: OutlierSettings {
                consecutive_failures: od.consecutive_failures,
                base_ejection: ms(od.base_ejection_time.0),
                max_ejection: ms(od.max_ejection_time.0),
                max_ejection_percent: *od.max_ejection_percent.get(),
                half_open_max: *od.half_open_max_connections.get(),
            },
            thresholds: Thresholds {
                max_connections: *cb.max_connections.get(),
                max_pending_connects: *cb.max_pending_connects.get(),
                max_retries: *cb.max_retries.get(),
                max_pending_requests: *cb.max_pending_requests.get(),
            },
            budget: BudgetSettings {
                percent: *s.retries.budget_percent.get(),
                min_per_second: s.retries.min_retries_per_second,
            },
            max_connect_attempts: *s.retries.max_connect_attempts.get(),
            connect_timeout: s
                .timeouts
                .connect
                .as_ref()
                .map_or(default_connect_timeout, |d| d.0),
            idle_timeout: s
                .timeouts
                .idle
                .as_ref()
                .map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
            max_connection_duration: s.timeouts.max_connection_duration.as_ref().map(|d| d.0),
            panic: s.panic,
            locality: s.load_balancer.locality,
            health_check: health_check.cloned(),
            requests: s
                .requests
                .as_ref()
                .map(|r| request_policy(s, r))
                .unwrap_or_default(),
        }
    }
}

/// A `requests` block of service `s` as the request path reads it.
fn request_policy(s: &ServiceSpec, r: &Requests) -> RequestPolicy {
    let fallback = r.fallback.as_ref().map(|f| match (&f.service, &f.status) {
        (Some(named), _) => {
            let (namespace, name) = fallback_of(s, named);
            FallbackTo::Service {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }
        }
        (None, status) => FallbackTo::Answer {
            status: status
                .as_ref()
                .and_then(|s| StatusCode::from_u16(*s.get()).ok())
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            body: Bytes::from(f.body.clone()),
        },
    });
    RequestPolicy {
        timeout: r.timeout.as_ref().map(|d| d.0),
        max_attempts: *r.max_attempts.get(),
        idempotency_header: HeaderName::from_bytes(r.idempotency_header.as_bytes())
            .expect("validated"),
        max_replay_bytes: u64::from(*r.max_replay_bytes.get()),
        max_requests_per_connection: r.max_requests_per_connection.as_ref().map(|p| *p.get()),
        grpc_retry_on: r
            .grpc_retry_on
            .iter()
            .fold(0, |bits, c| bits | 1 << *c as u32),
        fallback,
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
                protocol: Protocol::Tcp,
            });
            if let Some(p) = &s.authz {
                target.policies.push(p.clone());
            }
            if s.protocol != Protocol::Tcp {
                target.protocol = s.protocol;
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
    fn new(entries: &Entries<'a>, workloads: &'a [Arc<Workload>]) -> BuildContext<'a> {
        let config = entries.file;
        BuildContext {
            node: config.node.name.get(),
            node_zone: config.node.zone.as_deref(),
            trust_domain: config.mesh.trust_domain.get(),
            peers: entries
                .nodes()
                .iter()
                .map(|n| {
                    (
                        n.name.as_str(),
                        SocketAddr::new(n.address, config.agent.inbound_port),
                    )
                })
                .collect(),
            connect_timeout: config.agent.connect_timeout.0,
            workloads,
        }
    }

    /// The peer agents' addresses by node name, for the catalog to keep.
    fn owned_peers(&self) -> HashMap<String, SocketAddr> {
        let peers = self.peers.iter();
        peers
            .map(|(name, addr)| (name.to_string(), *addr))
            .collect()
    }

    /// One service, with the state of `old` (the same service in the
    /// running catalog) carried over for it and its endpoints still there.
    /// An endpoint served by a workload the catalog does not have (a pod
    /// that could not be placed) is left out.
    fn service(
        &self,
        s: &ServiceSpec,
        health_check: Option<&HealthCheck>,
        id: u32,
        old: Option<&Arc<Service>>,
    ) -> Service {
        let (node, node_zone, td) = (self.node, self.node_zone, self.trust_domain);
        let workload_named = |name: &str| self.workloads.iter().find(|w| w.name == name);
        let vip = SocketAddr::new(*s.address, *s.port);
        let endpoints: Vec<Endpoint> = s
            .endpoints
            .iter()
            .filter(|e| {
                e.workload
                    .as_ref()
                    .is_none_or(|w| workload_named(w).is_some())
            })
            .map(|e| {
                let addr = SocketAddr::new(*e.address, *e.port);
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
                let workload = e.workload.as_ref().map(|w| w.get().clone());
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
                    weight: *e.weight.get(),
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
        let endpoint_count = endpoints.len();
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let names: Vec<String> = endpoints.iter().map(|e| e.addr.to_string()).collect();
        let lb = &s.load_balancer;
        Service {
            id,
            name: s.name.get().clone(),
            namespace: s.namespace.clone(),
            vip,
            balancer: Balancer::new(*lb.policy.get(), lb.ewma, lb.hash_key, &weights, &names),
            endpoints,
            policy: ServicePolicy::from_spec(s, health_check, self.connect_timeout),
            state: old.map_or_else(Default::default, |o| o.state.clone()),
            mode: s.mode,
            protocol: s.protocol(),
            on_agent_down: s
                .on_agent_down
                .as_ref()
                .map_or(OnAgentDown::default_for(s.mode), |o| *o.get()),
            authz: s.authorization.as_ref().map(|a| {
                Arc::new(Policy::new(
                    format!("service {}/{}", s.namespace, s.name.get()),
                    a,
                ))
            }),
            metrics: MetricsCache::default(),
            requests: Default::default(),
            pools: match s.protocol() {
                Protocol::Tcp => Pools::default(),
                _ => Pools::new(endpoint_count),
            },
        }
    }
}

impl Catalog {
    /// Builds the catalog from a validated config file alone (the start,
    /// and tests): [`Catalog::build`] over its entries.
    pub fn from_config(
        config: &Config,
        placements: &[Placement],
        previous: Option<&Catalog>,
    ) -> Catalog {
        Catalog::build(&Entries::file(config), placements, previous)
    }

    /// Builds the catalog from validated entries (the file's, and
    /// discovery's beside them). `placements` gives each workload's cgroup
    /// and namespace, in the entries' order. State is carried over from
    /// `previous` for services and endpoints still present.
    pub fn build(
        entries: &Entries,
        placements: &[Placement],
        previous: Option<&Catalog>,
    ) -> Catalog {
        let config = entries.file;
        let td = config.mesh.trust_domain.get();
        let workloads: Vec<Arc<Workload>> = entries
            .workloads()
            .iter()
            .zip(placements)
            .map(|(w, place)| {
                Arc::new(Workload {
                    name: w.name.get().clone(),
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.clone(),
                    cgroup: place.cgroup.clone(),
                    cgroup_id: place.cgroup_id,
                    netns: place.netns.clone(),
                    identity: Identity::new(td, &w.namespace, &w.service_account),
                    rate_limit: w.rate_limit.as_ref().map(|r| {
                        let settings = (*r.requests_per_second.get(), r.burst(), r.per_source);
                        let kept = previous
                            .and_then(|p| {
                                p.workloads()
                                    .iter()
                                    .find(|o| o.name == *w.name.get() && o.namespace == w.namespace)
                            })
                            .and_then(|o| o.rate_limit.clone())
                            .filter(|l| l.settings == settings);
                        kept.unwrap_or_else(|| {
                            let (per_second, burst, per_source) = settings;
                            Arc::new(WorkloadLimit {
                                settings,
                                limiter: RateLimiter::new(per_second, burst, per_source),
                                refused: Default::default(),
                            })
                        })
                    }),
                    policy: w.authorization.as_ref().map(|a| {
                        Arc::new(Policy::new(
                            format!("workload {}", workload_name(&w.namespace, w.name.get())),
                            a,
                        ))
                    }),
                })
            })
            .collect();
        let ctx = BuildContext::new(entries, &workloads);
        let old_services = previous.map(Catalog::services_by_name).unwrap_or_default();
        let services = entries
            .services()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let old = old_services.get(&(s.namespace.as_str(), s.name.as_str()));
                let health_check = entries.health_check(entries.service_origin(i), s);
                let service = ctx.service(s, health_check, i as u32 + 1, old.copied());
                (service.vip, Arc::new(service))
            })
            .collect();
        let peers = ctx.owned_peers();
        Catalog::assemble(config.node.name.get().clone(), peers, services, workloads)
    }

    /// The running catalog with the second source's services of `changed`
    /// built anew (new services, or ones replacing the service of the same
    /// namespace and name) and `removed` dropped; every other service is
    /// the very same as here, state and all, and so are the workloads.
    /// `changed` gives the node and mesh settings too, and must have been
    /// validated (with this catalog's workloads). What a watch event
    /// changes is applied this way, without building the thousands of
    /// services it did not touch.
    pub fn with_services(&self, changed: &Entries, removed: &[(String, String)]) -> Catalog {
        let specs = changed.second_services();
        let ctx = BuildContext::new(changed, &self.workloads);
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
            forget(&s.namespace, s.name.get(), &mut services);
        }
        for s in specs {
            let old = by_name
                .get(&(s.namespace.as_str(), s.name.as_str()))
                .copied();
            let id = old.map_or_else(
                || {
                    next_id += 1;
                    next_id - 1
                },
                |o| o.id,
            );
            let health_check = changed.health_check(Origin::Second, s);
            let service = ctx.service(s, health_check, id, old);
            services.insert(service.vip, Arc::new(service));
        }
        let peers = ctx.owned_peers();
        Catalog::assemble(self.node.clone(), peers, services, self.workloads.clone())
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
        peers: HashMap<String, SocketAddr>,
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
            peers,
            services,
            workloads_by_cgroup,
            workloads,
            local_targets,
            captures,
            inbound_modes,
        }
    }
}
