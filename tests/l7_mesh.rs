//! Requests to endpoints on another node, as root: two network
//! namespaces as nodes, an HTTP service (`protocol: http`, `mode: mtls`,
//! the default tunnels) whose two endpoints are workloads on node B. Node
//! A's agent balances each request and carries its connections to the
//! endpoints as streams of its mTLS tunnel to node B's agent, which
//! authorizes each stream as it does a connection's, and, where the
//! endpoint's workload has a rate limit or request rules, each request.

use std::{net::SocketAddr, time::Duration};

use crate::{
    l7::{Answer, HttpBackend, send, two_callers_against_a_limit},
    support::*,
    tunnels::{H2_CLIENT, python_h2_peer},
};

const VIP: &str = "127.77.8.40:8080";

#[test]
fn requests_to_another_node_ride_the_tunnel_and_spread() {
    let pair = NodePair::new();
    let backends = [
        pair.b.run(|| HttpBackend::start("r1", Answer::Status(200))),
        pair.b.run(|| HttpBackend::start("r2", Answer::Status(200))),
    ];
    let state = TempDir::create("l7-mesh").unwrap();
    let inbound_port = free_port().unwrap();
    let endpoints = |remote: bool| -> Vec<Endpoint> {
        backends
            .iter()
            .map(|b| match remote {
                true => Endpoint::new(b.addr).remote("node-b", Some("ledger")),
                false => Endpoint::new(b.addr).workload("ledger"),
            })
            .collect()
    };
    let pay = |remote: bool| {
        service("pay", VIP, &[])
            .protocol("http")
            .load_balancer(LbPolicy::RoundRobin)
            .endpoints(endpoints(remote))
    };
    let a_cfg = AgentConfig::with(|c| Config {
        workloads: vec![Workload::new("client", "payments", "checkout")],
        services: vec![pay(true)],
        ..c.mesh_node(
            ("node-a", pair.a_addr),
            state.path(),
            inbound_port,
            ("node-b", pair.b_addr),
        )
    });
    let b_cfg = AgentConfig::with(|c| Config {
        workloads: vec![Workload::new("ledger", "payments", "ledger")],
        services: vec![pay(false)],
        ..c.mesh_node(
            ("node-b", pair.b_addr),
            state.path(),
            inbound_port,
            ("node-a", pair.a_addr),
        )
    });
    a_cfg.ca_init();
    let a = Agent::start_in_netns(&a_cfg, &pair.a);
    let _b = Agent::start_in_netns(&b_cfg, &pair.b);
    let vip: SocketAddr = VIP.parse().unwrap();
    assert_eq!(send(&a, vip, "GET", 100, false), "r1=50 r2=50");
    // One tunnel connection; a stream per upstream HTTP connection (one
    // per endpoint: the requests came one at a time).
    let metric = |name: &str| a.metrics().sum(name, &[("side", "client")]);
    assert_eq!(metric("sluice_tunnel_connections_opened_total"), 1.0);
    assert_eq!(metric("sluice_tunnel_streams_opened_total"), 2.0);
    assert_eq!(backends[0].requests() + backends[1].requests(), 100);
}

/// A workload's rate limit and request rules hold for callers on other
/// nodes: node B's agent serves the tunnel streams to `ledger` request by
/// request and checks each against the stream's caller identity, so a
/// request a rule denies never reaches the workload (403, audited at B)
/// and a caller over the rate gets 429 with Retry-After (counted at B),
/// while another caller on node A is unaffected.
#[test]
fn rate_limits_and_request_rules_hold_for_callers_on_other_nodes() {
    let pair = NodePair::new();
    let backend = pair
        .b
        .run(|| HttpBackend::start("ledger", Answer::Status(200)));
    let state = TempDir::create("l7-mesh-limits").unwrap();
    let inbound_port = free_port().unwrap();
    let vip: SocketAddr = "127.77.8.41:8080".parse().unwrap();
    let pay = |remote: bool| {
        let endpoint = match remote {
            true => Endpoint::new(backend.addr).remote("node-b", Some("ledger")),
            false => Endpoint::new(backend.addr).workload("ledger"),
        };
        service("pay", &vip.to_string(), &[])
            .protocol("http")
            .endpoints(vec![endpoint])
    };
    let a_cfg = AgentConfig::with(|c| Config {
        workloads: vec![
            Workload::new("client", "payments", "checkout"),
            Workload::new("batch", "payments", "batch"),
        ],
        services: vec![pay(true)],
        ..c.mesh_node(
            ("node-a", pair.a_addr),
            state.path(),
            inbound_port,
            ("node-b", pair.b_addr),
        )
    });
    let ledger = Workload::new("ledger", "payments", "ledger")
        .rate_limit(RateLimit {
            requests_per_second: 100,
            burst: 10,
            per_source: true,
        })
        .authorization(Authorization {
            default: Decision::Allow,
            allow: vec![],
            deny: vec![],
            requests: vec![RequestRule {
                from: vec![],
                methods: vec![],
                paths: vec!["/admin/*".into()],
                decision: Decision::Deny,
            }],
        });
    let b_cfg = AgentConfig::with(|c| Config {
        workloads: vec![ledger],
        services: vec![pay(false)],
        audit: Some(Audit {
            output: c.audit_path(),
            requests: false,
        }),
        ..c.mesh_node(
            ("node-b", pair.b_addr),
            state.path(),
            inbound_port,
            ("node-a", pair.a_addr),
        )
    });
    a_cfg.ca_init();
    let a = Agent::start_in_netns(&a_cfg, &pair.a);
    let b = Agent::start_in_netns(&b_cfg, &pair.b);
    let script = format!(
        "python3 - <<'PY'
import http.client
c = http.client.HTTPConnection('{}', {}, timeout=10)
for path in ['/admin/keys', '/balance']:
    c.request('GET', path)
    r = c.getresponse()
    r.read()
    print(path, r.status)
PY",
        vip.ip(),
        vip.port()
    );
    assert_eq!(
        lines(&a.client_command(&script).output().unwrap()),
        ["/admin/keys 403", "/balance 200"]
    );
    assert_eq!(
        backend.requests(),
        1,
        "the denied request reached the workload"
    );
    let denial = &audit_lines(&b_cfg.audit_path(), "denied", 1)[0];
    assert_eq!(denial["rule"], "workload payments/ledger requests[0]");
    assert_eq!(denial["detail"], "request GET /admin/keys");
    assert_eq!(
        denial["source"]["identity"],
        "spiffe://cluster.local/ns/payments/sa/checkout"
    );

    let (passed, refused, batch_passed) = two_callers_against_a_limit(&a, vip);
    let counted = b.metrics().sum(
        "sluice_rate_limited_requests_total",
        &[("destination_workload", "ledger")],
    );
    assert_eq!(counted, refused);
    assert_eq!(
        backend.requests() as f64,
        1.0 + passed + batch_passed,
        "a refused request reached the workload"
    );

    // A peer with a valid certificate whose stream to the ledger carries
    // no HTTP: B answers 400 on that stream and counts the refusal.
    let refused = |reason: &str| {
        b.metrics().sum(
            "sluice_request_connection_refusals_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(refused("malformed"), 0.0);
    let target = backend.addr.to_string();
    let out = python_h2_peer((&pair, state.path(), inbound_port), H2_CLIENT, &[&target]);
    let said = lines(&out);
    assert_eq!(
        said.first(),
        Some(&format!("{target} 200 HTTP/1.1 400 Bad Request")),
        "{said:?}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || refused("malformed") == 1.0),
        "{}",
        refused("malformed")
    );
}
