//! Discovered entries joined to the config file's: read into the file's
//! own types, checked by the file's own validation, so the two sources can
//! never mean different things; and, between two translations, which
//! services changed.

use std::{collections::HashSet, sync::Arc};

use serde_json::Value;

use super::Translated;
use crate::config::{Config, PeerNode, ServiceSpec, WorkloadSpec};

/// Adds the discovered services and workloads to `config` (the file's)
/// and validates the whole. An error names every problem.
pub fn merge(config: &mut Config, found: &Translated) -> Result<(), String> {
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
) -> Result<(), String> {
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
    config.validate().map_err(|problems| {
        problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// The same types and field rules as the file, read straight from the
/// JSON values (locations are unknown: the objects have no lines).
fn read<'v, T: serde::de::DeserializeOwned>(
    values: impl IntoIterator<Item = &'v Value>,
    what: &str,
) -> Result<Vec<T>, String> {
    values
        .into_iter()
        .map(T::deserialize)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot read a discovered {what}: {e}"))
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
