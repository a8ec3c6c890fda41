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
//! about 16 ms (`cargo bench --bench catalog`).
//!
//! The identity a pod on another node must present is its service account.
//! Rather than watch every pod of the cluster from every node, the agent
//! reads a pod (one GET, answered from the API server's watch cache) the
//! first time one of its workloads connects to it ([`PodLookup`]).

pub mod incremental;
pub mod locate;
pub mod policy;
pub mod translate;

use std::{
    collections::HashSet,
    fmt::Debug,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, reflector, watcher},
};
use log::{error, info, warn};
use tokio::sync::{Notify, watch};

use crate::{
    config::{KubernetesConfig, PodRef},
    drain::DrainWatch,
    tls::Identity,
};
use policy::SluicePolicy;
pub use translate::{Objects, Translated};

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

/// Coalesces a burst of watch events into one catalog update. Short: a
/// change that touches a few services is applied in a few milliseconds
/// (`cargo bench --bench catalog`), and events that come while one is
/// applied are taken together by the next.
const SETTLE: Duration = Duration::from_millis(5);

/// The daemon's end of discovery.
pub struct Discovery {
    /// The latest translation, once every resource has been listed.
    pub updates: watch::Receiver<Option<Arc<Translated>>>,
    /// Every resource has been listed at least once.
    pub synced: Arc<AtomicBool>,
    /// Reads the identities of pods on other nodes.
    pub pods: Arc<PodLookup>,
}

/// Reads a pod's service account from the API server: the identity that
/// the agent of its node must present for it.
pub struct PodLookup {
    client: Client,
    trust_domain: String,
}

impl PodLookup {
    /// One GET with resourceVersion=0, which the API server answers from
    /// its watch cache rather than etcd. The pod must still be the one the
    /// EndpointSlice named (same uid), not a later one of the same name.
    pub async fn identity(&self, pod: &PodRef) -> Result<Identity, String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let found = api
            .get_with(&pod.name, &kube::api::GetParams::any())
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) if s.code == 404 => "the pod no longer exists".to_owned(),
                kube::Error::Api(s) if s.code == 403 => "the API server refused to get pods \
                     (403 Forbidden): the agent's ClusterRole must grant get on pods"
                    .to_owned(),
                e => format!("the API server did not answer: {e}"),
            })?;
        if let Some(uid) = &pod.uid
            && found.metadata.uid.as_ref() != Some(uid)
        {
            return Err("the pod was replaced by another of the same name".into());
        }
        let account = found
            .spec
            .and_then(|s| s.service_account_name)
            .unwrap_or_else(|| "default".to_owned());
        Ok(Identity::new(&self.trust_domain, &pod.namespace, &account))
    }
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

/// Adds the discovered services and workloads to `config` (the file's)
/// and validates the whole. An error names every problem.
pub fn merge(config: &mut crate::config::Config, found: &Translated) -> Result<(), String> {
    merge_parts(config, &found.services, &found.workloads, &found.nodes)
}

