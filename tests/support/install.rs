//! The Kubernetes install as shipped (config/kubernetes), for simulated
//! nodes: the agent config of its ConfigMap and the EndpointSlice its
//! agents' Service gets.

use serde_json::{Value, json};

use super::AgentConfig;

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
