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
        FIELDS
            .iter()
            .filter(|f| (f.differs)(self, next))
            .map(|f| f.name)
            .collect()
    }

    /// This file as a reload applies it now: its restart-only fields
    /// replaced by those of `running`. The catalog reads some of them
    /// (`agent.connect_timeout` as services' default, `agent.inbound_port`
    /// to dial peers, the node's name and trust domain); built from the
    /// file as read, it would apply part of a change that `sluice status`
    /// reports as waiting for a restart.
    pub fn keeping_restart_only_of(&self, running: &Config) -> Config {
        let mut kept = self.clone();
        for f in &FIELDS {
            (f.keep)(&mut kept, running);
        }
        kept
    }
}

/// One field of [`RESTART_ONLY`]: how a change to it shows, and how a
/// reload keeps the running value. Both sit beside its name so that none
/// of the three can drift from the others.
struct Field {
    name: &'static str,
    differs: fn(&Config, &Config) -> bool,
    keep: fn(&mut Config, &Config),
}

const FIELDS: [Field; RESTART_ONLY.len()] = [
    Field {
        name: "agent",
        differs: |a, b| a.agent != b.agent,
        keep: |c, r| c.agent = r.agent.clone(),
    },
    Field {
        name: "node.name",
        differs: |a, b| a.node.name.get() != b.node.name.get(),
        keep: |c, r| c.node.name = r.node.name.clone(),
    },
    Field {
        name: "node.cgroup_root",
        differs: |a, b| a.node.cgroup_root.get() != b.node.cgroup_root.get(),
        keep: |c, r| c.node.cgroup_root = r.node.cgroup_root.clone(),
    },
    Field {
        name: "node.address",
        differs: |a, b| a.node.address != b.node.address,
        keep: |c, r| c.node.address = r.node.address,
    },
    Field {
        name: "mesh.trust_domain",
        differs: |a, b| a.mesh.trust_domain.get() != b.mesh.trust_domain.get(),
        keep: |c, r| c.mesh.trust_domain = r.mesh.trust_domain.clone(),
    },
    Field {
        name: "mesh.certificates",
        differs: |a, b| a.mesh.certificates != b.mesh.certificates,
        keep: |c, r| c.mesh.certificates = r.mesh.certificates.clone(),
    },
    Field {
        name: "mesh.allow_tls12",
        differs: |a, b| a.mesh.allow_tls12 != b.mesh.allow_tls12,
        keep: |c, r| c.mesh.allow_tls12 = r.mesh.allow_tls12,
    },
    Field {
        name: "mesh.inbound_handshake_timeout",
        differs: |a, b| a.mesh.inbound_handshake_timeout != b.mesh.inbound_handshake_timeout,
        keep: |c, r| c.mesh.inbound_handshake_timeout = r.mesh.inbound_handshake_timeout,
    },
    Field {
        name: "mesh.inbound_limits",
        differs: |a, b| a.mesh.inbound_limits != b.mesh.inbound_limits,
        keep: |c, r| c.mesh.inbound_limits = r.mesh.inbound_limits,
    },
    Field {
        name: "mesh.tunnels",
        differs: |a, b| a.mesh.tunnels != b.mesh.tunnels,
        keep: |c, r| c.mesh.tunnels = r.mesh.tunnels,
    },
    Field {
        name: "kubernetes",
        differs: |a, b| !same_discovery(a.kubernetes.as_ref(), b.kubernetes.as_ref()),
        // The file's health check applies at once; the rest stays.
        keep: |c, r| {
            let health_check = c.kubernetes.as_mut().and_then(|k| k.health_check.take());
            c.kubernetes = r.kubernetes.clone();
            if let Some(k) = &mut c.kubernetes {
                k.health_check = health_check;
            }
        },
    },
    Field {
        name: "audit",
        differs: |a, b| a.audit != b.audit,
        keep: |c, r| c.audit = r.audit.clone(),
    },
];

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
        let names: Vec<&str> = super::FIELDS.iter().map(|f| f.name).collect();
        assert_eq!(names, super::RESTART_ONLY);
        assert!(c.restart_only_changes(&c).is_empty());
    }

    /// A reload builds from the file with the running restart-only
    /// fields: nothing of a change that waits is applied early, and the
    /// rest of the file is.
    #[test]
    fn a_reload_keeps_every_running_restart_only_field_and_nothing_else() {
        let running = parse("");
        let next = parse(
            "agent:\n  connect_timeout: 2s\n  inbound_port: 16008\n\
             mesh:\n  trust_domain: other.example\n  allow_tls12: true\n\
             \x20 inbound_handshake_timeout: 9s\n\
             \x20 tunnels:\n    idle_timeout: 5s\n\
             \x20 inbound_limits:\n    max_connections: 7\n\
             audit:\n  queue: 10\n\
             nodes:\n  - name: b\n    address: 10.0.0.2\n",
        );
        assert_eq!(running.restart_only_changes(&next).len(), 7);
        let applied = next.keeping_restart_only_of(&running);
        assert!(running.restart_only_changes(&applied).is_empty());
        assert_eq!(applied.agent.connect_timeout, running.agent.connect_timeout);
        assert_eq!(applied.agent.inbound_port, running.agent.inbound_port);
        assert_eq!(applied.nodes.len(), 1, "peer nodes are applied at once");
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
