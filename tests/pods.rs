//! Pods as workloads, as root: a "node" network namespace running the
//! agent, and "pods" that are each a network namespace (joined to the node
//! by a veth pair) plus a cgroup under the node's pod cgroup root. The
//! agent opens its outbound listener inside each pod's namespace, opens the
//! pod's upstream sockets there, and keys records by namespace cookie.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use crate::support::{pods::*, *};
use serde_json::Value;

/// Node `n1` with pods `pods` as workloads, and service `svc-<i>` at
/// [`vip`]`(i)` over backend `i`.
fn render(config: &AgentConfig, node: &Node, pods: &[usize], backends: &[SocketAddr]) -> Config {
    let mut c = Config::new("n1", &config.cgroup_root);
    c.agent = config.agent(&config.dir.join("state"), config.inbound_port);
    c.workloads = pods
        .iter()
        .map(|&i| {
            Workload::new(&format!("pod-{i}"), "shop", &format!("sa-{i}"))
                .netns(node.pods[i].0.path())
                .cgroup(&pod_cgroup(i))
        })
        .collect();
    c.services = backends
        .iter()
        .enumerate()
        .map(|(i, b)| Service::new(&format!("svc-{i}"), "shop", vip(i), &[*b]))
        .collect();
    c
}

/// Pod `i`'s cgroup, as the kubelet's cgroupfs driver names it.
fn pod_cgroup(i: usize) -> String {
    Layout::Cgroupfs.pod(Qos::Burstable, &format!("5a1ce000-0000-4000-8000-{i:012}"))
}

/// A new container cgroup of pod `i`: its processes never live in the pod
/// cgroup itself.
fn container(i: usize) -> String {
    Layout::Cgroupfs.container(&pod_cgroup(i), i)
}

fn vip(i: usize) -> SocketAddr {
    format!("127.77.8.{}:8080", 10 + i).parse().unwrap()
}

#[test]
fn pods_get_their_own_listener_and_source_address_and_never_share_records() {
    let node = Node::new(2);
    let backends: Vec<SocketAddr> = (0..2)
        .map(|_| SocketAddr::new(node.service_addr, free_port().unwrap()))
        .collect();
    source_echo(&node.node, "a", backends[0]);
    source_echo(&node.node, "b", backends[1]);
    let config = AgentConfig::with(|c| render(c, &node, &[0], &backends));
    let agent = Agent::start_in_netns(&config, &node.node);

    // Pod 0 alone: its call leaves from its own address.
    let reply = run_in_pod(
        &config,
        &node.pods[0].0,
        &container(0),
        Calls::new(vip(0), 1).text("hi"),
    );
    assert_eq!(reply, [format!("a from {} hi 1", node.pods[0].1)]);

    // Pod 1 arrives: its listener opens with the reload.
    config.write(&render(&config, &node, &[0, 1], &backends));
    let listening = |w: &Value| w["name"] == "pod-1" && w["listener"] == "open";
    assert!(
        wait_until(Duration::from_secs(5), || agent
            .workloads()
            .iter()
            .any(listening)),
        "{:?}",
        agent.workloads()
    );
    let view = agent.workloads();
    for (i, (pod, _)) in node.pods.iter().enumerate() {
        let w = view
            .iter()
            .find(|w| w["name"] == format!("pod-{i}"))
            .unwrap_or_else(|| panic!("pod-{i} not in {view:?}"));
        assert_eq!(w["netns"], pod.path().display().to_string());
        assert_eq!(w["listener"], "open", "{w}");
        assert_eq!(
            w["identity"],
            format!("spiffe://cluster.local/ns/shop/sa/sa-{i}")
        );
    }

    // Both pods dial from the same loopback address and port at once, each
    // to its own service: the records are keyed by namespace, so each call
    // reaches its service and leaves from its pod's address.
    for round in 0..10 {
        let children: Vec<_> = (0..2)
            .map(|i| {
                let same_port = Calls::new(vip(i), 1).text("same-port").bind_port(41000);
                in_pod_client(&config, &node.pods[i].0, &container(i), &same_port.into())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn_guarded()
                    .unwrap()
            })
            .collect();
        for (i, child) in children.into_iter().enumerate() {
            let reply = lines(&child.wait_with_output().unwrap());
            let name = ["a", "b"][i];
            assert_eq!(
                reply,
                [format!("{name} from {} same-port 1", node.pods[i].1)],
                "round {round}, pod {i}"
            );
        }
    }
}

#[test]
fn a_pod_that_leaves_drains_its_open_connection_and_takes_no_new_ones() {
    let node = Node::new(1);
    let backend = SocketAddr::new(node.service_addr, free_port().unwrap());
    source_echo(&node.node, "a", backend);
    let config = AgentConfig::with(|c| render(c, &node, &[0], &[backend]));
    let agent = Agent::start_in_netns(&config, &node.node);
    let pod = &node.pods[0].0;

    // A connection that is open when the pod leaves the catalog.
    let mut held = hold_in_pod(&config, pod, &container(0), vip(0));
    let from = node.pods[0].1;
    assert_eq!(held.ask("one"), format!("a from {from} one"));

    config.write(&render(&config, &node, &[], &[backend]));
    assert!(
        wait_until(Duration::from_secs(5), || agent.workloads().is_empty()),
        "{:?}",
        agent.workloads()
    );
    assert_eq!(held.ask("two"), format!("a from {from} two"));
    held.close();

    // New connects from the pod find no listener: refused at once.
    let late = Calls::new(vip(0), 1).text("late").show_error();
    assert_eq!(
        run_in_pod(&config, pod, &container(0), late),
        ["FAILED ConnectionRefused"]
    );
}
