//! Kubernetes objects to the agent's own model: the services and workloads
//! a config file would list. The result is read into the same types and
//! goes through the same validation as the file, so the two sources can
//! never mean different things. Objects that cannot be meshed are skipped with a reason; nothing
//! else is affected by them.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::{Value, json};

use crate::config::{KubeMode, Mode};

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

/// The translation: config-shaped services and workloads, and what was
/// skipped, keyed by object so that each is reported once.
#[derive(Debug, Default)]
pub struct Translated {
    /// Each shared with the translation before when its Service did not
    /// change ([`super::incremental::Translator`]), so that whoever applies
    /// it can tell what changed by pointer.
    pub services: Vec<Arc<Value>>,
    /// The Kubernetes Service (namespace, name) of each entry of
    /// `services`, as [`translate`] makes them (the incremental
    /// translator keeps this per Service instead, and leaves it empty).
    pub sources: Vec<(String, String)>,
    pub workloads: Vec<Value>,
    /// Other nodes' agents, learnt from their pods (`nodes` entries).
    pub nodes: Vec<Value>,
    /// (object, reason).
    pub skipped: Vec<(String, String)>,
}

pub struct Settings<'a> {
    pub node: &'a str,
    pub default_mode: KubeMode,
    /// Nodes whose agents this node knows (the config's `nodes`, and
    /// those whose agent pods discovery sees).
    pub peer_nodes: &'a [&'a str],
    /// Each pod's `authorization` block from the policies that select it,
    /// by (namespace, pod name).
    pub authorizations: &'a HashMap<(String, String), Value>,
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

    // Workloads: every pod on this node that has its own network namespace.
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
        let mut entry = json!({
            "name": workload,
            "namespace": ns,
            "service_account": service_account,
            "cgroup": place.cgroup,
            "netns": place.netns,
        });
        if let Some(authorization) = settings.authorizations.get(&(ns.clone(), name.clone())) {
            entry["authorization"] = authorization.clone();
        }
        out.workloads.push(entry);
        workloads.insert((ns.clone(), name.clone()), workload);
    }

    let slices = slices_by_service(&objects.slices);

    // A name made for one port or family (`checkout-ipv6`) must not take
    // a Service's own name, nor one already given: validation would refuse
    // the whole catalog over it, so the later entry is skipped.
    let service_names = service_names(&objects.services);
    let mut given: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
    for service in &objects.services {
        let (Some(ns), Some(name)) = (&service.metadata.namespace, &service.metadata.name) else {
            continue;
        };
        let key = format!("service {ns}/{name}");
        let value = annotation(&service.metadata, MODE_ANNOTATION)
            .or_else(|| namespace_modes.get(ns.as_str()).copied().flatten());
        let kube_mode = match value {
            None => settings.default_mode,
            Some(v) => match KubeMode::parse(v) {
                Some(m) => m,
                None => {
                    out.skipped.push((
                        key,
                        format!(
                            "annotation {MODE_ANNOTATION}: `{v}` is not one of off, mtls, \
                             permissive, plaintext, kernel"
                        ),
                    ));
                    continue;
                }
            },
        };
        let Some(mode) = kube_mode.mode() else {
            continue;
        };
        let Some(spec) = &service.spec else {
            continue;
        };
        let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
        if cluster_ip.is_empty() || cluster_ip == "None" {
            out.skipped.push((
                key,
                "headless (no cluster IP): callers reach pods directly; not meshed".into(),
            ));
            continue;
        }
        // Dual stack: one cluster IP per family, the primary (the Service's
        // first family, `clusterIP`) first. Each becomes a service of its
        // own, fed by the EndpointSlices of its family; the primary keeps
        // the Service's name, the other gets `-ipv4` or `-ipv6`.
        let cluster_ips: Vec<&str> = match spec.cluster_ips.as_deref() {
            Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
            _ => vec![cluster_ip],
        };
        let remote_sa = annotation(&service.metadata, SERVICE_ACCOUNT_ANNOTATION);
        let ports = spec.ports.as_deref().unwrap_or_default();
        for (rank, ip) in cluster_ips.iter().enumerate() {
            let family = match ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(_)) => "IPv4",
                Ok(std::net::IpAddr::V6(_)) => "IPv6",
                Err(_) => {
                    out.skipped.push((
                        key.clone(),
                        format!("cluster IP {ip} is not an IP address; not meshed"),
                    ));
                    continue;
                }
            };
            let family_suffix = if rank == 0 {
                String::new()
            } else {
                format!("-{}", family.to_ascii_lowercase())
            };
            for port in ports {
                if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                    continue;
                }
                let port_name = port.name.as_deref().unwrap_or("");
                let endpoints = endpoints_for(
                    slices.get(&(ns.as_str(), name.as_str())).map(Vec::as_slice),
                    family,
                    port_name,
                    settings,
                    mode,
                    remote_sa,
                    &workloads,
                    &key,
                    &mut out.skipped,
                );
                if endpoints.is_empty() {
                    // Nothing ready: the virtual address stays unmeshed
                    // until an endpoint is.
                    continue;
                }
                let port_suffix = if ports.len() == 1 {
                    String::new()
                } else if port_name.is_empty() {
                    format!("-{}", port.port)
                } else {
                    format!("-{port_name}")
                };
                let entry_name = format!("{name}{port_suffix}{family_suffix}");
                let made = entry_name != *name;
                if (made && service_names.contains(&(ns.as_str(), entry_name.as_str())))
                    || !given.insert((ns.clone(), entry_name.clone()))
                {
                    out.skipped.push((
                        key.clone(),
                        format!(
                            "{ip} port {}: its entry would be named `{entry_name}`, a name \
                             another service in {ns} already has; not meshed",
                            port.port
                        ),
                    ));
                    continue;
                }
                out.services.push(Arc::new(json!({
                    "name": entry_name,
                    "namespace": ns,
                    "address": ip,
                    "port": port.port,
                    "mode": mode.name(),
                    "endpoints": endpoints,
                })));
                out.sources.push((ns.clone(), name.clone()));
            }
        }
    }

    out.skipped.extend(orphan_slices(objects));
    out
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
fn service_names(services: &[Arc<Service>]) -> std::collections::HashSet<(&str, &str)> {
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

#[allow(clippy::too_many_arguments)]
fn endpoints_for(
    slices: Option<&[&Arc<EndpointSlice>]>,
    address_type: &str,
    port_name: &str,
    settings: &Settings<'_>,
    mode: Mode,
    remote_sa: Option<&str>,
    workloads: &HashMap<(String, String), String>,
    key: &str,
    skipped: &mut Vec<(String, String)>,
) -> Vec<Value> {
    let mut endpoints = Vec::new();
    for slice in slices.unwrap_or_default() {
        if slice.address_type != address_type {
            continue;
        }
        let Some(port) = slice
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name)
            .and_then(|p| p.port)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            // The API's rule: an unknown readiness counts as ready.
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let Some(address) = ep.addresses.first() else {
                continue;
            };
            let node = ep.node_name.as_deref();
            let local = node.is_none_or(|n| n == settings.node);
            let mut entry = json!({ "address": address, "port": port });
            if let Some(n) = node {
                entry["node"] = json!(n);
            }
            if let Some(z) = &ep.zone {
                entry["zone"] = json!(z);
            }
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|t| t.kind.as_deref().is_none_or(|k| k == "Pod"))
                .and_then(|t| Some((t.namespace.clone()?, t.name.clone()?, t.uid.clone())));
            if local {
                if let Some(w) = pod.and_then(|(ns, name, _)| workloads.get(&(ns, name))) {
                    entry["workload"] = json!(w);
                }
            } else {
                if mode == Mode::Mtls {
                    let node = node.unwrap_or("?");
                    if !settings.peer_nodes.contains(&node) {
                        skipped.push((
                            format!("{key} endpoint {address}"),
                            format!(
                                "on node {node}, where no agent runs (none of its pods, nor \
                                 `nodes`): mode mtls cannot reach it"
                            ),
                        ));
                        continue;
                    }
                    if remote_sa.is_none() && pod.is_none() {
                        skipped.push((
                            format!("{key} endpoint {address}"),
                            format!(
                                "on another node, backed by no pod (targetRef) and the service \
                                 has no {SERVICE_ACCOUNT_ANNOTATION} annotation: its identity \
                                 is unknown, so mode mtls cannot verify it"
                            ),
                        ));
                        continue;
                    }
                }
                // The annotation overrides; otherwise the pod's own service
                // account, read when a connection first goes to it.
                if let Some(sa) = remote_sa {
                    entry["service_account"] = json!(sa);
                } else if let Some((ns, name, uid)) = pod {
                    entry["pod"] = json!({ "namespace": ns, "name": name, "uid": uid });
                }
            }
            endpoints.push(entry);
        }
    }
    endpoints
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

    fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
        let path = format!(
            "{}/../tests/fixtures/kube/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn objects() -> Objects {
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

    fn run(objects: &Objects, peers: &[&str]) -> Translated {
        let none = HashMap::new();
        let settings = Settings {
            node: "node-a",
            default_mode: KubeMode::Off,
            peer_nodes: peers,
            authorizations: &none,
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
        let names: Vec<&str> = t
            .workloads
            .iter()
            .map(|w| w["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "shop/checkout-6b8d9c7f4-2xkqp",
                "shop/checkout-6b8d9c7f4-9mzrt"
            ]
        );
        assert_eq!(t.workloads[0]["service_account"], "checkout");
        assert_eq!(t.workloads[0]["netns"], "/proc/1/ns/net");

        // Only checkout has endpoints; its namespace says mtls, so the two
        // endpoints on node-b (whose agent is unknown here) are left out.
        assert_eq!(t.services.len(), 1, "{:?}", t.services);
        let s = &t.services[0];
        assert_eq!(s["name"], "checkout");
        assert_eq!(s["mode"], "mtls");
        assert_eq!(s["address"], "10.96.0.50");
        assert_eq!(s["port"], 8080);
        let eps = s["endpoints"].as_array().unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0]["workload"], "shop/checkout-6b8d9c7f4-2xkqp");
        assert_eq!(eps[0]["node"], "node-a");

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
    fn remote_endpoints_join_when_their_agent_and_identity_are_known() {
        let mut objects = objects();
        Arc::make_mut(&mut objects.services[0])
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(SERVICE_ACCOUNT_ANNOTATION.into(), "checkout".into());
        let t = run(&objects, &["node-b"]);
        let eps = t.services[0]["endpoints"].as_array().unwrap();
        assert_eq!(eps.len(), 4);
        assert_eq!(eps[2]["node"], "node-b");
        assert_eq!(eps[2]["service_account"], "checkout");
        assert!(eps[2].get("workload").is_none());
    }

    /// Without the annotation, an endpoint on another node names its pod,
    /// whose service account is then read at the first connection.
    #[test]
    fn remote_endpoints_name_their_pod_without_the_annotation() {
        let t = run(&objects(), &["node-b"]);
        let eps = t.services[0]["endpoints"].as_array().unwrap();
        assert_eq!(eps.len(), 4);
        assert!(eps[2].get("service_account").is_none());
        let pod = &eps[2]["pod"];
        assert_eq!(pod["namespace"], "shop");
        assert!(pod["name"].as_str().unwrap().starts_with("checkout-"));
        assert!(pod["uid"].is_string());
        // Local endpoints are tied to their workload instead.
        assert!(eps[0].get("pod").is_none());
        // And it reads as the config's endpoint.
        let base = "node:\n  name: node-a\nkubernetes: {}\nnodes:\n  - name: node-b\n    address: 198.18.99.2\n";
        let mut config = crate::config::Config::parse(base, "t.yaml").unwrap();
        super::super::merge(&mut config, &t).unwrap();
        let remote = &config.services[0].endpoints[2];
        assert_eq!(remote.pod.as_ref().unwrap().namespace, "shop");
    }

    #[test]
    fn an_endpoint_that_is_not_ready_takes_no_new_calls() {
        let mut objects = objects();
        Arc::make_mut(&mut objects.slices[0]).endpoints[1]
            .conditions
            .get_or_insert_default()
            .ready = Some(false);
        let t = run(&objects, &[]);
        let eps = t.services[0]["endpoints"].as_array().unwrap();
        let addrs: Vec<&str> = eps.iter().map(|e| e["address"].as_str().unwrap()).collect();
        assert_eq!(addrs, ["198.18.201.2"]);
    }

    #[test]
    fn the_translation_is_a_valid_config() {
        let base = "node:\n  name: node-a\nnodes:\n  - name: node-b\n    address: 198.18.99.2\n";
        let mut config = crate::config::Config::parse(base, "t.yaml").unwrap();
        let mut objects = objects();
        Arc::make_mut(&mut objects.services[0])
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(SERVICE_ACCOUNT_ANNOTATION.into(), "checkout".into());
        let t = run(&objects, &["node-b"]);
        super::super::merge(&mut config, &t).unwrap();
        assert_eq!(config.services.len(), 1);
        assert_eq!(config.workloads.len(), 2);
        assert_eq!(config.services[0].endpoints.len(), 4);
    }

    /// The checkout Service made dual-stack (`families` in order, the first
    /// primary), with an IPv6 slice beside the fixture's IPv4 one.
    fn dual_stack(families: [&str; 2]) -> Objects {
        let mut objects = objects();
        let ip = |f: &str| {
            if f == "IPv4" {
                "10.96.0.50"
            } else {
                "fd00:96::50"
            }
        };
        let spec = Arc::make_mut(&mut objects.services[0])
            .spec
            .as_mut()
            .unwrap();
        spec.cluster_ip = Some(ip(families[0]).into());
        spec.cluster_ips = Some(families.map(|f| ip(f).to_owned()).into());
        spec.ip_families = Some(families.map(str::to_owned).into());
        spec.ip_family_policy = Some("RequireDualStack".into());
        let mut v6: EndpointSlice = fixture("endpointslice-checkout");
        v6.metadata.name = Some("checkout-v6".into());
        v6.address_type = "IPv6".into();
        for (i, ep) in v6.endpoints.iter_mut().enumerate() {
            ep.addresses = vec![format!("fd00:18::{}", i + 1)];
        }
        objects.slices.push(Arc::new(v6));
        objects
    }

    fn service<'a>(t: &'a Translated, name: &str) -> &'a Value {
        t.services
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no service {name}: {:?}", t.services))
    }

    fn addresses(s: &Value) -> Vec<&str> {
        s["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["address"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn a_dual_stack_service_is_one_service_per_family_fed_by_its_familys_slices() {
        let t = run(&dual_stack(["IPv4", "IPv6"]), &[]);
        assert_eq!(t.services.len(), 2, "{:?}", t.services);
        let v4 = service(&t, "checkout");
        assert_eq!(v4["address"], "10.96.0.50");
        assert_eq!(addresses(v4), ["198.18.201.2", "198.18.202.2"]);
        let v6 = service(&t, "checkout-ipv6");
        assert_eq!(v6["address"], "fd00:96::50");
        assert_eq!(v6["port"], 8080);
        assert_eq!(v6["mode"], "mtls");
        assert_eq!(addresses(v6), ["fd00:18::1", "fd00:18::2"]);
        // The same pods, so the same workloads, whatever the family.
        assert_eq!(
            v6["endpoints"][0]["workload"],
            v4["endpoints"][0]["workload"]
        );
        assert!(t.skipped.iter().all(|(o, _)| o != "service shop/checkout"));

        // IPv6 first: the primary family keeps the name.
        let t = run(&dual_stack(["IPv6", "IPv4"]), &[]);
        assert_eq!(service(&t, "checkout")["address"], "fd00:96::50");
        assert_eq!(service(&t, "checkout-ipv4")["address"], "10.96.0.50");
    }

    #[test]
    fn a_dual_stack_translation_is_a_valid_config() {
        let base = "node:\n  name: node-a\n";
        let mut config = crate::config::Config::parse(base, "t.yaml").unwrap();
        let t = run(&dual_stack(["IPv4", "IPv6"]), &[]);
        super::super::merge(&mut config, &t).unwrap();
        assert_eq!(config.services.len(), 2);
        let v6 = config
            .services
            .iter()
            .find(|s| s.name.value == "checkout-ipv6")
            .unwrap();
        assert!(v6.address.value.is_ipv6());
        assert!(v6.endpoints.iter().all(|e| e.address.value.is_ipv6()));
    }

    #[test]
    fn a_made_name_that_another_service_has_is_skipped_not_fatal() {
        let mut objects = dual_stack(["IPv4", "IPv6"]);
        let mut other = (*objects.services[0]).clone();
        other.metadata.name = Some("checkout-ipv6".into());
        let spec = other.spec.as_mut().unwrap();
        spec.cluster_ip = Some("10.96.0.51".into());
        spec.cluster_ips = Some(vec!["10.96.0.51".into()]);
        spec.ip_families = Some(vec!["IPv4".into()]);
        objects.services.push(Arc::new(other));
        let mut slice: EndpointSlice = fixture("endpointslice-checkout");
        slice.metadata.name = Some("checkout-ipv6-abc".into());
        slice
            .metadata
            .labels
            .get_or_insert_default()
            .insert(SERVICE_NAME_LABEL.into(), "checkout-ipv6".into());
        objects.slices.push(Arc::new(slice));

        let t = run(&objects, &[]);
        assert_eq!(service(&t, "checkout")["address"], "10.96.0.50");
        assert_eq!(service(&t, "checkout-ipv6")["address"], "10.96.0.51");
        assert_eq!(t.services.len(), 2, "{:?}", t.services);
        let (_, why) = t
            .skipped
            .iter()
            .find(|(o, _)| o == "service shop/checkout")
            .expect("the made name is reported");
        assert!(
            why.contains("fd00:96::50") && why.contains("`checkout-ipv6`"),
            "{why}"
        );
        let base = "node:\n  name: node-a\n";
        let mut config = crate::config::Config::parse(base, "t.yaml").unwrap();
        super::super::merge(&mut config, &t).unwrap();
    }

    #[test]
    fn an_ipv6_only_service_keeps_its_name_and_takes_only_ipv6_slices() {
        let mut objects = dual_stack(["IPv6", "IPv4"]);
        let spec = Arc::make_mut(&mut objects.services[0])
            .spec
            .as_mut()
            .unwrap();
        spec.cluster_ips = Some(vec!["fd00:96::50".into()]);
        spec.ip_families = Some(vec!["IPv6".into()]);
        let t = run(&objects, &[]);
        assert_eq!(t.services.len(), 1, "{:?}", t.services);
        assert_eq!(t.services[0]["name"], "checkout");
        assert_eq!(addresses(&t.services[0]), ["fd00:18::1", "fd00:18::2"]);
    }
}
