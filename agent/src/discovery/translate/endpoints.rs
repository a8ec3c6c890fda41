//! A Service port's endpoints, from the EndpointSlices of one address
//! family: ready ones only; those on this node tied to their workload,
//! those on other nodes to the identity their agent must present.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{SERVICE_ACCOUNT_ANNOTATION, Settings};
use crate::config::{EndpointSpec, Mode, PodRef};

/// The endpoints of `port_name` in `slices` of `address_type` (`IPv4`,
/// `IPv6`). An endpoint that mode mtls could not reach or verify is
/// skipped, with its reason, under `key` (the Service).
#[allow(clippy::too_many_arguments)]
pub(super) fn endpoints_for(
    slices: Option<&[&Arc<EndpointSlice>]>,
    address_type: &str,
    port_name: &str,
    settings: &Settings<'_>,
    mode: Mode,
    remote_sa: Option<&str>,
    workloads: &HashMap<(String, String), String>,
    key: &str,
    skipped: &mut Vec<(String, String)>,
) -> Vec<EndpointSpec> {
    let slices: Vec<&EndpointSlice> = slices
        .unwrap_or_default()
        .iter()
        .map(|s| &***s)
        .filter(|s| s.address_type == address_type)
        .collect();
    // Kept for as long as the Service does not change, at 10,000s of
    // services: room for no more than there are.
    let mut endpoints = Vec::with_capacity(slices.iter().map(|s| s.endpoints.len()).sum());
    for slice in slices {
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
        let Ok(port) = u16::try_from(port) else {
            skipped.push((
                format!(
                    "{key} endpointslice {}",
                    slice.metadata.name.as_deref().unwrap_or("?")
                ),
                format!("port {port} is not a port number; its endpoints are left out"),
            ));
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
            let Ok(ip) = address.parse::<IpAddr>() else {
                skipped.push((
                    format!("{key} endpoint {address}"),
                    "not an IP address; left out".into(),
                ));
                continue;
            };
            let node = ep.node_name.as_deref();
            let local = node.is_none_or(|n| n == settings.node);
            let mut entry = EndpointSpec::new(ip, port);
            entry.node = node.map(str::to_owned);
            entry.zone = ep.zone.clone();
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|t| t.kind.as_deref().is_none_or(|k| k == "Pod"))
                .and_then(|t| Some((t.namespace.clone()?, t.name.clone()?, t.uid.clone())));
            if local {
                if let Some(w) = pod.and_then(|(ns, name, _)| workloads.get(&(ns, name))) {
                    entry = entry.served_by(w.clone());
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
                    entry.service_account = Some(sa.to_owned());
                } else if let Some((namespace, name, uid)) = pod {
                    entry.pod = Some(PodRef {
                        namespace,
                        name,
                        uid,
                    });
                }
            }
            endpoints.push(entry);
        }
    }
    endpoints.shrink_to_fit();
    endpoints
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::discovery::translate::tests::{objects, objects_with_service_account, run};

    #[test]
    fn remote_endpoints_join_when_their_agent_and_identity_are_known() {
        let objects = objects_with_service_account();
        let t = run(&objects, &["node-b"]);
        let eps = &t.services[0].endpoints;
        assert_eq!(eps.len(), 4);
        assert_eq!(eps[2].node.as_deref(), Some("node-b"));
        assert_eq!(eps[2].service_account.as_deref(), Some("checkout"));
        assert!(eps[2].workload.is_none());
    }

    /// Without the annotation, an endpoint on another node names its pod,
    /// whose service account is then read at the first connection.
    #[test]
    fn remote_endpoints_name_their_pod_without_the_annotation() {
        let t = run(&objects(), &["node-b"]);
        let eps = &t.services[0].endpoints;
        assert_eq!(eps.len(), 4);
        assert!(eps[2].service_account.is_none());
        let pod = eps[2].pod.as_ref().unwrap();
        assert_eq!(pod.namespace, "shop");
        assert!(pod.name.starts_with("checkout-"));
        assert!(pod.uid.is_some());
        // Local endpoints are tied to their workload instead.
        assert!(eps[0].pod.is_none());
        // And it reads as the config's endpoint.
        let base = "node:\n  name: node-a\nkubernetes: {}\nnodes:\n  - name: node-b\n    address: 198.18.99.2\n";
        let config = crate::config::Config::parse(base, "t.yaml").unwrap();
        let entries = crate::discovery::entries(&config, &t);
        crate::discovery::check(&entries).unwrap();
        let remote = &entries.services()[0].endpoints[2];
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
        let eps = &t.services[0].endpoints;
        let addrs: Vec<String> = eps.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addrs, ["198.18.201.2"]);
    }

    /// What the config's types cannot hold (the API server's validation
    /// refuses it, but a translation does not rely on that) is left out
    /// and named, as any endpoint that cannot be meshed.
    #[test]
    fn an_endpoint_that_is_no_address_or_port_is_left_out_and_named() {
        let mut objects = objects();
        let slice = Arc::make_mut(&mut objects.slices[0]);
        slice.endpoints[1].addresses = vec!["checkout.shop".into()];
        let t = run(&objects, &[]);
        let eps = &t.services[0].endpoints;
        let addrs: Vec<String> = eps.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(addrs, ["198.18.201.2"]);
        let (_, why) = t
            .skipped
            .iter()
            .find(|(o, _)| o == "service shop/checkout endpoint checkout.shop")
            .expect("the endpoint is named");
        assert!(why.contains("not an IP address"), "{why}");

        let slice = Arc::make_mut(&mut objects.slices[0]);
        for port in slice.ports.iter_mut().flatten() {
            port.port = Some(70_000);
        }
        let t = run(&objects, &[]);
        assert!(t.services.is_empty(), "{:?}", t.services);
        let (_, why) = t
            .skipped
            .iter()
            .find(|(o, _)| o.starts_with("service shop/checkout endpointslice "))
            .expect("the slice is named");
        assert!(why.contains("70000 is not a port number"), "{why}");
    }
}
