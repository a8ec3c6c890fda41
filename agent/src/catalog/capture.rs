//! Which local workloads have their inbound connections captured, and how:
//! derived from the modes of the services they serve.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use super::Workload;
use crate::config::Mode;

/// What a workload accepts from outside its own network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum InboundMode {
    /// Not captured: it serves only plaintext or kernel-mode services,
    /// whose callers reach it directly.
    Open,
    /// Captured; plaintext is passed on, counted and (with
    /// `audit.connections`) audited.
    Permissive,
    /// Captured; only the mesh reaches it: plaintext is refused.
    Strict,
}

impl InboundMode {
    pub fn name(self) -> &'static str {
        match self {
            InboundMode::Open => "open",
            InboundMode::Permissive => "permissive",
            InboundMode::Strict => "strict",
        }
    }
}

/// A captured workload and the destinations that lead to it.
#[derive(Debug)]
pub struct CaptureTarget {
    pub workload: Arc<Workload>,
    pub mode: InboundMode,
    /// CAPTURE keys: `(pod address, 0)` for a workload with its own
    /// network namespace (every port of the pod, an IPv6 address as well as
    /// an IPv4 one), `(0.0.0.0, port)` for one in the node's namespace (its
    /// endpoints' ports on every address of either family).
    pub keys: Vec<SocketAddr>,
}

impl CaptureTarget {
    /// Whether the workload lives in the node's own network namespace.
    pub fn in_node_namespace(&self) -> bool {
        self.workload.netns.is_none()
    }
}

/// The mode a workload gets from the services it serves: strict when all
/// of them are `mtls`; permissive when any is `permissive`, or when `mtls`
/// is mixed with plaintext or kernel-mode services (whose callers come
/// without the mesh and must still get through); open when none is
/// `mtls` or `permissive`.
fn combine(modes: &[Mode]) -> InboundMode {
    let meshed = modes
        .iter()
        .any(|m| matches!(m, Mode::Mtls | Mode::Permissive));
    if !meshed {
        return InboundMode::Open;
    }
    if modes.iter().all(|m| *m == Mode::Mtls) {
        InboundMode::Strict
    } else {
        InboundMode::Permissive
    }
}

/// Every captured workload of this node, by CAPTURE key.
pub fn targets(
    services: &[&Arc<super::Service>],
    workloads: &[Arc<Workload>],
) -> HashMap<SocketAddr, Arc<CaptureTarget>> {
    let mut served: HashMap<&str, (Vec<Mode>, Vec<SocketAddr>)> = HashMap::new();
    for s in services {
        for e in s.endpoints.iter().filter(|e| e.local) {
            let Some(w) = &e.workload else {
                continue;
            };
            let entry = served.entry(w.as_str()).or_default();
            entry.0.push(s.mode);
            entry.1.push(e.addr);
        }
    }
    let mut out = HashMap::new();
    for w in workloads {
        let Some((modes, addrs)) = served.get(w.name.as_str()) else {
            continue;
        };
        let mode = combine(modes);
        if mode == InboundMode::Open {
            continue;
        }
        let mut keys: Vec<SocketAddr> = addrs
            .iter()
            .map(|a| match w.netns {
                Some(_) => SocketAddr::new(a.ip(), 0),
                None => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), a.port()),
            })
            .collect();
        keys.sort();
        keys.dedup();
        let target = Arc::new(CaptureTarget {
            workload: w.clone(),
            mode,
            keys,
        });
        for key in &target.keys {
            // Two workloads cannot own one key; config validation keeps
            // endpoint addresses apart, so the first is kept.
            out.entry(*key).or_insert_with(|| target.clone());
        }
    }
    out
}

/// The target a captured connection to `local` belongs to, looked up in
/// the order the kernel program uses (an IPv6 `local` falls back to the
/// IPv4 node key too, as there).
pub fn lookup(
    targets: &HashMap<SocketAddr, Arc<CaptureTarget>>,
    local: SocketAddr,
) -> Option<&Arc<CaptureTarget>> {
    targets
        .get(&local)
        .or_else(|| targets.get(&SocketAddr::new(local.ip(), 0)))
        .or_else(|| {
            targets.get(&SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                local.port(),
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_combine_to_the_weakest_that_still_lets_every_caller_in() {
        assert_eq!(combine(&[Mode::Mtls, Mode::Mtls]), InboundMode::Strict);
        assert_eq!(
            combine(&[Mode::Mtls, Mode::Permissive]),
            InboundMode::Permissive
        );
        assert_eq!(
            combine(&[Mode::Mtls, Mode::Kernel]),
            InboundMode::Permissive
        );
        assert_eq!(combine(&[Mode::Plaintext, Mode::Kernel]), InboundMode::Open);
        assert_eq!(combine(&[]), InboundMode::Open);
    }
}
