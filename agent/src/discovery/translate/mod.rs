//! Kubernetes objects to the agent's own model: the services and workloads
//! a config file would list, made as the file's own types
//! ([`ServiceSpec`], [`WorkloadSpec`], [`PeerNode`]) and put through the
//! same validation as the file, so the two sources can never mean
//! different things. Objects that cannot be meshed are skipped with a
//! reason; nothing else is affected by them.
//!
//! Pods become workloads here; Services, each with the endpoints of its
//! EndpointSlices (`endpoints.rs`), become services in `services.rs`.

mod endpoints;
mod services;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};

use super::policy::Compiled;
use crate::config::{KubeMode, PeerNode, ServiceSpec, WorkloadSpec};

/// The annotation (or label) that sets a namespace's or Service's mode.
pub const MODE_ANNOTATION: &str = "sluice.io/mode";
/// On a Service: the service account its pods on other nodes run as, i.e.
/// the identity their agents present for them. Optional: without it, each
/// endpoint's identity is its pod's service account.
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "sluice.io/service-account";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Everything the reflectors hold, at one moment (shared with them, not
/// copied).
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    /// Pods on this node only.
    pub pods: Vec<Arc<Pod>>,
    pub namespaces: Vec<Arc<Namespace>>,
}

/// Where a pod lives on this node: its cgroup (relative to the node's
/// cgroup root) and its network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlace {
    pub cgroup: String,
    pub netns: std::path::PathBuf,
}

/// The translation: the services, workloads and nodes a config file would
/// list, and what was skipped, keyed by object so that each is reported
/// once.
#[derive(Debug, Default)]
pub struct Translated {
    /// Each shared with the translation before when its Service did not
    /// change ([`super::incremental::Translator`]), so that whoever applies
    /// it can tell what changed by pointer.
    pub services: Vec<Arc<ServiceSpec>>,
    /// The Kubernetes Service (namespace, name) of each entry of
    /// `services`, as [`translate`] makes them (the incremental
    /// translator keeps this per Service instead, and leaves it empty).
    pub sources: Vec<(String, String)>,
    pub workloads: Vec<WorkloadSpec>,
    /// Other nodes' agents, learnt from their pods (`nodes` entries).
    pub nodes: Vec<PeerNode>,
    /// (object, reason).
    pub skipped: Vec<(String, String)>,
}

pub struct Settings<'a> {
    pub node: &'a str,
    pub default_mode: KubeMode,
    /// Nodes whose agents this node knows (the config's `nodes`, and
    /// those whose agent pods discovery sees).
    pub peer_nodes: &'a [&'a str],
    /// Each pod's `authorization` and `rate_limit` from the policies that
    /// select it.
    pub policies: &'a Compiled,
}

/// Translates `objects`. `locate` finds a pod's cgroup and namespace by
/// uid (none: not started yet, or not on this machine).
pub fn translate(
    objects: &Objects,
    settings: &Settings<'_>,
    locate: &mut dyn FnMut(&str) -> Option<PodPlace>,
) -> Translated {
    let mut out = Translated::default();
    let namespace_modes: HashMap<&str, Option<&str>> = objects
        .namespaces
        .iter()
        .filter_map(|n| {
            let name = n.metadata.name.as_deref()?;
            Some((name, annotation(&n.metadata, MODE_ANNOTATION)))
        })
        .collect();

    let workloads = workloads(objects, settings, locate, &mut out);
    services::translate(objects, settings, &namespace_modes, &workloads, &mut out);
    out.skipped.extend(orphan_slices(objects));
    out
}

