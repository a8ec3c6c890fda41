//! The `agent` section: how the agent itself runs (its listeners, mark,
//! pins, threads and timeouts).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use super::Spanned;
use serde::Deserialize;

use super::{HumanDuration, unspanned};

/// How the agent runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Outbound listener that redirected connections land on (IPv4).
    pub outbound: SocketAddrV4,
    /// Capture listener, opened in each network namespace that holds a
    /// captured workload: inbound connects from outside the namespace are
    /// steered here by the sk_lookup hook (IPv4, a loopback address).
    pub capture: SocketAddrV4,
    /// SO_MARK on the agent's own sockets; the hooks never redirect them.
    pub mark: u32,
    /// bpffs directory where maps and links are pinned.
    pub pin_dir: PathBuf,
    /// Upper bound on one upstream connect.
    pub connect_timeout: HumanDuration,
    /// After SIGTERM, how long open connections may finish before the agent
    /// exits anyway.
    pub drain_timeout: HumanDuration,
    /// Data-plane worker threads.
    pub worker_threads: usize,
    /// Start with the eBPF programs' log events on (switchable at run time).
    pub ebpf_log: bool,
    /// Port of the inbound mTLS listener on `node.address`.
    pub inbound_port: u16,
    /// Where the agent keeps state: the local CA lives in `ca/` below it.
    pub state_dir: PathBuf,
    /// The admin API (health, readiness, metrics, debug views). Loopback
    /// only: its views name workloads and connections, and its traces are
    /// long-lived streams.
    pub admin: Spanned<SocketAddr>,
    /// A listener that serves `/metrics`, `/healthz` and `/readyz` and
    /// nothing else, for Prometheus and kubelet's probes; may be on the
    /// node's address. None: no such listener.
    pub metrics: Option<Spanned<SocketAddr>>,
    /// Removed: kept only so that a config still setting it gets an error
    /// that says what replaced it, rather than "unknown field".
    pub admin_on_node_address: Option<Spanned<bool>>,
    /// Let bytes between a workload and the agent skip the loopback TCP
    /// stack (sockmap + sk_msg).
    pub sockmap: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            outbound: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001),
            capture: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15006),
            mark: 0x51ce,
            pin_dir: PathBuf::from("/sys/fs/bpf/sluice"),
            connect_timeout: HumanDuration(Duration::from_secs(1)),
            drain_timeout: HumanDuration(Duration::from_secs(10)),
            worker_threads: 2,
            ebpf_log: false,
            inbound_port: 15008,
            state_dir: PathBuf::from("/var/lib/sluice"),
            admin: unspanned(SocketAddr::from((Ipv4Addr::LOCALHOST, 15020))),
            metrics: None,
            admin_on_node_address: None,
            sockmap: false,
        }
    }
}

/// Equal when the values are: where in the file a value was written does
/// not matter, so a reload that only moves lines changes nothing.
impl PartialEq for AgentConfig {
    fn eq(&self, other: &Self) -> bool {
        // Destructured without `..`, so that a new field cannot be
        // forgotten here.
        let AgentConfig {
            outbound,
            capture,
            mark,
            pin_dir,
            connect_timeout,
            drain_timeout,
            worker_threads,
            ebpf_log,
            inbound_port,
            state_dir,
            admin,
            metrics,
            admin_on_node_address,
            sockmap,
        } = self;
        *outbound == other.outbound
            && *capture == other.capture
            && *mark == other.mark
            && *pin_dir == other.pin_dir
            && *connect_timeout == other.connect_timeout
            && *drain_timeout == other.drain_timeout
            && *worker_threads == other.worker_threads
            && *ebpf_log == other.ebpf_log
            && *inbound_port == other.inbound_port
            && *state_dir == other.state_dir
            && admin.value == other.admin.value
            && metrics.as_ref().map(|m| m.value) == other.metrics.as_ref().map(|m| m.value)
            && admin_on_node_address.as_ref().map(|a| a.value)
                == other.admin_on_node_address.as_ref().map(|a| a.value)
            && *sockmap == other.sockmap
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, tests::GOOD};

    /// A reload compares `agent` sections to warn about restart-only
    /// changes; lines that merely moved are no change.
    #[test]
    fn agent_sections_compare_by_value_not_by_line() {
        let a = Config::parse(&format!("{GOOD}agent:\n  admin: 127.0.0.1:1\n"), "t.yaml").unwrap();
        let b = Config::parse(
            &format!("# moved\n{GOOD}agent:\n  admin: 127.0.0.1:1\n"),
            "t.yaml",
        )
        .unwrap();
        assert_ne!(
            a.agent.admin.referenced.line(),
            b.agent.admin.referenced.line()
        );
        assert_eq!(a.agent, b.agent);
        let c = Config::parse(&format!("{GOOD}agent:\n  admin: 127.0.0.1:2\n"), "t.yaml").unwrap();
        assert_ne!(a.agent, c.agent);
    }
}
