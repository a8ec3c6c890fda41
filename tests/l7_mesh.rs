//! Requests to endpoints on another node, as root: two network
//! namespaces as nodes, an HTTP service (`protocol: http`, `mode: mtls`,
//! the default tunnels) whose two endpoints are workloads on node B. Node
//! A's agent balances each request and carries its connections to the
//! endpoints as streams of its mTLS tunnel to node B's agent, which
//! authorizes each stream as it does a connection's, and, where the
//! endpoint's workload has a rate limit or request rules, each request.

use std::{net::SocketAddr, time::Duration};

use crate::{
    grpc::{Servers, calls_started, said},
    l7::{Answer, HttpBackend, posts_apart, send, two_callers_against_a_limit},
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
    let vip: SocketAddr = VIP.parse().unwrap();
    let addrs = [backends[0].addr, backends[1].addr];
    let client = Workload::new("client", "payments", "checkout");
    let ledger = Workload::new("ledger", "payments", "ledger");
    let nodes = HttpNodes::new(&pair, (vip, &addrs), vec![client], ledger, false);
    let a = Agent::start_in_netns(&nodes.a_cfg, &pair.a);
    let _b = Agent::start_in_netns(&nodes.b_cfg, &pair.b);
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
    let vip: SocketAddr = "127.77.8.41:8080".parse().unwrap();
    let ledger = Workload::new("ledger", "payments", "ledger")
        .rate_limit(RateLimit {
            requests_per_second: 100,
            burst: 10,
            per_source: true,
        })
        .authorization(admin_denied());
    let callers = vec![
        Workload::new("client", "payments", "checkout"),
        Workload::new("batch", "payments", "batch"),
    ];
    let nodes = HttpNodes::new(&pair, (vip, &[backend.addr]), callers, ledger, true);
    let (a_cfg, b_cfg) = (&nodes.a_cfg, &nodes.b_cfg);
    let a = Agent::start_in_netns(a_cfg, &pair.a);
    let b = Agent::start_in_netns(b_cfg, &pair.b);
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
    let out = python_h2_peer(
        (&pair, nodes.state.path(), nodes.inbound_port),
        H2_CLIENT,
        &[&target],
    );
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

/// An idle keep-alive connection is not closed at the request head's
/// timeout (10 s): a workload's connection to node A's agent, and node A's
/// pooled connection over the tunnel to node B's agent (which serves it
/// request by request: the ledger has request rules), both outlive 12 s
/// without a request, so a POST without an idempotency key (never sent
/// again) after that pause is answered, over the same connections. A head
/// that never ends is cut 10 s after its first byte, and counted.
#[test]
fn idle_keep_alive_connections_outlive_the_head_timeout_on_both_agents() {
    let pair = NodePair::new();
    let vip: SocketAddr = "127.77.8.44:8080".parse().unwrap();
    let (backend, nodes) = checked_ledger(&pair, Answer::Status(200), vip);
    let a = Agent::start_in_netns(&nodes.a_cfg, &pair.a);
    let _b = Agent::start_in_netns(&nodes.b_cfg, &pair.b);
    let script = format!(
        "python3 - <<'PY'
import http.client, socket, time
c = http.client.HTTPConnection('{ip}', {port}, timeout=30)
def post():
    c.request('POST', '/pay', body=b'x' * 64)
    r = c.getresponse()
    r.read()
    return r.status
print('first', post())
slow = socket.create_connection(('{ip}', {port}))
slow.sendall(b'GET /pay HTTP/1.1\\r\\nHo')
time.sleep(12)
slow.settimeout(20)
print('unfinished head', slow.recv(100))
print('after 12 s', post())
PY",
        ip = vip.ip(),
        port = vip.port()
    );
    let out = a.client_command(&script).output().unwrap();
    assert_eq!(
        lines(&out),
        ["first 200", "unfinished head b''", "after 12 s 200"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(backend.requests(), 2, "{:?}", backend.arrivals());
    let metric = |name: &str| a.metrics().sum(name, &[("side", "client")]);
    assert_eq!(
        metric("sluice_tunnel_streams_opened_total"),
        1.0,
        "node A's pooled connection to node B's agent did not last"
    );
    assert_eq!(backend.connections(), 1);
    let refused = || {
        a.metrics().sum(
            "sluice_request_connection_refusals_total",
            &[("reason", "header_timeout")],
        )
    };
    assert!(
        wait_until(Duration::from_secs(5), || refused() == 1.0),
        "{}",
        refused()
    );
}

/// An endpoint that closes idle keep-alive connections (as Node.js
/// servers do after 5 s; here 1 s, saying `Keep-Alive: timeout=1`) behind
/// node B's agent, which serves node A's stream to it request by request
/// (the ledger has request rules): POSTs without an idempotency key (never
/// sent again) 1.5 s apart on one keep-alive connection are all answered,
/// each reaching the endpoint once.
#[test]
fn posts_to_an_endpoint_that_closes_idle_connections_are_answered() {
    let pair = NodePair::new();
    let vip: SocketAddr = "127.77.8.45:8080".parse().unwrap();
    let (backend, nodes) = checked_ledger(&pair, Answer::IdleClose(1000), vip);
    let a = Agent::start_in_netns(&nodes.a_cfg, &pair.a);
    let _b = Agent::start_in_netns(&nodes.b_cfg, &pair.b);
    assert_eq!(
        posts_apart(&a, vip, 3, 1.5),
        ["200", "200", "200"],
        "{}",
        a.log()
    );
    assert_eq!(backend.requests(), 3, "{:?}", backend.arrivals());
    // Node B's agent connected again for each: the endpoint had closed
    // (or was about to close) the connection before.
    assert_eq!(backend.connections(), 3);
}

/// Request rules that deny `/admin/*` to everyone: enough for node B's
/// agent to serve a stream to the workload request by request.
fn admin_denied() -> Authorization {
    Authorization {
        default: Decision::Allow,
        allow: vec![],
        deny: vec![],
        requests: vec![RequestRule {
            from: vec![],
            methods: vec![],
            paths: vec!["/admin/*".into()],
            decision: Decision::Deny,
        }],
    }
}

/// A backend answering `answer` on node B, the `ledger` workload with
/// request rules that deny `/admin/*` to everyone (enough for node B's
/// agent to serve a stream to it request by request), and the client on
/// node A calling it at `vip`.
fn checked_ledger(pair: &NodePair, answer: Answer, vip: SocketAddr) -> (HttpBackend, HttpNodes) {
    let backend = pair.b.run(move || HttpBackend::start("ledger", answer));
    let client = Workload::new("client", "payments", "checkout");
    let ledger = Workload::new("ledger", "payments", "ledger").authorization(admin_denied());
    let nodes = HttpNodes::new(pair, (vip, &[backend.addr]), vec![client], ledger, false);
    (backend, nodes)
}

/// Requests in flight when the endpoint's node agent is upgraded are
/// answered: a keep-alive connection of POSTs without an idempotency key
/// (never sent twice), each taking 20 ms at the endpoint, while node B's
/// agent is replaced. Every POST is answered 200 and reaches the endpoint
/// once. (Node B's old agent does not pause a stream that carries
/// requests; node A stops sending requests on it once B says it is going
/// away, and the requests after go over a new tunnel to B's successor.)
#[test]
fn posts_in_flight_across_an_upgrade_of_the_endpoints_agent_are_answered() {
    let pair = NodePair::new();
    let backend = pair
        .b
        .run(|| HttpBackend::start("ledger", Answer::Slow(20)));
    let vip: SocketAddr = "127.77.8.42:8080".parse().unwrap();
    let client = Workload::new("client", "payments", "checkout");
    let ledger = Workload::new("ledger", "payments", "ledger");
    let nodes = HttpNodes::new(&pair, (vip, &[backend.addr]), vec![client], ledger, false);
    let a = Agent::start_in_netns(&nodes.a_cfg, &pair.a);
    let b = Agent::start_in_netns(&nodes.b_cfg, &pair.b);
    let posts = 200;
    let script = format!(
        "python3 - <<'PY'
import collections, http.client
c = http.client.HTTPConnection('{}', {}, timeout=30)
seen = collections.Counter()
for i in range({posts}):
    c.request('POST', '/pay', body=b'x' * 64)
    r = c.getresponse()
    r.read()
    seen[r.status] += 1
print(dict(seen))
PY",
        vip.ip(),
        vip.port()
    );
    let client = a
        .client_command(&script)
        .stdout(std::process::Stdio::piped())
        .spawn_guarded()
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || backend.requests() >= 30));
    let next = nodes.upgrade_b(&pair, b);
    let out = client.wait_with_output().unwrap();
    assert_eq!(lines(&out), [format!("{{200: {posts}}}")], "{}", a.log());
    assert_eq!(backend.requests(), posts, "{:?}", backend.arrivals());
    drop(next);
}

/// gRPC calls in flight when the endpoint's node agent is upgraded are
/// answered: one channel's calls (HTTP/2 streams of one upstream
/// connection, over the tunnel), each taking 20 ms at the endpoint, while
/// node B's agent is replaced. Every call ends OK (a gRPC call is never
/// sent twice here: no status is declared retryable).
#[test]
fn grpc_calls_in_flight_across_an_upgrade_of_the_endpoints_agent_end_ok() {
    let pair = NodePair::new();
    let servers = Servers::start_in(&["g1:slow"], Some(&pair.b));
    let vip: SocketAddr = "127.77.8.43:8080".parse().unwrap();
    let client = Workload::new("client", "payments", "checkout");
    let ledger = Workload::new("ledger", "payments", "ledger");
    let nodes = HttpNodes::speaking(
        "grpc",
        &pair,
        (vip, &servers.addrs),
        vec![client],
        ledger,
        false,
    );
    let a = Agent::start_in_netns(&nodes.a_cfg, &pair.a);
    let b = Agent::start_in_netns(&nodes.b_cfg, &pair.b);
    let n = 200;
    let running = calls_started(&a, vip, n);
    let answered = || {
        a.metrics()
            .sum("sluice_requests_total", &[("destination_service", "pay")])
    };
    assert!(wait_until(Duration::from_secs(10), || answered() >= 30.0));
    let next = nodes.upgrade_b(&pair, b);
    let out = running.wait_with_output().unwrap();
    assert_eq!(said(&out), format!("g1={n}"), "{}", a.log());
    drop(next);
}

/// Node A's and node B's configs: the HTTP service `pay` at `vip`
/// (`protocol: http`, or what [`HttpNodes::speaking`] says) whose
/// endpoints, `backends`, are the workload `ledger` on node B; `callers`
/// on node A; node B audited when `audit` says.
struct HttpNodes {
    a_cfg: AgentConfig,
    b_cfg: AgentConfig,
    state: TempDir,
    inbound_port: u16,
}

impl HttpNodes {
    fn new(
        pair: &NodePair,
        (vip, backends): (SocketAddr, &[SocketAddr]),
        callers: Vec<Workload>,
        ledger: Workload,
        audit: bool,
    ) -> HttpNodes {
        Self::speaking("http", pair, (vip, backends), callers, ledger, audit)
    }

    fn speaking(
        protocol: &str,
        pair: &NodePair,
        (vip, backends): (SocketAddr, &[SocketAddr]),
        callers: Vec<Workload>,
        ledger: Workload,
        audit: bool,
    ) -> HttpNodes {
        let state = TempDir::create("l7-mesh").unwrap();
        let inbound_port = free_port().unwrap();
        let pay = |remote: bool| {
            let endpoints = backends
                .iter()
                .map(|&b| match remote {
                    true => Endpoint::new(b).remote("node-b", Some("ledger")),
                    false => Endpoint::new(b).workload("ledger"),
                })
                .collect();
            service("pay", &vip.to_string(), &[])
                .protocol(protocol)
                .load_balancer(LbPolicy::RoundRobin)
                .endpoints(endpoints)
        };
        let a_cfg = AgentConfig::with(|c| Config {
            workloads: callers,
            services: vec![pay(true)],
            ..c.mesh_node(
                ("node-a", pair.a_addr),
                state.path(),
                inbound_port,
                ("node-b", pair.b_addr),
            )
        });
        let b_cfg = AgentConfig::with(|c| Config {
            workloads: vec![ledger],
            services: vec![pay(false)],
            audit: audit.then(|| Audit {
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
        HttpNodes {
            a_cfg,
            b_cfg,
            state,
            inbound_port,
        }
    }

    /// Starts node B's next agent (an upgrade) and waits for `old` to exit.
    fn upgrade_b(&self, pair: &NodePair, mut old: Agent) -> Agent {
        let next = Agent::start_in_netns(&self.b_cfg, &pair.b);
        let status = old.wait(Duration::from_secs(15));
        assert!(status.success(), "the old agent: {status}\n{}", old.log());
        next
    }
}
