//! What the agent knows about services, their endpoints and the workloads
//! on this node, from whichever source (today: the config file).
//!
//! A [`Catalog`] is immutable; a change builds a new one and swaps it in
//! whole, so the accept path reads it without a lock.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use sluice_maps::{ServiceKey, ServiceValue};

use crate::{config::Config, lb::RoundRobin, redirect::records::key_addr};

/// One snapshot of services and workloads.
#[derive(Debug, Default)]
pub struct Catalog {
    services: HashMap<SocketAddr, Arc<Service>>,
    workloads_by_cgroup: HashMap<u64, Arc<Workload>>,
    workloads: Vec<Arc<Workload>>,
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
    pub balancer: RoundRobin,
}

/// One instance of a service.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    pub node: String,
    pub workload: Option<String>,
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
}

impl Service {
    /// `namespace/name`, for messages.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The endpoint for the next connection.
    pub fn pick(&self) -> Option<&Endpoint> {
        self.balancer
            .pick(self.endpoints.len())
            .map(|i| &self.endpoints[i])
    }
}

impl Catalog {
    /// Builds the catalog from a validated config. `workload_cgroups` gives
    /// each workload's cgroup path and id, in config order.
    pub fn from_config(config: &Config, workload_cgroups: &[(PathBuf, u64)]) -> Catalog {
        let node = &config.node.name.value;
        let services = config
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let vip = SocketAddr::new(s.address.value, s.port.value);
                let service = Service {
                    id: i as u32 + 1,
                    name: s.name.value.clone(),
                    namespace: s.namespace.clone(),
                    vip,
                    endpoints: s
                        .endpoints
                        .iter()
                        .map(|e| Endpoint {
                            addr: SocketAddr::new(e.address.value, e.port.value),
                            weight: e.weight.value,
                            node: e.node.clone().unwrap_or_else(|| node.clone()),
                            workload: e.workload.as_ref().map(|w| w.value.clone()),
                        })
                        .collect(),
                    balancer: RoundRobin::default(),
                };
                (vip, Arc::new(service))
            })
            .collect();
        let workloads: Vec<Arc<Workload>> = config
            .workloads
            .iter()
            .zip(workload_cgroups)
            .map(|(w, (path, id))| {
                Arc::new(Workload {
                    name: w.name.value.clone(),
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.clone(),
                    cgroup: path.clone(),
                    cgroup_id: *id,
                })
            })
            .collect();
        let workloads_by_cgroup = workloads.iter().map(|w| (w.cgroup_id, w.clone())).collect();
        Catalog {
            services,
            workloads_by_cgroup,
            workloads,
        }
    }

    /// The service whose virtual address is `vip`.
    pub fn service(&self, vip: SocketAddr) -> Option<&Arc<Service>> {
        self.services.get(&vip)
    }

    /// The workload whose cgroup has id `cgroup_id`.
    pub fn workload_by_cgroup(&self, cgroup_id: u64) -> Option<&Arc<Workload>> {
        self.workloads_by_cgroup.get(&cgroup_id)
    }

    /// Every local workload, in config order.
    pub fn workloads(&self) -> &[Arc<Workload>] {
        &self.workloads
    }

    /// Every service.
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }

    /// The SERVICES map content this catalog calls for.
    pub fn service_map(&self) -> HashMap<ServiceKey, ServiceValue> {
        self.services
            .values()
            .filter(|s| matches!(s.vip.ip(), IpAddr::V4(_)))
            .map(|s| {
                (
                    ServiceKey {
                        addr: key_addr(s.vip.ip()),
                        port: s.vip.port(),
                        _pad: 0,
                    },
                    ServiceValue { id: s.id, flags: 0 },
                )
            })
            .collect()
    }
}
