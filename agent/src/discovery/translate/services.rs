//! Services to config entries: one per cluster IP (one per family on a
//! dual-stack Service) and TCP port, named after the Service, with the
//! endpoints of the EndpointSlices of its family.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use super::{
    MODE_ANNOTATION, Objects, SERVICE_ACCOUNT_ANNOTATION, Settings, Translated, annotation,
    endpoints::endpoints_for, service_names, slices_by_service,
};
use crate::config::{KubeMode, Mode, Protocol, ServiceSpec};

/// Adds the services `objects` hold to `out`, each with its mode from its
/// own annotation, else its namespace's (`namespace_modes`), else the
/// default; their local endpoints name the pods' `workloads`.
pub(super) fn translate(
    objects: &Objects,
    settings: &Settings<'_>,
    namespace_modes: &HashMap<&str, Option<&str>>,
    workloads: &HashMap<(String, String), String>,
    out: &mut Translated,
) {
    let slices = slices_by_service(&objects.slices);

    // A name made for one port or family (`checkout-ipv6`) must not take
    // a Service's own name, nor one already given: validation would refuse
    // the whole catalog over it, so the later entry is skipped.
    let service_names = service_names(&objects.services);
    let mut given: HashSet<(String, String)> = HashSet::new();
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
            let Ok(address) = ip.parse::<IpAddr>() else {
                out.skipped.push((
                    key.clone(),
                    format!("cluster IP {ip} is not an IP address; not meshed"),
                ));
                continue;
            };
            let family = match address {
                IpAddr::V4(_) => "IPv4",
                IpAddr::V6(_) => "IPv6",
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
                let Ok(number) = u16::try_from(port.port) else {
                    out.skipped.push((
                        key.clone(),
                        format!("port {}: not a port number; not meshed", port.port),
                    ));
                    continue;
                };
                let port_name = port.name.as_deref().unwrap_or("");
                let endpoints = endpoints_for(
                    slices.get(&(ns.as_str(), name.as_str())).map(Vec::as_slice),
                    family,
                    port_name,
                    settings,
                    mode,
                    remote_sa,
                    workloads,
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
                let mut spec =
                    ServiceSpec::new(entry_name, ns.clone(), address, number, mode, endpoints);
                if let Some(protocol) = app_protocol(port.app_protocol.as_deref(), &spec) {
                    spec.declare_protocol(protocol);
                }
                out.services.push(Arc::new(spec));
                out.sources.push((ns.clone(), name.clone()));
            }
        }
    }
}

