//! The `node` section: this machine.

use std::net::{IpAddr, Ipv4Addr};

use super::Spanned;
use serde::Deserialize;

use super::unspanned;

/// This node and where its workloads live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name; endpoints name the node they run on.
    pub name: Spanned<String>,
    /// The cgroup the redirect hooks attach to, relative to the cgroup v2
    /// mount. Every workload cgroup lives below it.
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: Spanned<String>,
    /// Zone of this node, for locality-aware load balancing.
    #[serde(default)]
    pub zone: Option<String>,
    /// This node's address: the inbound mTLS listener binds it, and other
    /// nodes dial it.
    #[serde(default = "default_node_address")]
    pub address: IpAddr,
}

fn default_node_address() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

fn default_cgroup_root() -> Spanned<String> {
    unspanned("sluice".to_owned())
}
