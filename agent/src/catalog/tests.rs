//! The catalog from one generation to the next: state carried over for
//! what stays and forgotten for what goes, whether the whole catalog is
//! rebuilt (`from_config` with the previous one) or only the services a
//! watch event named (`with_services`), and what the kernel's SERVICES
//! map is told of the difference (`kernel_delta`).

use std::net::IpAddr;

use super::*;
use sluice_maps::{SERVICE_FAIL_OPEN, SERVICE_KERNEL, ServiceKey, key_addr};

use crate::{
    clock::{Millis, now_ms},
    config::{Config, EndpointSpec, Entries, ServiceSpec, WorkloadSpec},
    redirect::entries::{KernelEntry, kernel_delta, kernel_entries, kernel_tables},
    resilience::{Outcome, Phase},
    route::report_kernel,
};

/// A validated config from YAML indented to sit in the test's code.
fn config(yaml: &str) -> Config {
    let indent = yaml
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let text: String = yaml
        .lines()
        .map(|l| format!("{}\n", l.get(indent..).unwrap_or("")))
        .collect();
    let config = Config::parse(&text, "catalog-test.yaml").unwrap();
    config.validate().unwrap();
    config
}

/// The services of `config` that `pick` takes, as a second source (a
/// watch event) would give them.
fn discovered(config: &Config, pick: impl Fn(&ServiceSpec) -> bool) -> Vec<Arc<ServiceSpec>> {
    config
        .services
        .iter()
        .filter(|s| pick(s))
        .map(|s| Arc::new(s.clone()))
        .collect()
}

/// pay (kernel-balanced, weighted, ejects at the first failure), ledger
/// (plaintext: fails open) and shop (mtls: fails closed, no table).
const GENERATION_1: &str = "
    node:
      name: n1
    services:
      - name: pay
        address: 10.96.0.1
        port: 80
        mode: kernel
        load_balancer:
          policy: weighted_round_robin
        outlier_detection:
          consecutive_failures: 1
          max_ejection_percent: 100
        endpoints:
          - address: 10.0.0.1
            port: 8080
            weight: 2
          - address: 10.0.0.2
            port: 8080
      - name: ledger
        address: 10.96.0.2
        port: 80
        mode: plaintext
        endpoints:
          - address: 10.0.0.5
            port: 9090
      - name: shop
        address: 10.96.0.3
        port: 443
        mode: plaintext
        on_agent_down: fail_closed
        endpoints:
          - address: 10.0.0.7
            port: 8443
";

/// pay keeps 10.0.0.1 (now weight 3), loses 10.0.0.2, gains 10.0.0.3;
/// ledger is gone; shop is as it was; cart is new.
const GENERATION_2: &str = "
    node:
      name: n1
    services:
      - name: pay
        address: 10.96.0.1
        port: 80
        mode: kernel
        load_balancer:
          policy: weighted_round_robin
        outlier_detection:
          consecutive_failures: 1
          max_ejection_percent: 100
        endpoints:
          - address: 10.0.0.1
            port: 8080
            weight: 3
          - address: 10.0.0.3
            port: 8080
      - name: shop
        address: 10.96.0.3
        port: 443
        mode: plaintext
        on_agent_down: fail_closed
        endpoints:
          - address: 10.0.0.7
            port: 8443
      - name: cart
        address: 10.96.0.4
        port: 80
        mode: plaintext
        endpoints:
          - address: 10.0.0.9
            port: 80
";

/// A moment on the agent's clock, well inside any ejection made at it.
const NOW: Millis = 1_000;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn service(catalog: &Catalog, vip: &str) -> Arc<Service> {
    catalog
        .service(addr(vip))
        .unwrap_or_else(|| panic!("no service at {vip}"))
        .clone()
}

fn endpoint<'a>(service: &'a Service, at: &str) -> &'a Endpoint {
    service
        .endpoints
        .iter()
        .find(|e| e.addr == addr(at))
        .unwrap_or_else(|| panic!("{} has no endpoint {at}", service.name))
}

/// Ejects the endpoint at `at` of `service` as a failed connect the
/// kernel balanced would.
fn eject(service: &Service, at: &str) {
    let index = service
        .endpoints
        .iter()
        .position(|e| e.addr == addr(at))
        .unwrap();
    report_kernel(service, index, Outcome::ConnectFailed, NOW);
    assert_eq!(service.endpoints[index].state.phase(), Phase::Open);
}

fn key(vip: &str) -> ServiceKey {
    let vip = addr(vip);
    ServiceKey {
        addr: key_addr(vip.ip()),
        port: vip.port(),
        _pad: 0,
    }
}

