//! The rebuild loop: after each burst of watch events, what the
//! reflectors hold is translated again (only the Services whose inputs
//! changed: [`Translator`]) together with the other agents, found in
//! their own EndpointSlices, and the SluicePolicies in force, and handed
//! to the daemon.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Api, Client, runtime::watcher};
use log::{info, warn};
use tokio::sync::{Notify, watch};

use super::{
    NodeView, Objects, Translated,
    incremental::Translator,
    locate::Locator,
    policy::{self, Accepted, PolicyStatus, SluicePolicy},
    reflect::{Reflected, reflect},
    translate::{Settings, slice_service},
};
use crate::{
    config::{KubeMode, PeerNode},
    drain::DrainWatch,
};

/// Coalesces a burst of watch events into one catalog update. Short: a
/// change that touches a few services is applied in a few milliseconds
/// (`cargo bench --bench catalog`), and events that come while one is
/// applied are taken together by the next.
const SETTLE: Duration = Duration::from_millis(5);

/// The reflectors of every resource discovery reads.
pub(super) struct Watched {
    services: Reflected<Service>,
    slices: Reflected<EndpointSlice>,
    namespaces: Reflected<Namespace>,
    /// This node's only.
    pods: Reflected<Pod>,
    policies: Reflected<SluicePolicy>,
}

impl Watched {
    /// Starts a reflector per resource; each wakes `changed`.
    pub(super) fn start(
        client: &Client,
        node: &str,
        changed: &Arc<Notify>,
        drain: &DrainWatch,
    ) -> Watched {
        let every = watcher::Config::default;
        Watched {
            services: reflect(Api::all(client.clone()), every(), changed, drain),
            slices: reflect(Api::all(client.clone()), every(), changed, drain),
            namespaces: reflect(Api::all(client.clone()), every(), changed, drain),
            pods: reflect(
                Api::all(client.clone()),
                every().fields(&format!("spec.nodeName={node}")),
                changed,
                drain,
            ),
            policies: reflect(Api::all(client.clone()), every(), changed, drain),
        }
    }

    /// Every resource has been listed completely at least once.
    fn is_ready(&self) -> bool {
        self.services.is_ready()
            && self.slices.is_ready()
            && self.namespaces.is_ready()
            && self.pods.is_ready()
            && self.policies.is_ready()
    }
}

/// What the rebuild reads, and what it keeps from one rebuild to the next.
pub(super) struct Rebuild {
    watched: Watched,
    statuses: PolicyStatus,
    node: NodeView,
    /// The agents' headless Service, as (namespace, name).
    agent_service: (String, String),
    default_mode: KubeMode,
    locator: Locator,
    /// Each (object, reason) warned about once, not once per rebuild.
    reported: HashSet<(String, String)>,
    accepted: Accepted,
    translator: Translator,
}

impl Rebuild {
    /// Nothing translated, reported or accepted yet.
    pub(super) fn new(
        watched: Watched,
        statuses: PolicyStatus,
        node: NodeView,
        agent_service: (String, String),
        default_mode: KubeMode,
    ) -> Rebuild {
        Rebuild {
            locator: Locator::new(node.cgroup_root.clone(), &node.pod_cgroups),
            watched,
            statuses,
            node,
            agent_service,
            default_mode,
            reported: HashSet::new(),
            accepted: Accepted::default(),
            translator: Translator::default(),
        }
    }

    /// Rebuilds after each burst of changes, once every resource has been
    /// listed; sets `synced` at the first. Ends when the drain starts or
    /// nobody listens to `tx` any more.
    pub(super) async fn run(
        mut self,
        changed: Arc<Notify>,
        mut drain: DrainWatch,
        synced: Arc<AtomicBool>,
        tx: watch::Sender<Option<Arc<Translated>>>,
    ) {
        loop {
            tokio::select! {
                _ = drain.draining() => return,
                _ = changed.notified() => {}
            }
            tokio::time::sleep(SETTLE).await;
            if !self.watched.is_ready() {
                continue;
            }
            let translated = self.rebuild(&synced);
            if tx.send(Some(Arc::new(translated))).is_err() {
                return;
            }
        }
    }