/// Every pod on this node that has its own network namespace, as a
/// workload. Returns each one's workload name by (namespace, pod name),
/// for the endpoints it serves.
fn workloads(
    objects: &Objects,
    settings: &Settings<'_>,
    locate: &mut dyn FnMut(&str) -> Option<PodPlace>,
    out: &mut Translated,
) -> HashMap<(String, String), String> {
    let mut workloads: HashMap<(String, String), String> = HashMap::new();
    for pod in &objects.pods {
        let (Some(ns), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            continue;
        };
        let key = format!("pod {ns}/{name}");
        let spec = pod.spec.as_ref();
        if spec.and_then(|s| s.node_name.as_deref()) != Some(settings.node) {
            continue;
        }
        if spec.and_then(|s| s.host_network) == Some(true) {
            out.skipped.push((
                key,
                "runs in the host's network namespace (hostNetwork); not meshed".into(),
            ));
            continue;
        }
        if let Some(value) = annotation(&pod.metadata, MODE_ANNOTATION)
            && value != "off"
        {
            out.skipped.push((
                key,
                format!(
                    "annotation {MODE_ANNOTATION}: `{value}` is not valid on a pod (only `off`)"
                ),
            ));
            continue;
        }
        let Some(uid) = pod.metadata.uid.as_deref() else {
            continue;
        };
        let Some(place) = locate(uid) else {
            // Not started yet: the next status change brings it back.
            continue;
        };
        let service_account = spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned());
        let workload = format!("{ns}/{name}");
        let mut entry = WorkloadSpec::new(
            workload.clone(),
            ns.clone(),
            service_account,
            place.cgroup,
            place.netns,
        );
        let pod = (ns.clone(), name.clone());
        entry.authorization = settings.policies.by_pod.get(&pod).cloned();
        entry.rate_limit = settings.policies.rate_limits.get(&pod).cloned();
        out.workloads.push(entry);
        workloads.insert((ns.clone(), name.clone()), workload);
    }
    workloads
}

/// Slices whose Service does not exist, each with why it is ignored.
pub fn orphan_slices(objects: &Objects) -> Vec<(String, String)> {
    let services = service_names(&objects.services);
    objects
        .slices
        .iter()
        .filter_map(|slice| {
            let (ns, service) = slice_service(slice)?;
            (!services.contains(&(ns, service))).then(|| {
                (
                    format!(
                        "endpointslice {ns}/{}",
                        slice.metadata.name.as_deref().unwrap_or("?")
                    ),
                    format!("belongs to service {ns}/{service}, which does not exist; ignored"),
                )
            })
        })
        .collect()
}

/// The (namespace, name) of the Service a slice belongs to (its
/// `kubernetes.io/service-name` label).
pub fn slice_service(slice: &EndpointSlice) -> Option<(&str, &str)> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((slice.metadata.namespace.as_deref()?, service.as_str()))
}

/// Endpoint slices by the (namespace, name) of their Service.
pub fn slices_by_service(
    slices: &[Arc<EndpointSlice>],
) -> HashMap<(&str, &str), Vec<&Arc<EndpointSlice>>> {
    let mut by_service: HashMap<(&str, &str), Vec<&Arc<EndpointSlice>>> =
        HashMap::with_capacity(slices.len());
    for slice in slices {
        if let Some(key) = slice_service(slice) {
            by_service.entry(key).or_default().push(slice);
        }
    }
    by_service
}

/// Every Service's (namespace, name).
fn service_names(services: &[Arc<Service>]) -> HashSet<(&str, &str)> {
    services
        .iter()
        .filter_map(|s| {
            Some((
                s.metadata.namespace.as_deref()?,
                s.metadata.name.as_deref()?,
            ))
        })
        .collect()
}

