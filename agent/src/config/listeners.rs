//! The TCP listeners the agent opens in the node's network namespace, and
//! the rules they must keep: the admin API on loopback only, the metrics
//! listener on a port of its own, no two on one port.

use std::net::SocketAddr;

use super::{Config, Problem, validate::push};

/// One TCP listener the agent opens in the node's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// The config field that sets it, e.g. `agent.metrics`.
    pub field: &'static str,
    pub addr: SocketAddr,
    /// Line of the field in the file; 0 when defaulted or not spanned.
    pub line: u64,
}

impl Listener {
    /// Whether the two cannot both be bound: the same port on the same
    /// address, or on any address when one is the wildcard.
    /// Port 0 is refused on its own, never counted as an overlap.
    fn overlaps(&self, other: &Listener) -> bool {
        self.addr.port() != 0
            && self.addr.port() == other.addr.port()
            && (self.addr.ip() == other.addr.ip()
                || self.addr.ip().is_unspecified()
                || other.addr.ip().is_unspecified())
    }
}

impl Config {
    /// The address of the inbound mTLS listener.
    pub fn inbound_address(&self) -> SocketAddr {
        SocketAddr::new(self.node.address, self.agent.inbound_port)
    }

    /// Every TCP listener the agent opens in the node's network namespace
    /// (the outbound listeners inside pods' namespaces are not the node's).
    pub fn listeners(&self) -> Vec<Listener> {
        let mut listeners = vec![
            Listener {
                field: "agent.outbound",
                addr: SocketAddr::V4(self.agent.outbound),
                line: 0,
            },
            Listener {
                field: "agent.capture",
                addr: SocketAddr::V4(self.agent.capture),
                line: 0,
            },
            Listener {
                field: "agent.inbound_port",
                addr: self.inbound_address(),
                line: 0,
            },
            Listener {
                field: "agent.admin",
                addr: self.agent.admin.value,
                line: self.agent.admin.referenced.line(),
            },
        ];
        if let Some(metrics) = &self.agent.metrics {
            listeners.push(Listener {
                field: "agent.metrics",
                addr: metrics.value,
                line: metrics.referenced.line(),
            });
        }
        listeners
    }

    /// The admin API on loopback only, the metrics listener on a port of
    /// its own, and no two listeners on one port.
    pub(super) fn check_listeners(&self, problems: &mut Vec<Problem>) {
        let admin = &self.agent.admin;
        if !admin.value.ip().to_canonical().is_loopback() {
            push(
                problems,
                admin.referenced.line(),
                "agent.admin".into(),
                format!(
                    "{} is not a loopback address: the admin API shows connections, \
                     workloads and endpoints and streams traces, so it listens on \
                     127.0.0.1 or ::1 only; serve /metrics, /healthz and /readyz to \
                     the network with agent.metrics (e.g. 0.0.0.0:15090)",
                    admin.value
                ),
            );
        }
        if let Some(old) = &self.agent.admin_on_node_address {
            push(
                problems,
                old.referenced.line(),
                "agent.admin_on_node_address".into(),
                "was removed: the admin API listens on loopback only; delete this line \
                 and set agent.metrics (e.g. 0.0.0.0:15090) to serve /metrics, /healthz \
                 and /readyz on the node's address"
                    .into(),
            );
        }
        if let Some(metrics) = &self.agent.metrics
            && metrics.value.port() == 0
        {
            push(
                problems,
                metrics.referenced.line(),
                "agent.metrics".into(),
                "port must not be 0: Prometheus and the probes need to know it".into(),
            );
        }
        let listeners = self.listeners();
        for (i, later) in listeners.iter().enumerate() {
            if let Some(first) = listeners[..i].iter().find(|l| l.overlaps(later)) {
                push(
                    problems,
                    later.line,
                    later.field.into(),
                    format!(
                        "{} overlaps {} ({}): two listeners cannot share a port on one address",
                        later.addr, first.field, first.addr
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{
        AgentConfig, Config,
        tests::{GOOD, problems},
    };

    #[test]
    fn a_non_loopback_admin_address_is_refused_with_its_line() {
        let text = format!("{GOOD}agent:\n  admin: 0.0.0.0:15020\n");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].line, found[0].field.as_str()),
            (19, "agent.admin")
        );
        assert!(found[0].message.contains("agent.metrics"), "{found:?}");
        for ok in ["127.0.0.1:15020", "127.0.0.9:1", "[::1]:15020"] {
            let c = Config::parse(&format!("{GOOD}agent:\n  admin: \"{ok}\"\n"), "t.yaml").unwrap();
            c.validate().unwrap_or_else(|p| panic!("{ok}: {p:?}"));
        }
        // An IPv4-mapped address is what it maps.
        let text = format!("{GOOD}agent:\n  admin: \"[::ffff:10.0.0.1]:15020\"\n");
        assert_eq!(problems(&text)[0].field, "agent.admin");
    }

    #[test]
    fn admin_on_node_address_is_refused_and_names_its_replacement() {
        let text = format!("{GOOD}agent:\n  admin_on_node_address: true\n");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].field, "agent.admin_on_node_address");
        assert_eq!(found[0].line, 19);
        assert!(found[0].message.contains("agent.metrics"), "{found:?}");
    }

    #[test]
    fn metrics_may_listen_on_the_node_but_not_on_another_listeners_port() {
        let c = Config::parse(
            &format!("{GOOD}agent:\n  metrics: 0.0.0.0:15090\n"),
            "t.yaml",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.agent.metrics.as_ref().map(|m| m.value),
            Some("0.0.0.0:15090".parse().unwrap())
        );
        assert_eq!(AgentConfig::default().metrics, None);
        let fields: Vec<&str> = c.listeners().iter().map(|l| l.field).collect();
        assert_eq!(
            fields,
            [
                "agent.outbound",
                "agent.capture",
                "agent.inbound_port",
                "agent.admin",
                "agent.metrics"
            ]
        );

        let text = format!("{GOOD}agent:\n  metrics: 0.0.0.0:15020\n");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].line, found[0].field.as_str()),
            (19, "agent.metrics")
        );
        assert!(
            found[0].message.contains("overlaps agent.admin"),
            "{found:?}"
        );
        let text = format!("{GOOD}agent:\n  metrics: 127.0.0.1:15008\n");
        assert!(problems(&text)[0].message.contains("agent.inbound_port"));
        let text = format!("{GOOD}agent:\n  metrics: 127.0.0.1:0\n");
        assert_eq!(
            problems(&text)[0].message,
            "port must not be 0: Prometheus and the probes need to know it"
        );
    }
}
