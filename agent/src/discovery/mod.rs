//! Service discovery from the Kubernetes API server (kube-rs): Services,
//! EndpointSlices (among them the agents' own, which say where every other
//! node's agent listens), Namespaces, the Pods scheduled on this node and
//! SluicePolicies, each kept in a reflector (list, then watch; re-list
//! after an error or a 410 Gone, keeping the last state meanwhile). Every
//! change is translated ([`translate`]) into the services, workloads and
//! nodes a config file would list, and handed to the daemon, which applies
//! it as it applies a config reload: without dropping a connection, and
//! refusing (keeping the running catalog) what does not validate. Only the
//! Services whose inputs changed are translated again
//! ([`incremental::Translator`]), and when nothing but services changed the
//! daemon builds just those ([`service_changes`]): at 10,000 services and
//! 100,000 endpoints one changed EndpointSlice reaches the kernel's map in
//! about 13 ms (`cargo bench --bench catalog`).
//!
//! The identity a pod on another node must present is its service account.
//! Rather than watch every pod of the cluster from every node, the agent
//! reads a pod (one GET, answered from the API server's watch cache) the
//! first time one of its workloads connects to it ([`PodLookup`]).
//!
//! Here: what is watched and written, and the start. The watch plumbing is
//! in `reflect.rs`, the rebuild loop in `rebuild.rs`, the translation in
//! [`translate`] (and [`incremental`]), the check beside the config
//! file's entries in `sources.rs`, SluicePolicies in [`policy`], finding pods on this machine
//! in [`locate`], reading other nodes' pods in `lookup.rs`, and what
//! callers handle going wrong ([`DiscoveryError`]) in `error.rs`.

mod error;
pub mod incremental;
pub mod locate;
mod lookup;
pub mod policy;
mod rebuild;
mod reflect;
mod sources;
pub mod translate;

use std::{
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
};

use kube::Client;
use tokio::sync::{Notify, watch};

pub use error::{DiscoveryError, Entry, EntryProblem};
pub use lookup::{PodLookup, PodLookupError};
use rebuild::{Rebuild, Watched};
pub use sources::{ServiceChanges, check, entries, service_changes};
pub use translate::{Objects, Translated};

use crate::{config::KubernetesConfig, drain::DrainWatch};

/// What the agent reads, as (API group, resource). These are exactly the
/// rights the agent's ClusterRole grants (get, list, watch); a test checks
/// config/kubernetes/clusterrole.yaml against this list. (Pods are also
/// read one by one: [`PodLookup`].)
pub const WATCHED: [(&str, &str); 5] = [
    ("", "services"),
    ("", "pods"),
    ("", "namespaces"),
    ("discovery.k8s.io", "endpointslices"),
    (policy::GROUP, policy::PLURAL),
];

/// The one thing the agent writes: its verdict on each policy, as the
/// `Accepted` condition of the policy's status (patch on this subresource).
pub const WRITTEN: (&str, &str) = (policy::GROUP, "sluicepolicies/status");

/// The daemon's end of discovery.
pub struct Discovery {
    /// The latest translation, once every resource has been listed.
    pub updates: watch::Receiver<Option<Arc<Translated>>>,
    /// Every resource has been listed at least once.
    pub synced: Arc<AtomicBool>,
    /// Reads the identities of pods on other nodes.
    pub pods: Arc<PodLookup>,
}

/// What the translation needs to know about this node.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub name: String,
    /// Absolute path of the node's cgroup root.
    pub cgroup_root: PathBuf,
    /// Where pods' cgroups are searched, relative to the root.
    pub pod_cgroups: String,
    /// Nodes whose agents are known (the config's `nodes`).
    pub peer_nodes: Vec<String>,
    /// The mesh's trust domain, for identities of pods on other nodes.
    pub trust_domain: String,
}