/// An annotation, or else a label, of that name.
pub fn annotation<'a>(
    meta: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    key: &str,
) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .or_else(|| meta.labels.as_ref().and_then(|l| l.get(key)))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object of tests/fixtures/kube.
    pub(super) fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
        let path = format!(
            "{}/../tests/fixtures/kube/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The fixtures' cluster: Services, slices, pods and namespaces.
    pub(super) fn objects() -> Objects {
        Objects {
            services: ["service-checkout", "service-headless", "service-ledger"]
                .map(|f| Arc::new(fixture(f)))
                .into(),
            slices: ["endpointslice-checkout", "endpointslice-orphan"]
                .map(|f| Arc::new(fixture(f)))
                .into(),
            pods: [
                "pod-checkout-a1",
                "pod-checkout-a2",
                "pod-checkout-b1",
                "pod-bad-annotation",
                "pod-hostnetwork",
            ]
            .map(|f| Arc::new(fixture(f)))
            .into(),
            namespaces: ["namespace-shop", "namespace-default"]
                .map(|f| Arc::new(fixture(f)))
                .into(),
        }
    }

    /// [`objects`] with the checkout Service naming its pods' service
    /// account, so that endpoints on other nodes can be verified.
    pub(super) fn objects_with_service_account() -> Objects {
        let mut objects = objects();
        Arc::make_mut(&mut objects.services[0])
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(SERVICE_ACCOUNT_ANNOTATION.into(), "checkout".into());
        objects
    }

    /// Translates for node-a, where every pod is found, knowing the
    /// agents of `peers`.
    pub(super) fn run(objects: &Objects, peers: &[&str]) -> Translated {
        let none = Compiled::default();
        let settings = Settings {
            node: "node-a",
            default_mode: KubeMode::Off,
            peer_nodes: peers,
            policies: &none,
        };
        translate(objects, &settings, &mut |uid| {
            Some(PodPlace {
                cgroup: format!("kubepods/pod{uid}"),
                netns: "/proc/1/ns/net".into(),
            })
        })
    }

    fn skipped_objects(t: &Translated) -> Vec<&str> {
        let mut v: Vec<&str> = t.skipped.iter().map(|(o, _)| o.as_str()).collect();
        v.sort();
        v
    }

    #[test]
    fn pods_here_become_workloads_and_services_take_their_mode_from_annotations() {
        let t = run(&objects(), &[]);
        let names: Vec<&str> = t.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "shop/checkout-6b8d9c7f4-2xkqp",
                "shop/checkout-6b8d9c7f4-9mzrt"
            ]
        );
        assert_eq!(t.workloads[0].service_account, "checkout");
        assert_eq!(
            t.workloads[0].netns.as_ref().unwrap().get(),
            std::path::Path::new("/proc/1/ns/net")
        );

        // Only checkout has endpoints; its namespace says mtls, so the two
        // endpoints on node-b (whose agent is unknown here) are left out.
        assert_eq!(t.services.len(), 1, "{:?}", t.services);
        let s = &t.services[0];
        assert_eq!(s.name.get(), "checkout");
        assert_eq!(s.mode, crate::config::Mode::Mtls);
        assert_eq!(s.address.to_string(), "10.96.0.50");
        assert_eq!(*s.port, 8080);
        let eps = &s.endpoints;
        assert_eq!(eps.len(), 2);
        assert_eq!(
            eps[0].workload.as_ref().unwrap().get(),
            "shop/checkout-6b8d9c7f4-2xkqp"
        );
        assert_eq!(eps[0].node.as_deref(), Some("node-a"));

        assert_eq!(
            skipped_objects(&t),
            [
                "endpointslice shop/inventory-5kq9z",
                "pod default/node-probe-6xw4m",
                "pod shop/cart-5c7d8b9f6-t2mzq",
                "service shop/checkout endpoint 198.18.211.2",
                "service shop/checkout endpoint 198.18.212.2",
                "service shop/checkout-headless",
            ]
        );
        let reason = |o: &str| &t.skipped.iter().find(|(k, _)| k == o).unwrap().1;
        assert!(reason("pod shop/cart-5c7d8b9f6-t2mzq").contains("`bogus`"));
        assert!(reason("pod default/node-probe-6xw4m").contains("hostNetwork"));
        assert!(reason("service shop/checkout-headless").contains("headless"));
        assert!(reason("endpointslice shop/inventory-5kq9z").contains("does not exist"));
    }

    #[test]
    fn the_translation_is_a_valid_config() {
        let base = "node:\n  name: node-a\nnodes:\n  - name: node-b\n    address: 198.18.99.2\n";
        let config = crate::config::Config::parse(base, "t.yaml").unwrap();
        let objects = objects_with_service_account();
        let t = run(&objects, &["node-b"]);
        let entries = crate::discovery::entries(&config, &t);
        crate::discovery::check(&entries).unwrap();
        assert_eq!(entries.services().len(), 1);
        assert_eq!(entries.workloads().len(), 2);
        assert_eq!(entries.services()[0].endpoints.len(), 4);
    }
}
