//! Discovered entries joined to the config file's: read into the file's
//! own types, checked by the file's own validation, so the two sources can
//! never mean different things; and, between two translations, which
//! services changed.

use std::{collections::HashSet, sync::Arc};

use serde_json::Value;

use super::{DiscoveryError, Entry, MergeProblem, Translated};
use crate::config::{Config, PeerNode, ServiceSpec, WorkloadSpec};

/// Adds the discovered services and workloads to `config` (the file's)
/// and validates the whole. An error names every problem.
pub fn merge(config: &mut Config, found: &Translated) -> Result<(), DiscoveryError> {
    merge_parts(config, &found.services, &found.workloads, &found.nodes)
}

/// Like [`merge`], with only some of the discovered services (those a
/// watch event changed): the file's, the workloads and the nodes are all
/// there, so the services given are checked against everything they name.
pub fn merge_parts(
    config: &mut Config,
    services: &[Arc<Value>],
    workloads: &[Value],
    nodes: &[Value],
) -> Result<(), DiscoveryError> {
    let services: Vec<ServiceSpec> = read(services.iter().map(|s| &**s), "service")?;
    let workloads: Vec<WorkloadSpec> = read(workloads, "workload")?;
    // A node the file lists keeps the file's address.
    let nodes: Vec<PeerNode> = read(nodes, "node")?;
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
    config
        .validate()
        .map_err(|problems| DiscoveryError::Invalid {
            problems: problems
                .into_iter()
                .map(|p| MergeProblem {
                    entry: entry_of(config, &p.field),
                    field: p.field,
                    message: p.message,
                })
                .collect(),
        })
}

/// The same types and field rules as the file, read straight from the
/// JSON values (locations are unknown: the objects have no lines).
fn read<'v, T: serde::de::DeserializeOwned>(
    values: impl IntoIterator<Item = &'v Value>,
    kind: &'static str,
) -> Result<Vec<T>, DiscoveryError> {
    values
        .into_iter()
        .map(|v| {
            T::deserialize(v).map_err(|error| DiscoveryError::Unreadable {
                entry: Entry {
                    kind,
                    name: name_of(kind, v),
                },
                error,
            })
        })
        .collect()
}

/// A discovered entry's name as its JSON says it: `namespace/name` for a
/// service (a workload's name has its namespace already), else its name.
fn name_of(kind: &str, value: &Value) -> String {
    let name = value["name"].as_str().unwrap_or("?");
    match value["namespace"].as_str() {
        Some(ns) if kind == "service" => format!("{ns}/{name}"),
        _ => name.to_owned(),
    }
}

/// The entry a validation field (`services[3].address`) is in, if it is
/// in one of the lists discovery adds to.
fn entry_of(config: &Config, field: &str) -> Option<Entry> {
    let (list, rest) = field.split_once('[')?;
    let index: usize = rest.split_once(']')?.0.parse().ok()?;
    let (kind, name) = match list {
        "services" => {
            let s = config.services.get(index)?;
            ("service", format!("{}/{}", s.namespace, s.name.value))
        }
        "workloads" => ("workload", config.workloads.get(index)?.name.value.clone()),
        "nodes" => ("node", config.nodes.get(index)?.name.value.clone()),
        _ => return None,
    };
    Some(Entry { kind, name })
}

/// The services (config entries, by namespace and name) that differ
/// between two translations: `changed` to build anew, `removed` to drop.
#[derive(Debug, Default)]
pub struct ServiceChanges {
    pub changed: Vec<Arc<Value>>,
    pub removed: Vec<(String, String)>,
}

/// What `after` changes of `before`, when only services changed (told by
/// pointer: [`Translator`](super::incremental::Translator) shares what it did not translate
/// again). None when the workloads or the nodes changed too, which takes
/// a whole rebuild.
pub fn service_changes(before: &Translated, after: &Translated) -> Option<ServiceChanges> {
    if before.workloads != after.workloads || before.nodes != after.nodes {
        return None;
    }
    // By pointer: no key is built for the thousands that stayed.
    let ptrs =
        |t: &Translated| -> HashSet<*const Value> { t.services.iter().map(Arc::as_ptr).collect() };
    let (old, new) = (ptrs(before), ptrs(after));
    let key = |v: &Value| {
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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

    fn service(name: &str, address: &str) -> Arc<Value> {
        Arc::new(json!({
            "name": name,
            "namespace": "shop",
            "address": address,
            "port": 8080,
            "endpoints": [{ "address": "198.18.0.1", "port": 80 }],
        }))
    }

    #[test]
    fn a_refusal_names_the_discovered_service_and_the_one_it_collides_with() {
        let mut config = Config::parse(FILE, "t.yaml").unwrap();
        let services = [
            service("checkout", "10.96.0.10"),
            service("cart", "10.96.0.11"),
        ];
        let err = merge_parts(&mut config, &services, &[], &[]).unwrap_err();
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

    #[test]
    fn an_entry_that_does_not_read_is_named() {
        let mut config = Config::parse(FILE, "t.yaml").unwrap();
        let mut bad = (*service("checkout", "10.96.0.20")).clone();
        bad["port"] = json!("eighty");
        let err = merge_parts(&mut config, &[Arc::new(bad)], &[], &[]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read a discovered service shop/checkout: "),
            "{err}"
        );
        assert!(matches!(err, DiscoveryError::Unreadable { .. }), "{err:?}");
    }
}
