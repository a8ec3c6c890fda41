//! Two Sluice nodes in network namespaces joined by veth, an echo backend
//! on node B and the bench's client workload on node A: the mTLS paths.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use sluice_testkit::{
    config::{Endpoint, PeerNode, Tunnels, Workload},
    netns::{self, Netns},
    port::free_port,
};

use super::{Proc, echo_service, node, start_agent, start_backend, wait_ready};

/// A running pair of nodes.
pub(super) struct MeshPair {
    /// Node A's config (the client's side).
    pub config: PathBuf,
    /// Node B's.
    pub config_b: PathBuf,
    /// Both agents: memory and CPU count for the path.
    pub pids: Vec<u32>,
    /// A and B; the processes in them stop first (they are in `procs`).
    pub netns: [Netns; 2],
}

/// Deletes the node namespaces of earlier runs that were killed (their
/// names end in the pid of a run that is gone): a signal handler cannot
/// run `ip netns del`. A running bench's namespaces are left alone.
pub(super) fn remove_stale_namespaces() {
    let Ok(names) = std::fs::read_dir(netns::NETNS_DIR) else {
        return;
    };
    for name in names
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
    {
        let Some(pid) = name
            .strip_prefix("sluice-bench-")
            .and_then(|rest| rest.rsplit('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            println!("== removing network namespace {name}, left by an interrupted run");
            if let Err(e) = crate::run(Command::new("ip").args(["netns", "del", &name])) {
                println!("   {e:#}");
            }
        }
    }
}

/// Starts the pair `name` on subnet 198.19.`subnet`.0/24 with the service
/// `vip`, its connections between the nodes in tunnels of so many streams
/// each when `tunnels` says.
pub(super) fn start(
    dir: &Path,
    sluice: &Path,
    state: &Path,
    (name, subnet, vip): (&str, u8, &str),
    tunnels: Option<usize>,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<MeshPair> {
    let tag = std::process::id();
    let netns = [
        Netns::create(&format!("sluice-bench-{name}-a-{tag}"))?,
        Netns::create(&format!("sluice-bench-{name}-b-{tag}"))?,
    ];
    let a_addr: IpAddr = format!("198.19.{subnet}.1").parse()?;
    let b_addr: IpAddr = format!("198.19.{subnet}.2").parse()?;
    let (a_if, b_if) = (format!("v{name}a"), format!("v{name}b"));
    netns::veth(&netns[0], &a_if, &netns[1], &b_if)?;
    netns[0].ip(&["addr", "add", &format!("{a_addr}/24"), "dev", &a_if])?;
    netns[1].ip(&["addr", "add", &format!("{b_addr}/24"), "dev", &b_if])?;
    let backend = netns[1].run(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| start_backend(l).map_err(std::io::Error::other))
    })?;
    let inbound = free_port()?;
    let config_a = dir.join(format!("sluice-{name}-a.yaml"));
    let config_b = dir.join(format!("sluice-{name}-b.yaml"));
    let mut nodes = Vec::new();
    for (me, peer, addr, peer_addr) in [("a", "b", a_addr, b_addr), ("b", "a", b_addr, a_addr)] {
        let mut c = node(
            me,
            &format!("sluice-bench-{name}-{me}"),
            &format!("{name}-{me}"),
            state,
        )?;
        c.node.address = Some(addr);
        c.agent.inbound_port = Some(inbound);
        c.nodes = vec![PeerNode {
            name: peer.into(),
            address: peer_addr,
        }];
        // Said either way: the per-connection row must not follow the
        // agent's default.
        c.mesh.get_or_insert_with(Default::default).tunnels = Some(Tunnels {
            enabled: tunnels.is_some(),
            max_streams_per_connection: tunnels,
            ..Default::default()
        });
        nodes.push(c);
    }
    let (mut a, mut b) = (nodes.remove(0), nodes.remove(0));
    a.services = vec![echo_service(
        vip,
        Endpoint::new(backend).remote("b", Some("echo")),
    )?];
    b.workloads = vec![Workload::new("echo", "bench", "echo")];
    b.services = vec![echo_service(vip, Endpoint::new(backend).workload("echo"))?];
    a.write(&config_a)?;
    b.write(&config_b)?;
    // One CA for both nodes, made before either agent starts: two agents
    // making it at once would race on its key file.
    if !state.join("ca/ca.pem").exists() {
        crate::run(
            std::process::Command::new(sluice)
                .args(["ca", "init", "--config"])
                .arg(&config_a),
        )?;
    }
    let mut pids = Vec::new();
    for (config, ns, label) in [(&config_a, &netns[0], "a"), (&config_b, &netns[1], "b")] {
        procs.push(start_agent(
            sluice,
            config,
            Some(ns),
            &format!("sluice {name} node {label}"),
        )?);
        pids.push(procs.last().map(Proc::pid).unwrap_or(0));
    }
    wait_ready(sluice, &config_a, Some(&netns[0]))?;
    wait_ready(sluice, &config_b, Some(&netns[1]))?;
    Ok(MeshPair {
        config: config_a,
        config_b,
        pids,
        netns,
    })
}