/// The protocol a Service port's `appProtocol` declares: `http`,
/// `kubernetes.io/h2c` (HTTP/2 with prior knowledge) and `grpc`. Any other
/// value (`kubernetes.io/ws`, a vendor's name) leaves the service `tcp`,
/// balanced per connection, and so does `mode: kernel` (no proxy).
fn app_protocol(declared: Option<&str>, spec: &ServiceSpec) -> Option<Protocol> {
    let protocol = match declared? {
        "http" => Protocol::Http,
        "kubernetes.io/h2c" => Protocol::Http2,
        "grpc" => Protocol::Grpc,
        _ => return None,
    };
    (spec.mode != Mode::Kernel).then_some(protocol)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use crate::{
        config::{Mode, Protocol, ServiceSpec},
        discovery::translate::{
            Objects, SERVICE_NAME_LABEL, Translated,
            tests::{fixture, objects, run},
        },
    };

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

    fn service<'a>(t: &'a Translated, name: &str) -> &'a ServiceSpec {
        t.services
            .iter()
            .find(|s| s.name.get() == name)
            .unwrap_or_else(|| panic!("no service {name}: {:?}", t.services))
    }

    fn address(s: &ServiceSpec) -> String {
        s.address.to_string()
    }

    fn addresses(s: &ServiceSpec) -> Vec<String> {
        s.endpoints.iter().map(|e| e.address.to_string()).collect()
    }

    #[test]
    fn a_dual_stack_service_is_one_service_per_family_fed_by_its_familys_slices() {
        let t = run(&dual_stack(["IPv4", "IPv6"]), &[]);
        assert_eq!(t.services.len(), 2, "{:?}", t.services);
        let v4 = service(&t, "checkout");
        assert_eq!(address(v4), "10.96.0.50");
        assert_eq!(addresses(v4), ["198.18.201.2", "198.18.202.2"]);
        let v6 = service(&t, "checkout-ipv6");
        assert_eq!(address(v6), "fd00:96::50");
        assert_eq!(*v6.port, 8080);
        assert_eq!(v6.mode, Mode::Mtls);
        assert_eq!(addresses(v6), ["fd00:18::1", "fd00:18::2"]);
        // The same pods, so the same workloads, whatever the family.
        assert!(v4.endpoints[0].workload.is_some());
        assert_eq!(v6.endpoints[0].workload, v4.endpoints[0].workload);
        assert!(t.skipped.iter().all(|(o, _)| o != "service shop/checkout"));

        // IPv6 first: the primary family keeps the name.
        let t = run(&dual_stack(["IPv6", "IPv4"]), &[]);
        assert_eq!(address(service(&t, "checkout")), "fd00:96::50");
        assert_eq!(address(service(&t, "checkout-ipv4")), "10.96.0.50");
    }

    #[test]
    fn a_dual_stack_translation_is_a_valid_config() {
        let base = "node:\n  name: node-a\n";
        let config = crate::config::Config::parse(base, "t.yaml").unwrap();
        let t = run(&dual_stack(["IPv4", "IPv6"]), &[]);
        let entries = crate::discovery::entries(&config, &t);
        crate::discovery::check(&entries).unwrap();
        assert_eq!(entries.services().len(), 2);
        let v6 = entries
            .services()
            .iter()
            .find(|s| s.name.get() == "checkout-ipv6")
            .unwrap();
        assert!(v6.address.get().is_ipv6());
        assert!(v6.endpoints.iter().all(|e| e.address.get().is_ipv6()));
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
        assert_eq!(address(service(&t, "checkout")), "10.96.0.50");
        assert_eq!(address(service(&t, "checkout-ipv6")), "10.96.0.51");
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
        let config = crate::config::Config::parse(base, "t.yaml").unwrap();
        crate::discovery::check(&crate::discovery::entries(&config, &t)).unwrap();
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
        assert_eq!(t.services[0].name.get(), "checkout");
        assert_eq!(addresses(&t.services[0]), ["fd00:18::1", "fd00:18::2"]);
    }

    #[test]
    fn a_service_port_that_is_no_port_number_is_skipped_and_named() {
        let mut objects = objects();
        let spec = Arc::make_mut(&mut objects.services[0])
            .spec
            .as_mut()
            .unwrap();
        for port in spec.ports.iter_mut().flatten() {
            port.port = 70_000;
        }
        let t = run(&objects, &[]);
        assert!(t.services.is_empty(), "{:?}", t.services);
        let (_, why) = t
            .skipped
            .iter()
            .find(|(o, _)| o == "service shop/checkout")
            .expect("the service is named");
        assert!(why.contains("port 70000: not a port number"), "{why}");
    }

    /// A port's `appProtocol` declares what its service speaks; a value
    /// the agent does not know leaves it tcp.
    #[test]
    fn app_protocol_declares_the_protocol_where_requests_can_be_served() {
        let with = |app_protocol: &str, mode: Option<&str>, peers: &[&str]| {
            let mut objects = objects();
            let checkout = Arc::make_mut(&mut objects.services[0]);
            if let Some(mode) = mode {
                checkout
                    .metadata
                    .annotations
                    .get_or_insert_default()
                    .insert(super::MODE_ANNOTATION.into(), mode.into());
            }
            let spec = checkout.spec.as_mut().unwrap();
            for port in spec.ports.iter_mut().flatten() {
                port.app_protocol = Some(app_protocol.into());
            }
            service(&run(&objects, peers), "checkout").protocol()
        };
        let plain = Some("plaintext");
        assert_eq!(with("grpc", plain, &[]), Protocol::Grpc);
        assert_eq!(with("kubernetes.io/h2c", plain, &[]), Protocol::Http2);
        assert_eq!(with("http", plain, &[]), Protocol::Http);
        assert_eq!(with("kubernetes.io/ws", plain, &[]), Protocol::Tcp);
        // Requests to node-b ride the tunnel to its agent.
        assert_eq!(with("grpc", None, &["node-b"]), Protocol::Grpc);
    }
}
