//! Zero trust that holds, as root: two nodes (network namespaces on a veth
//! pair), pods on node B (each a network namespace and a workload cgroup),
//! real agents, real mTLS. Nothing reaches a strict workload except
//! through the mesh, whoever dials it; one policy decides whatever the
//! path; a workload cannot borrow the agent's mark.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::support::{pods::Node, *};

const LEDGER_VIP: &str = "127.77.5.10:8080";
const VAULT_VIP: &str = "127.77.5.12:8080";
const POD_PORT: u16 = 8080;

/// Node B with three pods (ledger: strict, legacy: permissive, and one
/// that is not meshed) and a strict workload in its own namespace (vault);
/// node A with callers `checkout` and `batch`. B's ledger denies batch.
struct Cluster {
    // Field order is drop order: the agents, then what they use.
    agent_a: Agent,
    agent_b: Agent,
    configs: (AgentConfig, AgentConfig),
    _state: TempDir,
    _backends: Vec<Backend>,
    audit: PathBuf,
    a_addr: IpAddr,
    b_addr: IpAddr,
    vault_port: u16,
    a: Netns,
    b_node: Node,
}

/// Service `payments/name` at `vip` in `mode` over `endpoint`. Health
/// checks every 100 ms: they must reach a strict pod of this node (from
/// inside it) and leave another node's endpoints to their agent.
fn checked_service(name: &str, vip: &str, mode: Mode, endpoint: Endpoint) -> Service {
    service(name, vip, &[])
        .mode(mode)
        .health_check(HealthCheck {
            interval: Some(Duration::from_millis(100)),
            timeout: Some(Duration::from_millis(300)),
            unhealthy_threshold: Some(2),
            ..HealthCheck::default()
        })
        .endpoints(vec![endpoint])
}

fn cluster() -> Cluster {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let b_node = Node::new(3);
    let subnet = (std::process::id() as usize * 7 + n * 13) % 250 + 1;
    let a = Netns::create(&unique("node-a")).unwrap();
    let (a_addr, b_addr): (IpAddr, IpAddr) = (
        format!("198.19.{subnet}.1").parse().unwrap(),
        format!("198.19.{subnet}.2").parse().unwrap(),
    );
    netns::veth(&a, "vea", &b_node.node, "veb").unwrap();
    a.ip(&["addr", "add", &format!("{a_addr}/24"), "dev", "vea"])
        .unwrap();
    b_node
        .node
        .ip(&["addr", "add", &format!("{b_addr}/24"), "dev", "veb"])
        .unwrap();
    a.ip(&["route", "add", "198.18.0.0/16", "via", &b_addr.to_string()])
        .unwrap();
    let (p0, p0_ip) = &b_node.pods[0];
    let (p1, p1_ip) = &b_node.pods[1];
    let backends = vec![
        Backend::start_in("ledger", SocketAddr::new(*p0_ip, POD_PORT), p0),
        Backend::start_in("legacy", SocketAddr::new(*p1_ip, POD_PORT), p1),
        Backend::start_in(
            "vault",
            SocketAddr::new("0.0.0.0".parse().unwrap(), 0),
            &b_node.node,
        ),
    ];
    let vault_port = backends[2].addr.port();
    let state = TempDir::create("enforce-state").unwrap();
    let inbound_port = free_port().unwrap();
    let workload = |name: &str, sa: &str| Workload::new(name, "payments", sa);
    let ledger = SocketAddr::new(*p0_ip, POD_PORT);
    let vault = SocketAddr::new(b_addr, vault_port);
    let b_cfg = AgentConfig::with(|c| Config {
        audit: Some(Audit {
            output: c.audit_path(),
            requests: false,
        }),
        workloads: vec![
            workload("ledger", "ledger")
                .netns(p0.path())
                .authorization(Authorization {
                    default: Decision::Allow,
                    allow: vec![],
                    deny: vec!["spiffe://cluster.local/ns/payments/sa/batch".to_owned()],
                    requests: vec![],
                }),
            workload("legacy", "legacy").netns(p1.path()),
            workload("vault", "vault"),
            workload("checkout-b", "checkout"),
            workload("batch-b", "batch"),
        ],
        services: vec![
            checked_service(
                "ledger",
                LEDGER_VIP,
                Mode::Mtls,
                Endpoint::new(ledger).workload("ledger"),
            ),
            checked_service(
                "legacy",
                "127.77.5.11:8080",
                Mode::Permissive,
                Endpoint::new(SocketAddr::new(*p1_ip, POD_PORT)).workload("legacy"),
            ),
            checked_service(
                "vault",
                VAULT_VIP,
                Mode::Mtls,
                Endpoint::new(vault).workload("vault"),
            ),
        ],
        ..c.mesh_node(
            ("node-b", b_addr),
            state.path(),
            inbound_port,
            ("node-a", a_addr),
        )
    });
    let a_cfg = AgentConfig::with(|c| Config {
        workloads: vec![workload("checkout", "checkout"), workload("batch", "batch")],
        services: vec![
            checked_service(
                "ledger",
                LEDGER_VIP,
                Mode::Mtls,
                Endpoint::new(ledger).remote("node-b", Some("ledger")),
            ),
            checked_service(
                "vault",
                VAULT_VIP,
                Mode::Mtls,
                Endpoint::new(vault).remote("node-b", Some("vault")),
            ),
        ],
        ..c.mesh_node(
            ("node-a", a_addr),
            state.path(),
            inbound_port,
            ("node-b", b_addr),
        )
    });
    // One CA for both nodes.
    a_cfg.ca_init();
    let agent_b = Agent::start_in_netns(&b_cfg, &b_node.node);
    let agent_a = Agent::start_in_netns(&a_cfg, &a);
    let audit = b_cfg.audit_path();
    Cluster {
        agent_a,
        agent_b,
        configs: (a_cfg, b_cfg),
        _state: state,
        _backends: backends,
        audit,
        a_addr,
        b_addr,
        vault_port,
        a,
        b_node,
    }
}