/// The backends of a kernel entry as addresses, with their weights.
fn members(entry: &KernelEntry) -> Vec<(SocketAddr, u32)> {
    entry
        .members
        .iter()
        .map(|(b, weight)| {
            let octets: Vec<u8> = b.addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let v6 = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(octets).unwrap());
            let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
            (SocketAddr::new(ip, b.port), *weight)
        })
        .collect()
}

fn entry_for(entries: &[KernelEntry], vip: &str) -> Option<KernelEntry> {
    entries.iter().find(|e| e.key == key(vip)).cloned()
}

#[test]
fn a_rebuild_keeps_the_state_of_endpoints_that_stay_and_forgets_those_that_go() {
    let first = Catalog::from_config(&config(GENERATION_1), &[], None);
    let pay = service(&first, "10.96.0.1:80");
    eject(&pay, "10.0.0.1:8080");
    endpoint(&pay, "10.0.0.2:8080").state.set_healthy(false);
    let ledger = service(&first, "10.96.0.2:80");

    let second = Catalog::from_config(&config(GENERATION_2), &[], Some(&first));
    let pay2 = service(&second, "10.96.0.1:80");
    assert!(Arc::ptr_eq(&pay.state, &pay2.state), "the service's state");
    let kept = endpoint(&pay2, "10.0.0.1:8080");
    assert!(Arc::ptr_eq(
        &kept.state,
        &endpoint(&pay, "10.0.0.1:8080").state
    ));
    assert_eq!(kept.state.phase(), Phase::Open, "still ejected");
    assert_eq!(kept.weight, 3, "the new spec's weight");
    let added = endpoint(&pay2, "10.0.0.3:8080");
    assert_eq!(added.state.phase(), Phase::Closed);
    assert!(added.state.is_healthy());
    assert!(second.service(addr("10.96.0.2:80")).is_none(), "ledger");
    // The kernel keeps the ejected endpoint out of the rebuilt table.
    let entry = entry_for(&kernel_entries(&second, NOW), "10.96.0.1:80").unwrap();
    assert_eq!(members(&entry), [(addr("10.0.0.3:8080"), 1)]);

    // Back to the first generation: what went comes back fresh.
    let third = Catalog::from_config(&config(GENERATION_1), &[], Some(&second));
    let pay3 = service(&third, "10.96.0.1:80");
    assert_eq!(
        endpoint(&pay3, "10.0.0.1:8080").state.phase(),
        Phase::Open,
        "carried through two generations"
    );
    let back = endpoint(&pay3, "10.0.0.2:8080");
    assert!(back.state.is_healthy(), "its unhealthy mark left with it");
    assert!(!Arc::ptr_eq(
        &back.state,
        &endpoint(&pay, "10.0.0.2:8080").state
    ));
    let ledger3 = service(&third, "10.96.0.2:80");
    assert!(!Arc::ptr_eq(&ledger.state, &ledger3.state), "a new ledger");
    assert!(Arc::ptr_eq(
        &service(&first, "10.96.0.3:443").state,
        &service(&third, "10.96.0.3:443").state
    ));
}

#[test]
fn with_services_rebuilds_the_named_services_and_leaves_the_rest_as_they_are() {
    let first = Catalog::from_config(&config(GENERATION_1), &[], None);
    let pay = service(&first, "10.96.0.1:80");
    eject(&pay, "10.0.0.1:8080");
    let next = config(GENERATION_2);
    let changed = discovered(&next, |s| s.name.get() != "shop");
    let removed = [("default".to_owned(), "ledger".to_owned())];
    let second = first.with_services(&Entries::with(&next, &changed, &[], &[]), &removed);

    // Untouched: the very same service.
    assert!(Arc::ptr_eq(
        &service(&first, "10.96.0.3:443"),
        &service(&second, "10.96.0.3:443")
    ));
    assert!(second.service(addr("10.96.0.2:80")).is_none(), "ledger");
    let pay2 = service(&second, "10.96.0.1:80");
    assert!(!Arc::ptr_eq(&pay, &pay2), "rebuilt");
    assert_eq!(pay2.id, pay.id);
    assert!(Arc::ptr_eq(&pay.state, &pay2.state));
    assert_eq!(
        endpoint(&pay2, "10.0.0.1:8080").state.phase(),
        Phase::Open,
        "the ejection survives the event"
    );
    assert!(
        pay2.endpoints
            .iter()
            .all(|e| e.addr != addr("10.0.0.2:8080"))
    );
    // A new service takes a number no service had: ids name map entries.
    let cart = service(&second, "10.96.0.4:80");
    let old_ids: Vec<u32> = first.services().map(|s| s.id).collect();
    assert!(!old_ids.contains(&cart.id), "{} in {old_ids:?}", cart.id);
    assert_eq!(second.services().count(), 3);

    // The same service moved to another address: the old one is free,
    // and the number and state go along.
    let moved = config(&GENERATION_2.replace("10.96.0.1", "10.96.0.9"));
    let pay_spec = discovered(&moved, |s| s.name.get() == "pay");
    let third = second.with_services(&Entries::with(&moved, &pay_spec, &[], &[]), &[]);
    assert!(third.service(addr("10.96.0.1:80")).is_none());
    let pay3 = service(&third, "10.96.0.9:80");
    assert_eq!(pay3.id, pay.id);
    assert!(Arc::ptr_eq(&pay.state, &pay3.state));
    assert!(Arc::ptr_eq(&cart, &service(&third, "10.96.0.4:80")));
}