/// Like [`merge`], with only some of the discovered services (those a
/// watch event changed): the file's, the workloads and the nodes are all
/// there, so the services given are checked against everything they name.
pub fn merge_parts(
    config: &mut crate::config::Config,
    services: &[Arc<serde_json::Value>],
    workloads: &[serde_json::Value],
    nodes: &[serde_json::Value],
) -> Result<(), String> {
    // The same types and field rules as the file, read straight from the
    // JSON values (locations are unknown: the objects have no lines).
    fn read<'v, T: serde::de::DeserializeOwned>(
        values: impl IntoIterator<Item = &'v serde_json::Value>,
        what: &str,
    ) -> Result<Vec<T>, String> {
        values
            .into_iter()
            .map(T::deserialize)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot read a discovered {what}: {e}"))
    }
    let services: Vec<crate::config::ServiceSpec> = read(services.iter().map(|s| &**s), "service")?;
    let workloads: Vec<crate::config::WorkloadSpec> = read(workloads, "workload")?;
    // A node the file lists keeps the file's address.
    let nodes: Vec<crate::config::PeerNode> = read(nodes, "node")?;
    for n in nodes {
        if !config.nodes.iter().any(|c| c.name.value == n.name.value) {
            config.nodes.push(n);
        }
    }
    let health_check = config
        .kubernetes
        .as_ref()
        .and_then(|k| k.health_check.clone());
    config.services.extend(services.into_iter().map(|mut s| {
        s.health_check = health_check.clone();
        s
    }));
    config.workloads.extend(workloads);
    config.validate().map_err(|problems| {
        problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// The services (config entries, by namespace and name) that differ
/// between two translations: `changed` to build anew, `removed` to drop.
#[derive(Debug, Default)]
pub struct ServiceChanges {
    pub changed: Vec<Arc<serde_json::Value>>,
    pub removed: Vec<(String, String)>,
}

/// What `after` changes of `before`, when only services changed (told by
/// pointer: [`incremental::Translator`] shares what it did not translate
/// again). None when the workloads or the nodes changed too, which takes
/// a whole rebuild.
pub fn service_changes(before: &Translated, after: &Translated) -> Option<ServiceChanges> {
    if before.workloads != after.workloads || before.nodes != after.nodes {
        return None;
    }
    // By pointer: no key is built for the thousands that stayed.
    let ptrs = |t: &Translated| -> std::collections::HashSet<*const serde_json::Value> {
        t.services.iter().map(Arc::as_ptr).collect()
    };
    let (old, new) = (ptrs(before), ptrs(after));
    let key = |v: &serde_json::Value| {
        (
            v["namespace"].as_str().unwrap_or_default().to_owned(),
            v["name"].as_str().unwrap_or_default().to_owned(),
        )
    };
    let mut changes = ServiceChanges::default();
    for v in &after.services {
        if !old.contains(&Arc::as_ptr(v)) {
            changes.changed.push(v.clone());
        }
    }
    let rebuilt: std::collections::HashSet<(String, String)> =
        changes.changed.iter().map(|v| key(v)).collect();
    for v in &before.services {
        if !new.contains(&Arc::as_ptr(v)) {
            let k = key(v);
            if !rebuilt.contains(&k) {
                changes.removed.push(k);
            }
        }
    }
    Some(changes)
}

/// Connects to the API server and starts the reflectors. An unreachable
/// API server is not an error: the reflectors retry with backoff, and the
/// agent stays not ready until the first complete listing.
pub async fn start(
    config: &KubernetesConfig,
    node: NodeView,
    drain: DrainWatch,
) -> Result<Discovery, String> {
    let client = client(config).await?;
    let (tx, updates) = watch::channel(None);
    let synced = Arc::new(AtomicBool::new(false));
    let changed = Arc::new(Notify::new());

    let every = watcher::Config::default;
    let services = reflect::<Service>(Api::all(client.clone()), every(), &changed, &drain);
    let slices = reflect::<EndpointSlice>(Api::all(client.clone()), every(), &changed, &drain);
    let namespaces = reflect::<Namespace>(Api::all(client.clone()), every(), &changed, &drain);
    let pods = reflect::<Pod>(
        Api::all(client.clone()),
        every().fields(&format!("spec.nodeName={}", node.name)),
        &changed,
        &drain,
    );
    let policies = reflect::<SluicePolicy>(Api::all(client.clone()), every(), &changed, &drain);
    let statuses = PolicyStatus::new(client.clone());
    let lookup = Arc::new(PodLookup {
        client,
        trust_domain: node.trust_domain.clone(),
    });

    let agent_service = config
        .agent_service
        .split_once('/')
        .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
        .ok_or_else(|| {
            format!(
                "kubernetes.agent_service: `{}` is not namespace/name",
                config.agent_service
            )
        })?;
    let default_mode = config.default_mode;
    let flag = synced.clone();
    let mut drain_rebuild = drain.clone();
    tokio::spawn(async move {
        let mut locator = locate::Locator::new(node.cgroup_root.clone(), &node.pod_cgroups);
        let mut reported: HashSet<(String, String)> = HashSet::new();
        let mut accepted = policy::Accepted::default();
        let mut translator = incremental::Translator::default();
        loop {
            tokio::select! {
                _ = drain_rebuild.draining() => return,
                _ = changed.notified() => {}
            }
            tokio::time::sleep(SETTLE).await;
            let ready = services.is_ready()
                && slices.is_ready()
                && namespaces.is_ready()
                && pods.is_ready()
                && policies.is_ready();
            if !ready {
                continue;
            }
            let objects = Objects {
                services: services.snapshot(),
                slices: slices.snapshot(),
                pods: pods.snapshot(),
                namespaces: namespaces.snapshot(),
            };
            let agents = agent_nodes(&objects.slices, &agent_service);
            let peers: Vec<&(String, std::net::IpAddr)> = agents
                .iter()
                .filter(|(name, _)| *name != node.name && !node.peer_nodes.contains(name))
                .collect();
            let peer_names: Vec<&str> = node
                .peer_nodes
                .iter()
                .map(String::as_str)
                .chain(peers.iter().map(|(name, _)| name.as_str()))
                .collect();
            let all_policies: Vec<SluicePolicy> =
                policies.snapshot().iter().map(|p| (**p).clone()).collect();
            let td = &node.trust_domain;
            let refused = policy::compile(&all_policies, &objects.pods, td).problems;
            let in_force = accepted.in_force(&all_policies, td);
            let authorizations = policy::compile(&in_force, &objects.pods, td).by_pod;
            for p in &refused {
                let item = (
                    format!("sluicepolicy {}", p.policy),
                    format!("{}: {}", p.field, p.message),
                );
                if reported.insert(item.clone()) {
                    warn!("kubernetes: {}: {}; refused", item.0, item.1);
                }
            }
            if writes_policy_status(&agents, &node.name) {
                statuses.write(&all_policies, &refused, &accepted);
            }
            let settings = translate::Settings {
                node: &node.name,
                default_mode,
                peer_nodes: &peer_names,
                authorizations: &authorizations,
            };
            locator.forget_missing(&objects.pods);
            let mut translated =
                translator.translate(&objects, &settings, &mut |uid| locator.find(uid));
            translated.nodes = peers
                .iter()
                .map(|(name, address)| serde_json::json!({ "name": name, "address": address }))
                .collect();
            // One warning per object and reason, not one per rebuild.
            for item in &translated.skipped {
                if reported.insert(item.clone()) {
                    warn!("kubernetes: {}: {}; skipped", item.0, item.1);
                }
            }
            if !flag.swap(true, Ordering::AcqRel) {
                info!(
                    "kubernetes: synced ({} services, {} endpoint slices, {} pods on this node, {} namespaces)",
                    objects.services.len(),
                    objects.slices.len(),
                    objects.pods.len(),
                    objects.namespaces.len()
                );
            }
            if tx.send(Some(Arc::new(translated))).is_err() {
                return;
            }
        }
    });
    Ok(Discovery {
        updates,
        synced,
        pods: lookup,
    })
}

/// One agent writes policies' status rather than every node's racing on
/// it: the one on the first node by name among the agents.
fn writes_policy_status(agents: &[(String, std::net::IpAddr)], node: &str) -> bool {
    agents
        .iter()
        .map(|(name, _)| name.as_str())
        .chain(std::iter::once(node))
        .min()
        == Some(node)
}

/// Writes policies' `Accepted` condition through the status subresource,
/// each change once (a write in flight is not sent again), off the
/// rebuild loop.
struct PolicyStatus {
    client: Client,
    /// The condition last sent per policy (without its time).
    sent: Arc<std::sync::Mutex<std::collections::HashMap<(String, String), serde_json::Value>>>,
}

impl PolicyStatus {
    fn new(client: Client) -> PolicyStatus {
        PolicyStatus {
            client,
            sent: Arc::default(),
        }
    }

    fn write(
        &self,
        policies: &[SluicePolicy],
        refused: &[policy::PolicyProblem],
        accepted: &policy::Accepted,
    ) {
        let now = crate::audit::now_rfc3339();
        for (ns, name, body) in policy::status_changes(policies, refused, |p| accepted.has(p), &now)
        {
            let mut condition = body["status"]["conditions"][0].clone();
            if let Some(c) = condition.as_object_mut() {
                c.remove("lastTransitionTime");
            }
            let key = (ns.clone(), name.clone());
            {
                let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
                if sent.get(&key) == Some(&condition) {
                    continue;
                }
                sent.insert(key.clone(), condition);
            }
            let api: Api<SluicePolicy> = Api::namespaced(self.client.clone(), &ns);
            let sent = self.sent.clone();
            tokio::spawn(async move {
                let patch = kube::api::Patch::Merge(&body);
                if let Err(e) = api
                    .patch_status(&name, &kube::api::PatchParams::default(), &patch)
                    .await
                {
                    warn!("kubernetes: cannot write the status of sluicepolicy {ns}/{name}: {e}");
                    // Sent again at the next change.
                    sent.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                }
            });
        }
    }
}

/// Every agent, from the EndpointSlices of the agents' headless Service:
/// the node each runs on and its address (the node's: the agents use
/// hostNetwork), where its inbound listener answers. Sorted by node, one
/// entry per node (two agents on one node during a rolling upgrade share
/// its address).
fn agent_nodes(
    slices: &[Arc<EndpointSlice>],
    (namespace, service): &(String, String),
) -> Vec<(String, std::net::IpAddr)> {
    let mut agents: Vec<(String, std::net::IpAddr)> = slices
        .iter()
        .filter(|s| translate::slice_service(s) == Some((namespace.as_str(), service.as_str())))
        .flat_map(|s| &s.endpoints)
        .filter_map(|e| Some((e.node_name.clone()?, e.addresses.first()?.parse().ok()?)))
        .collect();
    agents.sort();
    agents.dedup_by(|a, b| a.0 == b.0);
    agents
}

async fn client(config: &KubernetesConfig) -> Result<Client, String> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no in-cluster config and no kubeconfig: {e}"))?,
    };
    Client::try_from(kube_config).map_err(|e| format!("cannot make a Kubernetes client: {e}"))
}

