//! What a reload cannot apply. The agent builds its listeners, TLS
//! context, tunnel pools, inbound limits and audit trail once, at the
//! start; a file that changes them is otherwise applied (services,
//! endpoints, policies, workloads) and these fields wait for a restart.
//! The reload says which, in the log, in `sluice status` and in
//! `sluice_config_restart_pending`, so that an operator never believes a
//! change is in force when it is not.

use super::{Config, KubernetesConfig};

/// Every field (or section) that only a restart applies, as the reload
/// names them.
pub const RESTART_ONLY: [&str; 12] = [
    "agent",
    "node.name",
    "node.cgroup_root",
    "node.address",
    "mesh.trust_domain",
    "mesh.certificates",
    "mesh.allow_tls12",
    "mesh.inbound_handshake_timeout",
    "mesh.inbound_limits",
    "mesh.tunnels",
    "kubernetes",
    "audit",
];

impl Config {
    /// The fields of [`RESTART_ONLY`] in which `next` differs from this
    /// config (the one the agent started with), in that order. Values
    /// are compared, not where they stand in the file.
    pub fn restart_only_changes(&self, next: &Config) -> Vec<&'static str> {
        compared(self, next)
            .into_iter()
            .filter_map(|(field, changed)| changed.then_some(field))
            .collect()
    }
}

/// Each field of [`RESTART_ONLY`] beside whether `b` changes it from `a`,
/// named where it is compared so that a name cannot drift from its test.
fn compared(a: &Config, b: &Config) -> [(&'static str, bool); RESTART_ONLY.len()] {
    [
        ("agent", a.agent != b.agent),
        ("node.name", a.node.name.get() != b.node.name.get()),
        (
            "node.cgroup_root",
            a.node.cgroup_root.get() != b.node.cgroup_root.get(),
        ),
        ("node.address", a.node.address != b.node.address),
        (
            "mesh.trust_domain",
            a.mesh.trust_domain.get() != b.mesh.trust_domain.get(),
        ),
        (
            "mesh.certificates",
            a.mesh.certificates != b.mesh.certificates,
        ),
        ("mesh.allow_tls12", a.mesh.allow_tls12 != b.mesh.allow_tls12),
        (
            "mesh.inbound_handshake_timeout",
            a.mesh.inbound_handshake_timeout != b.mesh.inbound_handshake_timeout,
        ),
        (
            "mesh.inbound_limits",
            a.mesh.inbound_limits != b.mesh.inbound_limits,
        ),
        ("mesh.tunnels", a.mesh.tunnels != b.mesh.tunnels),
        (
            "kubernetes",
            !same_discovery(a.kubernetes.as_ref(), b.kubernetes.as_ref()),
        ),
        ("audit", a.audit != b.audit),
    ]
}

/// The same discovery settings, but for `health_check`, which a reload
/// applies at once.
fn same_discovery(a: Option<&KubernetesConfig>, b: Option<&KubernetesConfig>) -> bool {
    let strip = |k: Option<&KubernetesConfig>| {
        k.cloned().map(|mut k| {
            k.health_check = None;
            k
        })
    };
    strip(a) == strip(b)
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, tests::GOOD};

    fn parse(tail: &str) -> Config {
        Config::parse(&format!("{GOOD}{tail}"), "t.yaml").unwrap()
    }

    #[test]
    fn each_start_only_field_is_named_and_the_rest_are_not() {
        let running = parse("");
        let cases = [
            ("agent:\n  connect_timeout: 2s\n", vec!["agent"]),
            (
                "mesh:\n  tunnels:\n    idle_timeout: 5s\n",
                vec!["mesh.tunnels"],
            ),
            (
                "mesh:\n  inbound_limits:\n    max_connections: 7\n",
                vec!["mesh.inbound_limits"],
            ),
            ("mesh:\n  allow_tls12: true\n", vec!["mesh.allow_tls12"]),
            (
                "mesh:\n  inbound_handshake_timeout: 9s\n  trust_domain: other.example\n",
                vec!["mesh.trust_domain", "mesh.inbound_handshake_timeout"],
            ),
            ("audit:\n  queue: 10\n", vec!["audit"]),
            // Applied at once: peer nodes come with the catalog.
            ("nodes:\n  - name: b\n    address: 10.0.0.2\n", vec![]),
        ];
        for (tail, expected) in cases {
            assert_eq!(
                running.restart_only_changes(&parse(tail)),
                expected,
                "{tail}"
            );
        }
    }

    /// The names compared are the names the metric declares, in order.
    #[test]
    fn every_declared_field_is_compared_under_its_name() {
        let c = parse("");
        let names: Vec<&str> = super::compared(&c, &c).iter().map(|(n, _)| *n).collect();
        assert_eq!(names, super::RESTART_ONLY);
    }

    /// A field that only moved in the file is no change.
    #[test]
    fn moved_lines_are_no_change() {
        let a = parse("mesh:\n  tunnels:\n    enabled: false\n");
        let b = Config::parse(
            &format!("# moved\n\n{GOOD}mesh:\n  tunnels:\n    enabled: false\n"),
            "t.yaml",
        )
        .unwrap();
        assert!(a.restart_only_changes(&b).is_empty());
    }
}
