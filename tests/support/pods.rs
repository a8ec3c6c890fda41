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

/// Runs python `script` as a process of cgroup `cgroup` (made if missing:
/// a container's, as the kubelet would) inside the pod namespace `pod`.
pub fn in_pod(config: &AgentConfig, pod: &Netns, cgroup: &str, script: &str) -> Command {
    let dir = config.cgroup_root_path().join(cgroup);
    std::fs::create_dir_all(&dir).unwrap();
    let procs = dir.join("cgroup.procs");
    let mut cmd = Command::new("timeout");
    cmd.args(["--signal=KILL", "30", "bash", "-c"]).arg(format!(
        "echo $$ > {} && exec python3 -c '{script}'",
        procs.display()
    ));
    pod.enter_on_exec(&mut cmd);
    cmd
}

/// How the kubelet and the container runtime name a pod's cgroups. Every
/// process of a pod lives in a container cgroup below the pod's (a pause
/// container beside the app's), never in the pod cgroup itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `kubepods/<qos>/pod<uid>/<container id>`.
    Cgroupfs,
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope`.
    SystemdContainerd,
    /// The same slices, `crio-<id>.scope`.
    SystemdCrio,
}

/// A pod's quality-of-service class: guaranteed pods sit one level higher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    fn name(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }
}

impl Layout {
    /// Where the kubelet puts every pod, relative to the node's cgroup root
    /// in these tests (`kubernetes.pod_cgroups`).
    pub fn kubepods(self) -> &'static str {
        match self {
            Layout::Cgroupfs => "kubepods",
            Layout::SystemdContainerd | Layout::SystemdCrio => "kubepods.slice",
        }
    }

    /// The pod's cgroup, relative to the node's cgroup root.
    pub fn pod(self, qos: Qos, uid: &str) -> String {
        match (self, qos.name()) {
            (Layout::Cgroupfs, None) => format!("kubepods/pod{uid}"),
            (Layout::Cgroupfs, Some(q)) => format!("kubepods/{q}/pod{uid}"),
            (_, None) => format!("kubepods.slice/kubepods-pod{}.slice", uid.replace('-', "_")),
            (_, Some(q)) => format!(
                "kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{}.slice",
                uid.replace('-', "_")
            ),
        }
    }

    /// A container's cgroup below `pod`; `n` makes its id (a new one for
    /// each container, and for each restart of one).
    pub fn container(self, pod: &str, n: usize) -> String {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{:032x}{:016x}{n:016x}", std::process::id(), unique);
        match self {
            Layout::Cgroupfs => format!("{pod}/{id}"),
            Layout::SystemdContainerd => format!("{pod}/cri-containerd-{id}.scope"),
            Layout::SystemdCrio => format!("{pod}/crio-{id}.scope"),
        }
    }
}

/// Removes a cgroup directory and every cgroup below it, deepest first
/// (cgroupfs refuses to remove a cgroup with children or processes).
pub fn remove_cgroup_tree(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Kills every process in a cgroup and the cgroups below it (a pod's
/// holder leaves its own children behind when killed), waits until none is
/// left, and removes the tree.
pub fn kill_cgroup_tree(dir: &std::path::Path) {
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    super::wait_until(std::time::Duration::from_secs(5), || {
        std::fs::read_to_string(dir.join("cgroup.events"))
            .map_or(true, |e| e.contains("populated 0"))
    });
    remove_cgroup_tree(dir);
}