    /// One translation of everything the reflectors hold now.
    fn rebuild(&mut self, synced: &AtomicBool) -> Translated {
        let w = &self.watched;
        let objects = Objects {
            services: w.services.snapshot(),
            slices: w.slices.snapshot(),
            pods: w.pods.snapshot(),
            namespaces: w.namespaces.snapshot(),
        };
        let agents = agent_nodes(&objects.slices, &self.agent_service);
        let policies = self.policies(&objects.pods, &agents);
        let node = &self.node;
        let peers: Vec<&(String, IpAddr)> = agents
            .iter()
            .filter(|(name, _)| *name != node.name && !node.peer_nodes.contains(name))
            .collect();
        let peer_names: Vec<&str> = node
            .peer_nodes
            .iter()
            .map(String::as_str)
            .chain(peers.iter().map(|(name, _)| name.as_str()))
            .collect();
        let settings = Settings {
            node: &node.name,
            default_mode: self.default_mode,
            peer_nodes: &peer_names,
            policies: &policies,
        };
        let locator = &mut self.locator;
        locator.forget_missing(&objects.pods);
        let mut translated = self
            .translator
            .translate(&objects, &settings, &mut |uid| locator.find(uid));
        translated.nodes = peers
            .iter()
            .map(|(name, address)| PeerNode::new(name.clone(), *address))
            .collect();
        for item in &translated.skipped {
            if self.reported.insert(item.clone()) {
                warn!("kubernetes: {}: {}; skipped", item.0, item.1);
            }
        }
        if !synced.swap(true, Ordering::AcqRel) {
            info!(
                "kubernetes: synced ({} services, {} endpoint slices, {} pods on this node, {} namespaces)",
                objects.services.len(),
                objects.slices.len(),
                objects.pods.len(),
                objects.namespaces.len()
            );
        }
        translated
    }

    /// The `authorization` and `rate_limit` of each pod of this node that
    /// policies in force select. Each refused policy is warned about once, and its
    /// verdict written to its status (by one agent: `agents`).
    fn policies(&mut self, pods: &[Arc<Pod>], agents: &[(String, IpAddr)]) -> policy::Compiled {
        let all: Vec<SluicePolicy> = self
            .watched
            .policies
            .snapshot()
            .iter()
            .map(|p| (**p).clone())
            .collect();
        let td = &self.node.trust_domain;
        let refused = policy::compile(&all, pods, td).problems;
        let in_force = self.accepted.in_force(&all, td);
        let compiled = policy::compile(&in_force, pods, td);
        for p in &refused {
            let item = (
                format!("sluicepolicy {}", p.policy),
                format!("{}: {}", p.field, p.message),
            );
            if self.reported.insert(item.clone()) {
                warn!("kubernetes: {}: {}; refused", item.0, item.1);
            }
        }
        if writes_policy_status(agents, &self.node.name) {
            self.statuses.write(&all, &refused, &self.accepted);
        }
        compiled
    }
}

/// One agent writes policies' status rather than every node's racing on
/// it: the one on the first node by name among the agents.
fn writes_policy_status(agents: &[(String, IpAddr)], node: &str) -> bool {
    agents
        .iter()
        .map(|(name, _)| name.as_str())
        .chain(std::iter::once(node))
        .min()
        == Some(node)
}

/// Every agent, from the EndpointSlices of the agents' headless Service:
/// the node each runs on and its address (the node's: the agents use
/// hostNetwork), where its inbound listener answers. Sorted by node, one
/// entry per node (two agents on one node during a rolling upgrade share
/// its address).
fn agent_nodes(
    slices: &[Arc<EndpointSlice>],
    (namespace, service): &(String, String),
) -> Vec<(String, IpAddr)> {
    let mut agents: Vec<(String, IpAddr)> = slices
        .iter()
        .filter(|s| slice_service(s) == Some((namespace.as_str(), service.as_str())))
        .flat_map(|s| &s.endpoints)
        .filter_map(|e| Some((e.node_name.clone()?, e.addresses.first()?.parse().ok()?)))
        .collect();
    agents.sort();
    agents.dedup_by(|a, b| a.0 == b.0);
    agents
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(service: &str, endpoints: &[(&str, &str)]) -> Arc<EndpointSlice> {
        let endpoints: Vec<serde_json::Value> = endpoints
            .iter()
            .map(|(node, address)| serde_json::json!({ "addresses": [address], "nodeName": node }))
            .collect();
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": format!("{service}-x"), "namespace": "sluice-system",
                              "labels": { "kubernetes.io/service-name": service } },
                "addressType": "IPv4",
                "endpoints": endpoints,
            }))
            .unwrap(),
        )
    }

    /// The agents are read from their own Service's slices only, one per
    /// node; the first node by name writes policies' status.
    #[test]
    fn agents_come_from_their_service_and_the_first_node_writes_status() {
        let slices = [
            slice(
                "sluice-agents",
                &[("node-b", "198.18.0.2"), ("node-a", "198.18.0.1")],
            ),
            slice("sluice-agents", &[("node-b", "198.18.0.2")]),
            slice("checkout", &[("node-0", "198.18.9.9")]),
        ];
        let service = ("sluice-system".to_owned(), "sluice-agents".to_owned());
        let agents = agent_nodes(&slices, &service);
        let names: Vec<&str> = agents.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["node-a", "node-b"]);
        assert!(writes_policy_status(&agents, "node-a"));
        assert!(!writes_policy_status(&agents, "node-b"));
        // Before its own agent is listed, a node compares itself too.
        assert!(writes_policy_status(&agents[1..], "node-a"));
    }
}
