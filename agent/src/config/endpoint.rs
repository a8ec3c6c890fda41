//! A service's `endpoints`: the instances behind it, and what makes one
//! dialable.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use super::Spanned;
use serde::Deserialize;

use super::{Problem, ServiceSpec, unspanned, validate::push};

/// One instance behind a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub address: Spanned<IpAddr>,
    pub port: Spanned<u16>,
    #[serde(default = "default_weight")]
    pub weight: Spanned<u32>,
    /// Node the endpoint runs on; defaults to this node.
    #[serde(default)]
    pub node: Option<String>,
    /// Zone the endpoint runs in; defaults to this node's zone when the
    /// endpoint is on this node.
    #[serde(default)]
    pub zone: Option<String>,
    /// Workload serving this endpoint, when it is one of this node's.
    #[serde(default)]
    pub workload: Option<Spanned<String>>,
    /// Service account the endpoint runs as (namespace: the service's),
    /// for endpoints on other nodes: the identity their agent must present.
    #[serde(default)]
    pub service_account: Option<String>,
    /// The pod behind an endpoint on another node (Kubernetes only): the
    /// identity its agent must present is its service account, read from
    /// the API server the first time a connection goes to it.
    #[serde(default)]
    pub pod: Option<PodRef>,
}

/// A pod, as an EndpointSlice's `targetRef` names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// Tells a pod from a later one of the same name (a StatefulSet's).
    #[serde(default)]
    pub uid: Option<String>,
}

impl EndpointSpec {
    /// An endpoint no file lists (one discovery found): no locations,
    /// weight 1, and nothing else known yet.
    pub fn new(address: IpAddr, port: u16) -> EndpointSpec {
        EndpointSpec {
            address: unspanned(address),
            port: unspanned(port),
            weight: default_weight(),
            node: None,
            zone: None,
            workload: None,
            service_account: None,
            pod: None,
        }
    }

    /// The same endpoint, served by `workload` (one of this node's).
    pub fn served_by(mut self, workload: String) -> EndpointSpec {
        self.workload = Some(unspanned(workload));
        self
    }
}

fn default_weight() -> Spanned<u32> {
    unspanned(1)
}

/// Each endpoint of `service` (found at `at`): a port, an address that can
/// be dialled, of the service address's family, listed once, a weight of
/// at least 1, and a workload the config defines (`workload_names`).
pub(super) fn validate(
    problems: &mut Vec<Problem>,
    at: &str,
    service: &ServiceSpec,
    workload_names: &HashMap<&str, usize>,
) {
    let mut seen = HashSet::new();
    for (j, e) in service.endpoints.iter().enumerate() {
        let at = format!("{at}.endpoints[{j}]");
        if e.port.value == 0 {
            push(
                problems,
                e.port.referenced.line(),
                format!("{at}.port"),
                "must not be 0".into(),
            );
        }
        if e.address.value.is_unspecified() {
            push(
                problems,
                e.address.referenced.line(),
                format!("{at}.address"),
                format!("{} cannot be dialled", e.address.value),
            );
        }
        if let IpAddr::V6(v6) = e.address.value
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            push(
                problems,
                e.address.referenced.line(),
                format!("{at}.address"),
                format!("{v6} is an IPv4 address in IPv6 form; write it as {v4}"),
            );
        } else if e.address.value.is_ipv4() != service.address.value.to_canonical().is_ipv4() {
            // The kernel's tables (kernel mode, fail_open) cannot
            // send an IPv4 socket to an IPv6 address; one rule for
            // every mode. A dual-stack service is two services.
            push(
                problems,
                e.address.referenced.line(),
                format!("{at}.address"),
                format!(
                    "{} is not of the family of the service's address {}; a dual-stack \
                     service is two services, one per family",
                    e.address.value, service.address.value
                ),
            );
        }
        if e.weight.value == 0 {
            push(
                problems,
                e.weight.referenced.line(),
                format!("{at}.weight"),
                "must be at least 1 (remove the endpoint to send it nothing)".into(),
            );
        }
        if !seen.insert((e.address.value, e.port.value)) {
            push(
                problems,
                e.address.referenced.line(),
                format!("{at}.address"),
                format!(
                    "{}:{} is listed twice in this service",
                    e.address.value, e.port.value
                ),
            );
        }
        if let Some(w) = &e.workload
            && !workload_names.contains_key(w.value.as_str())
        {
            push(
                problems,
                w.referenced.line(),
                format!("{at}.workload"),
                format!("unknown workload `{}`; define it under workloads", w.value),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{GOOD, problems};

    #[test]
    fn all_zero_weights_are_refused() {
        let text = GOOD
            .replace(
                "        port: 9001\n",
                "        port: 9001\n        weight: 0\n",
            )
            .replace("        weight: 3\n", "        weight: 0\n");
        let found = problems(&text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.iter().all(|p| p.field.ends_with(".weight")));
    }
}