/// One resource's reflector: its store, and a task that keeps it fed.
struct Reflected<K: Resource + Clone + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store: reflector::Store<K>,
}

impl<K> Reflected<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    /// Listed completely at least once.
    fn is_ready(&self) -> bool {
        futures::FutureExt::now_or_never(self.store.wait_until_ready()).is_some_and(|r| r.is_ok())
    }

    /// The objects as the store holds them (shared, not copied).
    fn snapshot(&self) -> Vec<Arc<K>> {
        self.store.state()
    }
}

fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: &Arc<Notify>,
    drain: &DrainWatch,
) -> Reflected<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + Debug
        + Send
        + Sync
        + serde::de::DeserializeOwned
        + 'static,
{
    let plural = K::plural(&()).into_owned();
    let (store, writer) = reflector::store::<K>();
    let stream = reflector(writer, watcher(api, config)).default_backoff();
    let changed = changed.clone();
    let mut drain = drain.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // Logged once per change of state, not once per retry.
        let mut failing = false;
        loop {
            let next = tokio::select! {
                _ = drain.draining() => return,
                next = stream.next() => next,
            };
            match next {
                // The start of a (re-)list says nothing yet about success.
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                Some(Ok(_)) => {
                    if failing {
                        failing = false;
                        info!("kubernetes: watching {plural} again");
                    }
                    changed.notify_one();
                }
                Some(Err(e)) => {
                    if !failing {
                        failing = true;
                        report(&plural, &e);
                    }
                }
                None => return,
            }
        }
    });
    Reflected { store }
}

/// One line that says what is wrong: a missing RBAC right names the
/// resource and verb to grant.
fn report(plural: &str, e: &watcher::Error) {
    let text = e.to_string();
    let forbidden = match e {
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => {
            matches!(k, kube::Error::Api(s) if s.code == 403)
        }
        watcher::Error::WatchError(s) => s.code == 403,
        _ => false,
    };
    if forbidden {
        let verb = if matches!(e, watcher::Error::InitialListFailed(_)) {
            "list"
        } else {
            "watch"
        };
        error!(
            "kubernetes: the API server refused to {verb} {plural} (403 Forbidden): the agent's \
             ClusterRole must grant get, list, watch on {plural}; keeping the last catalog and retrying"
        );
    } else {
        warn!(
            "kubernetes: cannot watch {plural} ({text}); keeping the last catalog and retrying with backoff"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

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
        // And WATCHED is what `start` really reflects.
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