/// One call through the mesh as `workload` of `agent`.
fn mesh_call(agent: &Agent, workload: &str, vip: &str) -> Vec<String> {
    agent.run_client(workload, Calls::new(vip.parse().unwrap(), 1))
}

#[test]
fn plaintext_to_a_strict_workload_is_refused_from_everywhere_and_the_mesh_still_works() {
    let c = cluster();
    let ledger = SocketAddr::new(c.b_node.pods[0].1, POD_PORT);
    let legacy = SocketAddr::new(c.b_node.pods[1].1, POD_PORT);
    let vault = SocketAddr::new(c.b_addr, c.vault_port);

    // Through the mesh: mTLS from node A, to a pod and to a workload in
    // node B's own namespace.
    assert_eq!(
        mesh_call(&c.agent_a, "checkout", LEDGER_VIP),
        ["ledger call 1"]
    );
    assert_eq!(
        mesh_call(&c.agent_a, "checkout", VAULT_VIP),
        ["vault call 1"]
    );

    // Plaintext straight to the strict pod: from node A, from node B's own
    // namespace, from another pod of node B. And to the strict workload in
    // B's own namespace, from node A.
    let attempts = [
        ("node A", plain_call(&c.a, ledger), c.a_addr),
        (
            "node B's host",
            plain_call(&c.b_node.node, ledger),
            c.b_node.pods[0].1,
        ),
        (
            "another pod",
            plain_call(&c.b_node.pods[2].0, ledger),
            c.b_node.pods[2].1,
        ),
        ("node A to vault", plain_call(&c.a, vault), c.a_addr),
    ];
    for (from, outcome, _) in &attempts {
        assert!(
            !outcome.starts_with("ledger") && !outcome.starts_with("vault"),
            "plaintext from {from} reached the strict workload: {outcome}"
        );
    }
    let refused = audit_lines(&c.audit, "plaintext", attempts.len());
    assert_eq!(refused.len(), attempts.len(), "{refused:?}");
    assert!(
        refused
            .iter()
            .all(|l| l["decision"] == "deny" && l["event"] == "denial"),
        "{refused:?}"
    );
    let to_vault = refused
        .iter()
        .filter(|l| l["destination"]["workload"] == "payments/vault")
        .count();
    assert_eq!(to_vault, 1, "{refused:?}");
    assert!(refused.iter().any(|l| {
        l["source"]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{}:", c.a_addr)))
            && l["destination"]["identity"] == "spiffe://cluster.local/ns/payments/sa/ledger"
    }));

    // The permissive pod takes plaintext, counted.
    assert_eq!(plain_call(&c.a, legacy), "legacy plain");

    let metrics = c.agent_b.metrics();
    assert_eq!(
        metrics.sum("sluice_inbound_refusals_total", &[("reason", "plaintext")]),
        attempts.len() as f64,
        "{metrics:?}"
    );
    assert_eq!(
        metrics.sum("sluice_inbound_plaintext_passed_total", &[]),
        1.0
    );
    assert_eq!(
        metrics.sum("sluice_audit_events_total", &[("outcome", "dropped")]),
        0.0
    );

    // The mesh keeps working throughout.
    assert_eq!(
        mesh_call(&c.agent_a, "checkout", LEDGER_VIP),
        ["ledger call 1"]
    );
}

/// The health of `service`'s endpoints as `agent`'s admin API shows it.
fn healthy(agent: &Agent, service: &str) -> Vec<bool> {
    let out = agent.sluice(&["endpoints", "-o", "json"]);
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    view.as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["service"] == service)
                .map(|e| e["healthy"] == true)
                .collect()
        })
        .unwrap_or_default()
}