#[test]
fn kernel_delta_writes_the_changed_services_and_drops_the_addresses_left() {
    let first = Catalog::from_config(&config(GENERATION_1), &[], None);
    eject(&service(&first, "10.96.0.1:80"), "10.0.0.1:8080");
    let next = config(&GENERATION_2.replace("10.96.0.1", "10.96.0.9"));
    let changed = discovered(&next, |s| s.name.get() != "shop");
    let removed = [("default".to_owned(), "ledger".to_owned())];
    let second = first.with_services(&Entries::with(&next, &changed, &[], &[]), &removed);
    let named = [
        ("default", "pay"),
        ("default", "cart"),
        ("default", "ledger"),
    ];
    let (write, drop) = kernel_delta(&first, &second, &named, NOW);

    // What a whole sync would write for them, and nothing for shop.
    let all = kernel_entries(&second, NOW);
    let mut written: Vec<ServiceKey> = write.iter().map(|e| e.key).collect();
    written.sort_by_key(|k| (k.addr, k.port));
    let mut expected = vec![key("10.96.0.9:80"), key("10.96.0.4:80")];
    expected.sort_by_key(|k| (k.addr, k.port));
    assert_eq!(written, expected);
    for entry in &write {
        assert_eq!(Some(entry), all.iter().find(|e| e.key == entry.key));
    }
    let pay = entry_for(&write, "10.96.0.9:80").unwrap();
    assert_eq!(pay.flags, SERVICE_KERNEL);
    assert_eq!(
        members(&pay),
        [(addr("10.0.0.3:8080"), 1)],
        "the ejected endpoint stays out"
    );
    let cart = entry_for(&write, "10.96.0.4:80").unwrap();
    assert_eq!(cart.flags, SERVICE_FAIL_OPEN);
    assert_eq!(members(&cart), [(addr("10.0.0.9:80"), 1)]);
    // The removed service's address and the one pay left.
    let mut dropped = drop.clone();
    dropped.sort_by_key(|k| (k.addr, k.port));
    let mut expected = vec![key("10.96.0.1:80"), key("10.96.0.2:80")];
    expected.sort_by_key(|k| (k.addr, k.port));
    assert_eq!(dropped, expected);

    // Named but unchanged in place: written again, nothing dropped.
    let (write, drop) = kernel_delta(&second, &second, &[("default", "shop")], NOW);
    assert_eq!(write.len(), 1);
    assert_eq!(write[0].key, key("10.96.0.3:443"));
    assert!(drop.is_empty());
}

#[test]
fn only_services_the_kernel_balances_or_passes_on_have_a_table() {
    let catalog = Catalog::from_config(&config(GENERATION_1), &[], None);
    let entries = kernel_entries(&catalog, NOW);
    assert_eq!(entries.len(), 3, "every service has an entry");
    let pay = entry_for(&entries, "10.96.0.1:80").unwrap();
    assert_eq!(
        members(&pay),
        [(addr("10.0.0.1:8080"), 2), (addr("10.0.0.2:8080"), 1)],
        "weighted_round_robin: the weights go to the kernel"
    );
    let shop = entry_for(&entries, "10.96.0.3:443").unwrap();
    assert_eq!(shop.flags, 0);
    assert!(
        shop.members.is_empty(),
        "fail closed: no endpoint to pass to"
    );
    let tables: Vec<ServiceKey> = kernel_tables(&catalog, NOW).iter().map(|e| e.key).collect();
    assert_eq!(tables.len(), 2);
    assert!(!tables.contains(&key("10.96.0.3:443")));
    for entry in &entries {
        let s = catalog.services().find(|s| s.id == entry.id).unwrap();
        assert_eq!(entry.key, key(&s.vip.to_string()));
    }
}

