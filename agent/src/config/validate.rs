//! What serde cannot check: references, uniqueness, ranges. Each section's
//! own rules live beside it (`workload::validate`, `service::validate`,
//! ...); [`Config::validate`] runs them all, in file order, and returns
//! every problem at once.

use super::{Config, Problem, mesh, service, workload};

impl Config {
    /// Checks what serde cannot: references, uniqueness, ranges. Returns
    /// every problem, not just the first.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();

        if self.node.name.value.is_empty() {
            push(
                &mut problems,
                self.node.name.referenced.line(),
                "node.name".into(),
                "must not be empty".into(),
            );
        }
        if let Err(why) = check_cgroup_path(&self.node.cgroup_root.value) {
            push(
                &mut problems,
                self.node.cgroup_root.referenced.line(),
                "node.cgroup_root".into(),
                why,
            );
        }
        if self.agent.outbound.port() == 0 {
            push(
                &mut problems,
                0,
                "agent.outbound".into(),
                "port must not be 0".into(),
            );
        }
        if !self.agent.capture.ip().is_loopback() || self.agent.capture.port() == 0 {
            push(
                &mut problems,
                0,
                "agent.capture".into(),
                "must be a loopback address with a port: it is opened inside each captured \
                 namespace, where only the capture hook may reach it"
                    .into(),
            );
        }
        if self.audit.queue == 0 {
            push(
                &mut problems,
                0,
                "audit.queue".into(),
                "must be at least 1".into(),
            );
        }
        if self.agent.mark == 0 {
            push(
                &mut problems,
                0,
                "agent.mark".into(),
                "must not be 0: unmarked sockets would count as the agent's".into(),
            );
        }
        if self.agent.worker_threads == 0 {
            push(
                &mut problems,
                0,
                "agent.worker_threads".into(),
                "must be at least 1".into(),
            );
        }
        self.check_listeners(&mut problems);
        let workload_names = workload::validate(&mut problems, &self.workloads);
        service::validate(&mut problems, self, &workload_names);
        mesh::validate(&mut problems, self);

        if problems.is_empty() {
            Ok(())
        } else {
            problems.sort_by_key(|p| p.line);
            Err(problems)
        }
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
