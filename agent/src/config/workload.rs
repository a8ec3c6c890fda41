//! The `workloads` section: the process groups the agent meshes, each
//! known to the connect hook by its cgroup.

use std::{collections::HashMap, path::PathBuf};

use super::Spanned;
use serde::Deserialize;

use super::{
    Authorization, Problem, RateLimit,
    requests::validate_rate_limit,
    unspanned,
    validate::{check_cgroup_path, push},
};

/// A process group the agent meshes: the connect hook knows it by cgroup.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: Spanned<String>,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// cgroup path below `node.cgroup_root`; defaults to the name.
    #[serde(default)]
    pub cgroup: Option<Spanned<String>>,
    /// Who may reach this workload through the inbound listener.
    #[serde(default)]
    pub authorization: Option<Authorization>,
    /// The workload's own network namespace (a pod), as a path such as
    /// /var/run/netns/NAME; none: the agent's namespace.
    #[serde(default)]
    pub netns: Option<Spanned<PathBuf>>,
    /// Requests to this workload allowed per second (request services).
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

impl WorkloadSpec {
    /// A workload no file lists (a pod discovery found): in its own
    /// `cgroup` and network namespace `netns`, with no locations and no
    /// authorization yet.
    pub fn new(
        name: String,
        namespace: String,
        service_account: String,
        cgroup: String,
        netns: PathBuf,
    ) -> WorkloadSpec {
        WorkloadSpec {
            name: unspanned(name),
            namespace,
            service_account,
            cgroup: Some(unspanned(cgroup)),
            authorization: None,
            netns: Some(unspanned(netns)),
            rate_limit: None,
        }
    }

    /// The workload's cgroup, relative to `node.cgroup_root`.
    pub fn cgroup(&self) -> &str {
        self.cgroup.as_ref().map_or(&self.name.value, |c| &c.value)
    }
}

pub(super) fn default_namespace() -> String {
    "default".to_owned()
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// Names unique, cgroups valid and unique (the agent tells workloads apart
/// by cgroup), namespaces absolute. Returns each workload's index by name,
/// for the endpoints that name one.
pub(super) fn validate<'a>(
    problems: &mut Vec<Problem>,
    workloads: &[&'a WorkloadSpec],
) -> HashMap<&'a str, usize> {
    let mut workload_names: HashMap<&str, usize> = HashMap::new();
    let mut cgroups: HashMap<&str, usize> = HashMap::new();
    for (i, w) in workloads.iter().enumerate() {
        let line = w.name.referenced.line();
        if w.name.value.is_empty() {
            push(
                problems,
                line,
                format!("workloads[{i}].name"),
                "must not be empty".into(),
            );
        }
        if let Some(first) = workload_names.insert(&w.name.value, i) {
            push(
                problems,
                line,
                format!("workloads[{i}].name"),
                format!(
                    "workload `{}` is already defined by workloads[{first}]",
                    w.name.value
                ),
            );
        }
        if let Some(ns) = &w.netns
            && !ns.value.is_absolute()
        {
            push(
                problems,
                ns.referenced.line(),
                format!("workloads[{i}].netns"),
                format!(
                    "`{}` is not an absolute path (e.g. /var/run/netns/NAME)",
                    ns.value.display()
                ),
            );
        }
        if let Some(limit) = &w.rate_limit {
            validate_rate_limit(problems, &format!("workloads[{i}]"), limit);
        }
        let cg_line = w.cgroup.as_ref().map_or(line, |c| c.referenced.line());
        if let Err(why) = check_cgroup_path(w.cgroup()) {
            push(problems, cg_line, format!("workloads[{i}].cgroup"), why);
        }
        if let Some(first) = cgroups.insert(w.cgroup(), i) {
            push(
                problems,
                cg_line,
                format!("workloads[{i}].cgroup"),
                format!(
                    "cgroup `{}` is already used by workloads[{first}]; the agent \
                     could not tell the two workloads apart",
                    w.cgroup()
                ),
            );
        }
    }
    workload_names
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{GOOD, problems};

    #[test]
    fn cgroup_paths_cannot_escape() {
        let text = GOOD.replace(
            "    service_account: checkout\n",
            "    service_account: checkout\n    cgroup: ../escape\n",
        );
        let found = problems(&text);
        assert_eq!(found[0].field, "workloads[0].cgroup");
        assert_eq!(found[0].line, 7);
    }
}
