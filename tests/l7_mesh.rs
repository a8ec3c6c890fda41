//! Requests to endpoints on another node, as root: two network
//! namespaces as nodes, an HTTP service (`protocol: http`, `mode: mtls`,
//! the default tunnels) whose two endpoints are workloads on node B. Node
//! A's agent balances each request and carries its connections to the
//! endpoints as streams of its mTLS tunnel to node B's agent, which
//! authorizes each stream as it does a connection's.

use std::net::SocketAddr;

use crate::{
    l7::{Answer, HttpBackend, send},
    support::*,
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