/// Node B probes its strict pod from inside the pod (the capture hook would
/// refuse a probe from the node's namespace); node A leaves B's endpoint to
/// B's agent rather than probe it around the mesh.
#[test]
fn health_checks_reach_a_strict_pod_from_inside_and_never_go_around_the_mesh() {
    let c = cluster();
    let ledger = &c._backends[0];
    let before = ledger.accepted();
    // Probes every 100 ms reach the pod's backend.
    assert!(wait_until(Duration::from_secs(10), || ledger.accepted() >= before + 5));
    assert_eq!(healthy(&c.agent_b, "payments/ledger"), [true]);
    assert_eq!(healthy(&c.agent_a, "payments/ledger"), [true]);
    assert_eq!(healthy(&c.agent_a, "payments/vault"), [true]);
    // Nothing was refused by the capture hook: no probe went around it.
    let metrics = c.agent_b.metrics();
    assert_eq!(
        metrics.sum("sluice_inbound_refusals_total", &[("reason", "plaintext")]),
        0.0,
        "{metrics:?}"
    );
}

#[test]
fn one_policy_denies_a_caller_from_another_node_and_from_the_same_node() {
    let c = cluster();
    // From node A, over mTLS: B's inbound listener denies batch.
    assert_eq!(mesh_call(&c.agent_a, "batch", LEDGER_VIP), ["FAILED"]);
    // On node B itself: the source agent applies the same policy.
    assert_eq!(mesh_call(&c.agent_b, "batch-b", LEDGER_VIP), ["FAILED"]);
    // checkout is allowed both ways; on the same node it is delivered from
    // inside the pod, which the capture hook lets through.
    assert_eq!(
        mesh_call(&c.agent_b, "checkout-b", LEDGER_VIP),
        ["ledger call 1"]
    );
    assert_eq!(
        mesh_call(&c.agent_a, "checkout", LEDGER_VIP),
        ["ledger call 1"]
    );

    let denied = audit_lines(&c.audit, "denied", 2);
    assert_eq!(denied.len(), 2, "{denied:?}");
    for line in &denied {
        assert_eq!(
            line["source"]["identity"],
            "spiffe://cluster.local/ns/payments/sa/batch"
        );
        assert_eq!(
            line["destination"]["identity"],
            "spiffe://cluster.local/ns/payments/sa/ledger"
        );
        assert!(
            line["rule"]
                .as_str()
                .is_some_and(|r| r.contains("deny[0] spiffe://cluster.local/ns/payments/sa/batch")),
            "{line}"
        );
    }
    assert_eq!(
        denied.iter().filter(|l| l["detail"] == "same node").count(),
        1,
        "{denied:?}"
    );
}

/// A process on node B below the agent's cgroup root but in no workload's
/// cgroup has no identity: the strict ledger refuses it, and so does
/// legacy only if it has a policy (it has none, and is permissive, so the
/// stray caller gets through there). The refusal is counted and audited.
#[test]
fn a_caller_in_no_workload_is_refused_by_a_strict_workload() {
    let c = cluster();
    let stray = c.configs.1.cgroup_root_path().join("stray");
    std::fs::create_dir(&stray).unwrap();
    let call = |vip: &str| {
        let mut cmd = std::process::Command::new("python3");
        netns::enter_on_exec(&mut cmd, &c.b_node.node.path()).unwrap();
        cgroup::enter_on_exec(&mut cmd, &stray);
        let (host, port) = vip.split_once(':').unwrap();
        let script = format!(
            "import socket\n\
             try:\n\
             \x20   s = socket.create_connection(('{host}', {port}), timeout=5)\n\
             \x20   s.sendall(b'stray 1\\n')\n\
             \x20   print(s.makefile().readline().strip() or 'FAILED')\n\
             except OSError:\n\
             \x20   print('FAILED')\n"
        );
        lines(&cmd.args(["-c", &script]).output().expect("run python3"))
    };
    let denied = || {
        c.agent_b.metrics().sum(
            "sluice_tcp_connections_closed_total",
            &[("destination_service", "ledger"), ("reason", "denied")],
        )
    };
    assert_eq!(denied(), 0.0);
    assert_eq!(call(LEDGER_VIP), ["FAILED"]);
    assert_eq!(denied(), 1.0);
    assert_eq!(call("127.77.5.11:8080"), ["legacy stray 1"]);
    let audited = audit_lines(&c.audit, "denied", 1);
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(
        audited[0]["rule"], "the caller is in no known workload, so it has no identity",
        "{}",
        audited[0]
    );
    assert_eq!(audited[0]["detail"], "same node", "{}", audited[0]);
}
