//! `/debug/workloads`: the workloads of this node, with what guards them
//! request by request.

use serde::{Deserialize, Serialize};

use crate::{admin::AdminState, catalog::Catalog};

/// `/debug/workloads`: one row a workload on this node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadRow {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub cgroup: String,
    pub netns: Option<String>,
    /// `agent` (the node's listener), `open` (one in its namespace) or
    /// `none`.
    pub listener: String,
    /// Its `rate_limit` (a SluicePolicy's `rateLimit` for a pod), if any.
    #[serde(default)]
    pub rate_limit: Option<RateLimitView>,
    /// `requests` rules of its policies, all sources together.
    #[serde(default)]
    pub request_rules: usize,
}

/// A workload's rate limit as `sluice workloads` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RateLimitView {
    pub requests_per_second: u32,
    pub burst: u32,
    pub per_source: bool,
    /// Requests it refused (429 / RESOURCE_EXHAUSTED) since the limit
    /// took its present settings.
    pub refused: u64,
}

pub(super) fn workloads(state: &AdminState, catalog: &Catalog) -> Vec<WorkloadRow> {
    let listening = |path: &std::path::Path| {
        state
            .pod_listeners
            .lock()
            .is_ok_and(|open| open.iter().any(|p| p == path))
    };
    catalog
        .workloads()
        .iter()
        .map(|w| WorkloadRow {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            identity: w.identity.to_string(),
            cgroup: w.cgroup.display().to_string(),
            netns: w.netns.as_ref().map(|n| n.path().display().to_string()),
            listener: match &w.netns {
                None => "agent",
                Some(n) if listening(n.path()) => "open",
                Some(_) => "none",
            }
            .to_owned(),
            rate_limit: w.rate_limit.as_ref().map(|l| {
                let (requests_per_second, burst, per_source) = l.settings;
                RateLimitView {
                    requests_per_second,
                    burst,
                    per_source,
                    refused: l.refused.get().map_or(0, |c| c.get()),
                }
            }),
            request_rules: w.policy.as_ref().map_or(0, |p| p.request_rules()),
        })
        .collect()
}
