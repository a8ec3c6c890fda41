//! The Kubernetes install as shipped (config/kubernetes), for simulated
//! nodes: the agent config of its ConfigMap and the EndpointSlice its
//! agents' Service gets.

use serde_json::{Value, json};

use super::{Agent, AgentConfig, Netns, kubeapi::FakeApiServer, test_ca, write_workload_certs};

/// The agent config that config/kubernetes/configmap.yaml ships, for one
/// simulated node. The simulated nodes of a test share one machine, so what
/// a real node has to itself (its host paths for state, pins and
/// certificates, and its cgroup tree) moves into directories of the node's
/// own; everything else is the shipped text, the same for every node. Each
/// move must apply, so a change to the shipped file shows up here.
pub fn shipped_config(node: &AgentConfig, certs: &std::path::Path) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config/kubernetes/configmap.yaml");
    let map: Value = serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut text = map["data"]["sluice.yaml"]
        .as_str()
        .expect("configmap.yaml carries sluice.yaml")
        .to_owned();
    for (from, to) in [
        (
            "cgroup_root: kubepods.slice".to_owned(),
            format!("cgroup_root: {}/kubepods.slice", node.cgroup_root),
        ),
        (
            "/var/run/sluice".to_owned(),
            node.dir.join("state").display().to_string(),
        ),
        (
            "/sys/fs/bpf/sluice".to_owned(),
            node.pin_dir.display().to_string(),
        ),
        (
            "/var/lib/sluice/certs".to_owned(),
            certs.display().to_string(),
        ),
    ] {
        assert!(text.contains(&from), "configmap.yaml no longer has {from}");
        text = text.replace(&from, &to);
    }
    text
}

/// The EndpointSlice the endpointslice controller keeps for the agents'
/// headless Service (config/kubernetes/agents-service.yaml): each agent pod
/// at its node's address (hostNetwork), with its node's name.
pub fn agents_slice(agents: &[(&str, &str)]) -> Value {
    let endpoints: Vec<Value> = agents
        .iter()
        .map(|(node, ip)| {
            json!({
                "addresses": [ip],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "nodeName": node,
                "targetRef": {
                    "kind": "Pod", "namespace": "sluice-system",
                    "name": format!("sluice-{node}"), "uid": format!("agent-{node}")
                }
            })
        })
        .collect();
    json!({
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": "sluice-agents-x7k2p", "namespace": "sluice-system", "uid": "slice-agents",
            "labels": {
                "kubernetes.io/service-name": "sluice-agents",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            }
        },
        "addressType": "IPv4",
        "ports": [{ "name": "mtls", "port": 15008, "protocol": "TCP" }],
        "endpoints": endpoints
    })
}

/// Nodes `node-a` and `node-b` of one cluster, each on the shipped config:
/// one fake API server in node A's namespace (node B reaches it at A's
/// address), and for each node its config, a kubeconfig, and the
/// certificates of its pods' service account in namespace `shop`, from one
/// CA.
pub struct ShippedNodes {
    pub api: FakeApiServer,
    pub a: AgentConfig,
    pub b: AgentConfig,
}

impl ShippedNodes {
    /// `a_netns` and `a_addr`: node A's namespace and address; `accounts`:
    /// the service accounts of A's and B's pods.
    pub fn new(a_netns: &Netns, a_addr: &str, accounts: [&str; 2]) -> ShippedNodes {
        let api = a_netns.run(|| FakeApiServer::start_on("0.0.0.0:0".parse().unwrap()));
        let ca = test_ca();
        let (a, b) = (AgentConfig::new(&[]), AgentConfig::new(&[]));
        let urls = [
            format!("http://127.0.0.1:{}", api.port()),
            format!("http://{a_addr}:{}", api.port()),
        ];
        for ((cfg, account), url) in [&a, &b].into_iter().zip(accounts).zip(urls) {
            let certs = cfg.dir.join("certs");
            write_workload_certs(&certs, &ca, "cluster.local", &[("shop", account)]);
            cfg.write_raw(&shipped_config(cfg, &certs));
            api.write_kubeconfig_via(&cfg.dir.join("kubeconfig"), &url);
        }
        ShippedNodes { api, a, b }
    }

    /// Starts the agent of `name` (`node-a` or `node-b`) in `netns`, with
    /// the environment the DaemonSet gives it.
    pub fn start(&self, name: &str, netns: &Netns) -> Agent {
        let config = match name {
            "node-a" => &self.a,
            "node-b" => &self.b,
            _ => panic!("no node {name}"),
        };
        let kubeconfig = config.dir.join("kubeconfig");
        Agent::start_in_netns_with_env(
            config,
            netns,
            &[
                ("SLUICE_NODE_NAME", name),
                ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ],
        )
    }
}
