//! Pods for the tests: a "node" network namespace and "pods" that are each
//! a network namespace joined to the node by a veth pair, with processes
//! placed in a workload cgroup and entered into the pod's namespace.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener},
    process::Command,
    thread,
};

use super::{AgentConfig, Netns, sh};

/// A node namespace with pods attached, removed on drop (Netns drops).
pub struct Node {
    pub node: Netns,
    pub pods: Vec<(Netns, IpAddr)>,
    /// Where pods reach services on the node: an address on the node's
    /// loopback, routed from every pod through its veth.
    pub service_addr: IpAddr,
}

impl Node {
    pub fn new(pods: usize) -> Node {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 100_000);
        let node = Netns {
            name: format!("spn{tag}"),
        };
        // The node forwards between its pods, as a node's CNI does.
        sh(&format!(
            "ip netns add {0} && ip -n {0} link set lo up && \
             ip netns exec {0} sysctl -qw net.ipv4.ip_forward=1",
            node.name
        ));
        let base = 10 + (std::process::id() as usize * 7 + n * 4) % 200;
        let service_addr: IpAddr = format!("198.18.{base}.1").parse().unwrap();
        sh(&format!(
            "ip -n {} addr add {service_addr}/32 dev lo",
            node.name
        ));
        let mut list = Vec::new();
        for i in 0..pods {
            let pod = Netns {
                name: format!("spp{tag}{i}"),
            };
            let subnet = base + 1 + i;
            let (n_if, p_if) = (format!("vn{tag}{i}"), format!("vp{tag}{i}"));
            let (n_addr, p_addr) = (format!("198.18.{subnet}.1"), format!("198.18.{subnet}.2"));
            sh(&format!(
                "ip netns add {p} && ip -n {p} link set lo up && \
                 ip link add {n_if} type veth peer name {p_if} && \
                 ip link set {n_if} netns {n} && ip link set {p_if} netns {p} && \
                 ip -n {n} addr add {n_addr}/24 dev {n_if} && ip -n {p} addr add {p_addr}/24 dev {p_if} && \
                 ip -n {n} link set {n_if} up && ip -n {p} link set {p_if} up && \
                 ip -n {p} route add default via {n_addr}",
                n = node.name,
                p = pod.name
            ));
            list.push((pod, p_addr.parse().unwrap()));
        }
        Node {
            node,
            pods: list,
            service_addr,
        }
    }
}

/// A server in the node namespace that answers each line with
/// `<name> from <peer address> <line>`: the peer shows which namespace
/// the agent opened the upstream socket in.
pub fn source_echo(node: &Netns, name: &'static str, addr: SocketAddr) {
    let listener = node.run(move || TcpListener::bind(addr).expect("bind source echo"));
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let peer = stream.peer_addr().map(|a| a.ip().to_string());
                let mut out = stream.try_clone().unwrap();
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let peer = peer.as_deref().unwrap_or("?");
                    if writeln!(out, "{name} from {peer} {line}").is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Runs python `script` as a process of workload cgroup `cgroup` inside
/// the pod namespace `pod` (how a pod's own processes live).
pub fn in_pod(config: &AgentConfig, pod: &Netns, cgroup: &str, script: &str) -> Command {
    let procs = config.cgroup_root_path().join(cgroup).join("cgroup.procs");
    let mut cmd = Command::new("timeout");
    cmd.args(["--signal=KILL", "30", "bash", "-c"]).arg(format!(
        "echo $$ > {} && exec python3 -c '{script}'",
        procs.display()
    ));
    pod.enter_on_exec(&mut cmd);
    cmd
}