/// Connects to the API server and starts the reflectors. An unreachable
/// API server is not an error: the reflectors retry with backoff, and the
/// agent stays not ready until the first complete listing.
pub async fn start(
    config: &KubernetesConfig,
    node: NodeView,
    drain: DrainWatch,
) -> Result<Discovery, DiscoveryError> {
    let client = client(config).await?;
    let agent_service = config
        .agent_service
        .split_once('/')
        .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
        .ok_or_else(|| DiscoveryError::AgentService(config.agent_service.clone()))?;
    let (tx, updates) = watch::channel(None);
    let synced = Arc::new(AtomicBool::new(false));
    let changed = Arc::new(Notify::new());
    let watched = Watched::start(&client, &node.name, &changed, &drain);
    let statuses = policy::PolicyStatus::new(client.clone());
    let pods = Arc::new(PodLookup::new(client, node.trust_domain.clone()));
    let rebuild = Rebuild::new(watched, statuses, node, agent_service, config.default_mode);
    tokio::spawn(rebuild.run(changed, drain, synced.clone(), tx));
    Ok(Discovery {
        updates,
        synced,
        pods,
    })
}

/// A client to the API server as `kubernetes.kubeconfig`, or else the
/// environment, says.
async fn client(config: &KubernetesConfig) -> Result<Client, DiscoveryError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|error| {
                DiscoveryError::KubeconfigUnreadable {
                    path: path.clone(),
                    error,
                }
            })?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|error| DiscoveryError::KubeconfigInvalid {
                    path: path.clone(),
                    error,
                })?
        }
        None => kube::Config::infer()
            .await
            .map_err(DiscoveryError::NoClusterConfig)?,
    };
    Client::try_from(kube_config).map_err(DiscoveryError::Client)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use k8s_openapi::api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    };
    use kube::Resource;

    use super::{policy::SluicePolicy, *};

    /// The ClusterRole shipped in config/kubernetes grants exactly what the
    /// code watches: get, list and watch on [`WATCHED`], and patch on
    /// [`WRITTEN`], nothing more.
    #[test]
    fn the_cluster_role_grants_exactly_what_discovery_watches() {
        #[derive(serde::Deserialize)]
        struct Role {
            kind: String,
            rules: Vec<Rule>,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Rule {
            api_groups: Vec<String>,
            resources: Vec<String>,
            verbs: Vec<String>,
        }
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/kubernetes/clusterrole.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let role: Role = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(role.kind, "ClusterRole");
        let mut granted = BTreeSet::new();
        let mut written = BTreeSet::new();
        for rule in &role.rules {
            let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
            if verbs == BTreeSet::from(["patch"]) {
                for group in &rule.api_groups {
                    for resource in &rule.resources {
                        written.insert((group.clone(), resource.clone()));
                    }
                }
                continue;
            }
            assert_eq!(
                verbs,
                BTreeSet::from(["get", "list", "watch"]),
                "rule for {:?} grants more or less than reading",
                rule.resources
            );
            for group in &rule.api_groups {
                for resource in &rule.resources {
                    granted.insert((group.clone(), resource.clone()));
                }
            }
        }
        let watched: BTreeSet<(String, String)> = WATCHED
            .iter()
            .map(|(g, r)| (g.to_string(), r.to_string()))
            .collect();
        assert_eq!(granted, watched);
        assert_eq!(
            written,
            BTreeSet::from([(WRITTEN.0.to_owned(), WRITTEN.1.to_owned())])
        );
        // And WATCHED is what `start` really reflects (`rebuild::Watched`).
        fn id<K: Resource<DynamicType = ()>>() -> (String, String) {
            (K::group(&()).into_owned(), K::plural(&()).into_owned())
        }
        let reflected = BTreeSet::from([
            id::<Service>(),
            id::<Pod>(),
            id::<Namespace>(),
            id::<EndpointSlice>(),
            id::<SluicePolicy>(),
        ]);
        assert_eq!(reflected, watched);
    }
}