/// A discovered pod that could not be placed is left out of the entries;
/// the catalog then keeps none of its endpoints (a connection must not be
/// sent to a pod the agent cannot place), and every other endpoint stays.
#[test]
fn endpoints_of_a_pod_left_out_are_not_in_the_catalog() {
    let file = config(
        "
        node:
          name: n1
        ",
    );
    let pod = |name: &str| {
        WorkloadSpec::new(
            name.into(),
            "shop".into(),
            "default".into(),
            format!("kubepods/{name}"),
            "/proc/1/ns/net".into(),
        )
    };
    let spec = ServiceSpec::new(
        "checkout".into(),
        "shop".into(),
        "10.96.0.7".parse().unwrap(),
        80,
        crate::config::Mode::default(),
        vec![
            EndpointSpec::new("10.0.0.1".parse().unwrap(), 8080).served_by("shop/placed".into()),
            EndpointSpec::new("10.0.0.2".parse().unwrap(), 8080).served_by("shop/gone".into()),
            EndpointSpec::new("10.0.0.3".parse().unwrap(), 8080),
        ],
    );
    let services = [Arc::new(spec)];
    let workloads = [pod("shop/placed"), pod("shop/gone")];
    let mut entries = Entries::with(&file, &services, &workloads, &[]);
    entries.validate().unwrap();
    entries.retain_second_workloads(|w| w.name.get() != "shop/gone");
    let placed = Placement {
        cgroup: "/sys/fs/cgroup/kubepods/placed".into(),
        cgroup_id: 7,
        netns: None,
    };
    let catalog = Catalog::build(&entries, &[placed], None);
    let checkout = service(&catalog, "10.96.0.7:80");
    let left: Vec<String> = checkout
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    assert_eq!(left, ["10.0.0.1:8080", "10.0.0.3:8080"]);
    assert_eq!(catalog.workloads().len(), 1);
    assert_eq!(catalog.workloads()[0].name, "shop/placed");
}

/// An ejection travels to the next agent's catalog by service and
/// address; endpoints with nothing to say do not travel.
#[test]
fn endpoint_states_carry_over_to_another_catalog() {
    let old = Catalog::from_config(&config(GENERATION_1), &[], None);
    eject(&service(&old, "10.96.0.1:80"), "10.0.0.1:8080");
    let states = old.endpoint_states(now_ms());
    assert_eq!(states.services.len(), 1, "{states:?}");
    assert_eq!(states.services[0].endpoints.len(), 1);
    let json = serde_json::to_vec(&states).unwrap();
    let states: state::EndpointStates = serde_json::from_slice(&json).unwrap();

    let new = Catalog::from_config(&config(GENERATION_1), &[], None);
    assert_eq!(new.restore_endpoint_states(&states, now_ms()), 1);
    let pay = service(&new, "10.96.0.1:80");
    assert_eq!(endpoint(&pay, "10.0.0.1:8080").state.phase(), Phase::Open);
    assert_eq!(endpoint(&pay, "10.0.0.2:8080").state.phase(), Phase::Closed);
}

/// A workload's rate limit lives on through a rebuild while its settings
/// stay (a reload, or a pod coming or going, does not refill its buckets)
/// and starts afresh when they change.
#[test]
fn a_rate_limits_buckets_outlive_a_rebuild_while_its_settings_stay() {
    let with_limit = |per_second: u32| {
        config(&format!(
            "
            node:
              name: n1
            workloads:
              - name: ledger
                namespace: payments
                service_account: ledger
                rate_limit:
                  requests_per_second: {per_second}
                  burst: 2
            "
        ))
    };
    let placed = [Placement {
        cgroup: PathBuf::from("/sys/fs/cgroup/ledger"),
        cgroup_id: 7,
        netns: None,
    }];
    let limit = |catalog: &Catalog| catalog.workloads()[0].rate_limit.clone().unwrap();
    let first = Catalog::from_config(&with_limit(1), &placed, None);
    let spent = limit(&first);
    assert!(spent.limiter.admit(None).is_ok() && spent.limiter.admit(None).is_ok());
    assert!(spent.limiter.admit(None).is_err(), "the burst is spent");

    let second = Catalog::from_config(&with_limit(1), &placed, Some(&first));
    assert!(Arc::ptr_eq(&spent, &limit(&second)));
    assert!(limit(&second).limiter.admit(None).is_err(), "still spent");

    let changed = Catalog::from_config(&with_limit(5), &placed, Some(&second));
    assert!(!Arc::ptr_eq(&spent, &limit(&changed)));
    assert!(limit(&changed).limiter.admit(None).is_ok(), "a new limit");
}
