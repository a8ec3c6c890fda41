//! Pods for the tests: a "node" network namespace and "pods" that are each
//! a network namespace joined to the node by a veth pair, with processes
//! placed in a workload cgroup and entered into the pod's namespace.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener},
    process::Command,
    thread,
};

use super::{AgentConfig, ChildGuard, Client, Held, Netns, SpawnGuarded, cgroup, netns, unique};

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
        let node = Netns::create(&unique("node")).unwrap();
        // The node forwards between its pods, as a node's CNI does.
        super::sh(&format!(
            "ip netns exec {} sysctl -qw net.ipv4.ip_forward=1",
            node.name()
        ))
        .unwrap();
        let base = 10 + (std::process::id() as usize * 7 + n * 4) % 200;
        let service_addr: IpAddr = format!("198.18.{base}.1").parse().unwrap();
        let service_net = format!("{service_addr}/32");
        node.ip(&["addr", "add", &service_net, "dev", "lo"])
            .unwrap();
        let mut list = Vec::new();
        for i in 0..pods {
            let pod = Netns::create(&unique(&format!("pod{i}"))).unwrap();
            let subnet = base + 1 + i;
            let n_if = format!("vn{i}");
            let (n_addr, p_addr) = (format!("198.18.{subnet}.1"), format!("198.18.{subnet}.2"));
            netns::veth(&node, &n_if, &pod, "eth0").unwrap();
            node.ip(&["addr", "add", &format!("{n_addr}/24"), "dev", &n_if])
                .unwrap();
            pod.ip(&["addr", "add", &format!("{p_addr}/24"), "dev", "eth0"])
                .unwrap();
            pod.ip(&["route", "add", "default", "via", &n_addr])
                .unwrap();
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

/// Runs python `script` as a process of cgroup `container` (made if
/// missing: a container's, as the kubelet would) inside the pod namespace
/// `pod`, for 30 s at the most.
pub fn in_pod(config: &AgentConfig, pod: &Netns, container: &str, script: &str) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["--signal=KILL", "30", "python3", "-c", script]);
    placed(cmd, config, pod, container)
}

/// Runs `client` as a process of cgroup `container` inside the pod
/// namespace `pod`, for 30 s at the most.
pub fn in_pod_client(
    config: &AgentConfig,
    pod: &Netns,
    container: &str,
    client: &Client,
) -> Command {
    placed(super::client::command(client, 30), config, pod, container)
}

/// The lines `client` prints, run in cgroup `container` of pod `pod`.
pub fn run_in_pod(
    config: &AgentConfig,
    pod: &Netns,
    container: &str,
    client: impl Into<Client>,
) -> Vec<String> {
    let out = in_pod_client(config, pod, container, &client.into())
        .output()
        .expect("run the client");
    super::lines(&out)
}

/// A connection to `to` held open from cgroup `container` of pod `pod`.
pub fn hold_in_pod(config: &AgentConfig, pod: &Netns, container: &str, to: SocketAddr) -> Held {
    Held::start(in_pod_client(config, pod, container, &Client::Hold { to }))
}

/// `cmd`, made to start in container cgroup `container` (made if missing:
/// a container's, as the kubelet would) inside the pod namespace `pod`.
fn placed(mut cmd: Command, config: &AgentConfig, pod: &Netns, container: &str) -> Command {
    let dir = config.cgroup_root_path().join(container);
    std::fs::create_dir_all(&dir).unwrap();
    cgroup::enter_on_exec(&mut cmd, &dir);
    pod.enter_on_exec(&mut cmd).unwrap();
    cmd
}

/// A pod's pause process: it sleeps in the container cgroup `container`
/// inside the pod namespace `pod`, holding both for the pod's life.
pub fn pause(config: &AgentConfig, pod: &Netns, container: &str) -> ChildGuard {
    let mut sleep = Command::new("timeout");
    sleep.args(["--signal=KILL", "30", "sleep", "120"]);
    placed(sleep, config, pod, container)
        .stdout(std::process::Stdio::null())
        .spawn_guarded()
        .unwrap()
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
