//! What serde cannot check: references, uniqueness, ranges. Each section's
//! own rules live beside it (`workload::validate`, `service::validate`,
//! ...); [`Config::validate`] runs them all, in file order, and returns
//! every problem at once.

use super::{Config, Entries, Problem, mesh, policy, service, workload};

impl Config {
    /// Checks what serde cannot: references, uniqueness, ranges. Returns
    /// every problem, not just the first.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        Entries::file(self).validate()
    }
}

/// Every rule, over the file's settings and both sources' entries.
pub(super) fn all(entries: &Entries) -> Result<(), Vec<Problem>> {
    let mut problems = Vec::new();
    settings(&mut problems, entries.file);
    let workload_names = workload::validate(&mut problems, entries.workloads());
    service::validate(&mut problems, entries, &workload_names);
    mesh::validate(&mut problems, entries);

    if problems.is_empty() {
        Ok(())
    } else {
        problems.sort_by_key(|p| p.line);
        Err(problems)
    }
}

/// The file's own settings: node, agent, audit, listeners, discovery.
fn settings(problems: &mut Vec<Problem>, config: &Config) {
    if config.node.name.value.is_empty() {
        push(
            problems,
            config.node.name.referenced.line(),
            "node.name".into(),
            "must not be empty".into(),
        );
    }
    if let Err(why) = check_cgroup_path(&config.node.cgroup_root.value) {
        push(
            problems,
            config.node.cgroup_root.referenced.line(),
            "node.cgroup_root".into(),
            why,
        );
    }
    if config.agent.outbound.port() == 0 {
        push(
            problems,
            0,
            "agent.outbound".into(),
            "port must not be 0".into(),
        );
    }
    if !config.agent.capture.ip().is_loopback() || config.agent.capture.port() == 0 {
        push(
            problems,
            0,
            "agent.capture".into(),
            "must be a loopback address with a port: it is opened inside each captured \
             namespace, where only the capture hook may reach it"
                .into(),
        );
    }
    if config.audit.queue == 0 {
        push(
            problems,
            0,
            "audit.queue".into(),
            "must be at least 1".into(),
        );
    }
    if config.agent.mark == 0 {
        push(
            problems,
            0,
            "agent.mark".into(),
            "must not be 0: unmarked sockets would count as the agent's".into(),
        );
    }
    if config.agent.worker_threads == 0 {
        push(
            problems,
            0,
            "agent.worker_threads".into(),
            "must be at least 1".into(),
        );
    }
    config.check_listeners(problems);
    if let Some(hc) = config
        .kubernetes
        .as_ref()
        .and_then(|k| k.health_check.as_ref())
    {
        policy::validate_health_check(problems, "kubernetes.health_check", hc);
    }
}

/// Adds one problem.
pub(super) fn push(problems: &mut Vec<Problem>, line: u64, field: String, message: String) {
    problems.push(Problem {
        line,
        field,
        message,
    });
}

/// A cgroup path must stay below its parent: relative, no `..`, no empties.
pub(super) fn check_cgroup_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("must not be empty".into());
    }
    if path.starts_with('/') {
        return Err(format!(
            "`{path}` must be relative (to the cgroup v2 mount or node.cgroup_root)"
        ));
    }
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!(
            "`{path}` must not contain empty, `.` or `..` components"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{GOOD, problems};

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = format!(
            "{GOOD}  - name: ledger\n    address: 10.96.0.10\n    port: 8080\n    endpoints:\n      \
             - address: 127.0.0.1\n        port: 0\n        workload: nobody\n"
        );
        let found = problems(&text);
        let fields: Vec<_> = found.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "services[1].address",
                "services[1].endpoints[0].port",
                "services[1].endpoints[0].workload"
            ],
            "{found:?}"
        );
        assert_eq!(found[0].line, 19);
        assert!(found[0].message.contains("services[0] (`payments`)"));
        assert!(found[2].message.contains("unknown workload `nobody`"));
    }
}
