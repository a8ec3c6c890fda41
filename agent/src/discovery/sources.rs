//! Discovered entries beside the config file's: of the file's own types,
//! checked by the file's own rules through [`Entries`], so the two sources
//! can never mean different things; and, between two translations, which
//! services changed.

use std::{collections::HashSet, sync::Arc};

use super::{DiscoveryError, Entry, EntryProblem, Translated};
use crate::config::{Authorization, Config, Entries, Origin, ServiceSpec, WorkloadSpec};

/// The file's entries with all that discovery found beside them.
pub fn entries<'a>(file: &'a Config, found: &'a Translated) -> Entries<'a> {
    Entries::with(file, &found.services, &found.workloads, &found.nodes)
}

/// Validates both sources together. An error names every problem, and the
/// discovered entry each is in.
pub fn check(entries: &Entries) -> Result<(), DiscoveryError> {
    entries
        .validate()
        .map_err(|problems| DiscoveryError::Invalid {
            problems: problems
                .into_iter()
                .map(|p| EntryProblem {
                    entry: entry_of(entries, &p.field),
                    field: p.field,
                    message: p.message,
                })
                .collect(),
        })
}

/// The discovered entry a validation field (`services[3].address`) is in,
/// if it is in one.
fn entry_of(entries: &Entries, field: &str) -> Option<Entry> {
    let (list, rest) = field.split_once('[')?;
    let index: usize = rest.split_once(']')?.0.parse().ok()?;
    let (kind, name) = match list {
        "services" if entries.service_origin(index) == Origin::Second => {
            let s = entries.services().get(index)?;
            ("service", format!("{}/{}", s.namespace, s.name.get()))
        }
        "workloads" if entries.workload_origin(index) == Origin::Second => (
            "workload",
            entries.workloads().get(index)?.name.get().clone(),
        ),
        "nodes" => ("node", entries.nodes().get(index)?.name.get().clone()),
        _ => return None,
    };
    Some(Entry { kind, name })
}

/// The services (config entries, by namespace and name) that differ
/// between two translations: `changed` to build anew, `removed` to drop.
#[derive(Debug, Default)]
pub struct ServiceChanges {
    pub changed: Vec<Arc<ServiceSpec>>,
    pub removed: Vec<(String, String)>,
}

/// What `after` changes of `before`, when only services changed (told by
/// pointer: [`Translator`](super::incremental::Translator) shares what it did not translate
/// again). None when the workloads or the nodes changed too, which takes
/// a whole rebuild.
pub fn service_changes(before: &Translated, after: &Translated) -> Option<ServiceChanges> {
    let same_workloads = before.workloads.len() == after.workloads.len()
        && before
            .workloads
            .iter()
            .zip(&after.workloads)
            .all(|(a, b)| same_workload(a, b));
    let same_nodes = before.nodes.len() == after.nodes.len()
        && before
            .nodes
            .iter()
            .zip(&after.nodes)
            .all(|(a, b)| a.name == b.name && a.address == b.address);
    if !same_workloads || !same_nodes {
        return None;
    }
    // By pointer: no key is built for the thousands that stayed.
    let ptrs = |t: &Translated| -> HashSet<*const ServiceSpec> {
        t.services.iter().map(Arc::as_ptr).collect()
    };
    let (old, new) = (ptrs(before), ptrs(after));
    let key = |s: &ServiceSpec| (s.namespace.clone(), s.name.get().clone());
    let mut changes = ServiceChanges::default();
    for v in &after.services {
        if !old.contains(&Arc::as_ptr(v)) {
            changes.changed.push(v.clone());
        }
    }
    let rebuilt: HashSet<(String, String)> = changes.changed.iter().map(|v| key(v)).collect();
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

/// Whether two discovered workloads say the same. Every field is named,
/// so that one added to [`WorkloadSpec`] cannot be missed here.
fn same_workload(a: &WorkloadSpec, b: &WorkloadSpec) -> bool {
    let WorkloadSpec {
        name,
        namespace,
        service_account,
        cgroup,
        authorization,
        netns,
        rate_limit,
    } = a;
    let same_authorization = match (authorization, &b.authorization) {
        (None, None) => true,
        (Some(x), Some(y)) => {
            let Authorization {
                default,
                allow,
                deny,
                requests,
                request_sources,
            } = x;
            *default == y.default
                && *allow == y.allow
                && *deny == y.deny
                && *requests == y.requests
                && *request_sources == y.request_sources
        }
        _ => false,
    };
    *name == b.name
        && *namespace == b.namespace
        && *service_account == b.service_account
        && *cgroup == b.cgroup
        && *netns == b.netns
        && *rate_limit == b.rate_limit
        && same_authorization
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Decision, EndpointSpec, Mode, PeerNode};

    const FILE: &str = "\
node:
  name: node-a
kubernetes: {}
services:
  - name: payments
    address: 10.96.0.10
    port: 8080
    endpoints:
      - address: 127.0.0.1
        port: 9001
";

    fn service(name: &str, address: &str) -> Arc<ServiceSpec> {
        Arc::new(ServiceSpec::new(
            name.into(),
            "shop".into(),
            address.parse().unwrap(),
            8080,
            Mode::default(),
            vec![EndpointSpec::new("198.18.0.1".parse().unwrap(), 80)],
        ))
    }

    #[test]
    fn a_refusal_names_the_discovered_service_and_the_one_it_collides_with() {
        let config = Config::parse(FILE, "t.yaml").unwrap();
        let services = [
            service("checkout", "10.96.0.10"),
            service("cart", "10.96.0.11"),
        ];
        let err = check(&Entries::with(&config, &services, &[], &[])).unwrap_err();
        let DiscoveryError::Invalid { problems } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].entry,
            Some(Entry {
                kind: "service",
                name: "shop/checkout".into()
            })
        );
        assert_eq!(
            err.to_string(),
            "service shop/checkout: services[1].address: 10.96.0.10:8080 is already the \
             address of services[0] (`payments`)"
        );
    }

    fn workload(name: &str) -> WorkloadSpec {
        WorkloadSpec::new(
            name.into(),
            "shop".into(),
            "default".into(),
            format!("kubepods/{name}"),
            "/proc/1/ns/net".into(),
        )
    }

    /// Services told apart by pointer; any change to a workload or a node
    /// takes a whole rebuild.
    #[test]
    fn only_services_changed_is_told_from_a_workload_or_node_change() {
        let kept = service("checkout", "10.96.0.10");
        let before = Translated {
            services: vec![kept.clone(), service("cart", "10.96.0.11")],
            workloads: vec![workload("shop/a")],
            nodes: vec![PeerNode::new(
                "node-b".into(),
                "198.18.99.2".parse().unwrap(),
            )],
            ..Translated::default()
        };
        let after = |workloads, nodes| Translated {
            services: vec![kept.clone(), service("cart", "10.96.0.12")],
            workloads,
            nodes,
            ..Translated::default()
        };
        let same = after(before.workloads.clone(), before.nodes.clone());
        let changes = service_changes(&before, &same).expect("only services changed");
        let changed: Vec<&str> = changes.changed.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(changed, ["cart"]);
        assert!(changes.removed.is_empty(), "{:?}", changes.removed);

        let mut allowed = workload("shop/a");
        allowed.authorization = Some(Authorization::new(Decision::Allow, [], []));
        assert!(service_changes(&before, &after(vec![allowed], before.nodes.clone())).is_none());
        let moved = PeerNode::new("node-b".into(), "198.18.99.3".parse().unwrap());
        assert!(service_changes(&before, &after(before.workloads.clone(), vec![moved])).is_none());
    }
}
