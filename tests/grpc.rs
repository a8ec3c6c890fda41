//! gRPC through the agent (`protocol: grpc`), as root: real gRPC servers
//! and clients (Debian's python3-grpcio, the C core's HTTP/2), the client
//! a workload behind the agent's redirect. Each call is balanced on its
//! own though the client keeps one HTTP/2 connection; an endpoint that
//! answers UNAVAILABLE is ejected, and the calls it failed are retried
//! where the route declares that status retryable; a call's deadline
//! (`grpc-timeout`) shorter than the route's timeout wins.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    l7::{requests, retries},
    support::*,
};

/// Debian's Python, which python3-grpcio and python3-h2 are for.
const PYTHON: &str = "/usr/bin/python3";

/// gRPC servers, one per `name:mode` (mode `ok`: answers its name;
/// `unavailable`: fails every call with UNAVAILABLE; `peer`: answers,
/// after 300 ms, the address of the connection the call came on, and
/// `peer10` so while it allows 10 streams at once per connection
/// (SETTINGS_MAX_CONCURRENT_STREAMS); `slow`: answers its name after 20
/// ms), each on a port of its own; prints the ports once serving.
const SERVERS: &str = r#"
import sys, time, grpc
from concurrent import futures
ports = []
for spec in sys.argv[1:]:
    name, mode = spec.split(':')
    def charge(request, context, name=name, mode=mode):
        if mode == 'unavailable':
            context.abort(grpc.StatusCode.UNAVAILABLE, 'down for maintenance')
        if mode.startswith('peer'):
            time.sleep(0.3)
            return context.peer().encode()
        if mode == 'slow':
            time.sleep(0.02)
        return name.encode()
    options = [('grpc.max_concurrent_streams', 10)] if mode == 'peer10' else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=256), options=options)
    handlers = {'Charge': grpc.unary_unary_rpc_method_handler(charge)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler('pay.Pay', handlers),))
    ports.append(server.add_insecure_port('127.0.0.1:0'))
    server.start()
    globals().setdefault('servers', []).append(server)
print(' '.join(map(str, ports)), flush=True)
sys.stdin.read()
"#;

/// gRPC servers in one Python process, killed with the guard.
pub(crate) struct Servers {
    pub(crate) addrs: Vec<SocketAddr>,
    _process: ChildGuard,
}

impl Servers {
    pub(crate) fn start(specs: &[&str]) -> Servers {
        Self::start_in(specs, None)
    }

    /// In the network namespace `netns` (a node's), or the test's.
    pub(crate) fn start_in(specs: &[&str], netns: Option<&Netns>) -> Servers {
        let mut command = Command::new(PYTHON);
        if let Some(netns) = netns {
            netns.enter_on_exec(&mut command).unwrap();
        }
        let mut process = command
            .args(["-c", SERVERS])
            .args(specs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn_guarded()
            .expect("start the gRPC servers (python3-grpcio)");
        let mut line = String::new();
        let stdout = process.stdout.take().unwrap();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addrs: Vec<SocketAddr> = line
            .split_whitespace()
            .map(|port| format!("127.0.0.1:{port}").parse().unwrap())
            .collect();
        assert_eq!(addrs.len(), specs.len(), "the servers said: {line:?}");
        Servers {
            addrs,
            _process: process,
        }
    }
}

/// `n` unary calls on one channel (one HTTP/2 connection) to `vip`, as
/// the client workload; prints how many answers came from each server, or
/// ended with each status.
pub(crate) fn calls(agent: &Agent, vip: SocketAddr, n: usize) -> String {
    calls_started(agent, vip, n)
        .wait_with_output()
        .map(|out| said(&out))
        .expect("run python3")
}

/// [`calls`], started: the running client, to wait for with [`said`].
pub(crate) fn calls_started(agent: &Agent, vip: SocketAddr, n: usize) -> ChildGuard {
    let script = format!(
        "{PYTHON} - <<'PY'
import collections, grpc
channel = grpc.insecure_channel('{vip}')
charge = channel.unary_unary('/pay.Pay/Charge')
seen = collections.Counter()
for i in range({n}):
    try:
        seen[charge(b'amount=100', timeout=10).decode()] += 1
    except grpc.RpcError as e:
        seen[e.code().name] += 1
print(' '.join('%s=%d' % kv for kv in sorted(seen.items())))
PY"
    );
    agent
        .client_command(&script)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_guarded()
        .expect("run python3")
}

/// What a client printed; panics with its stderr if it failed.
pub(crate) fn said(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// What `script` prints, run as the client workload; panics with its
/// stderr if it fails.
fn client_says(agent: &Agent, script: &str) -> String {
    said(&agent.client_command(script).output().expect("run python3"))
}

/// `n` unary calls at once on one channel (one HTTP/2 connection) to
/// `vip`, as the client workload; how many calls each answer got.
fn calls_at_once(
    agent: &Agent,
    vip: SocketAddr,
    n: usize,
) -> std::collections::BTreeMap<String, usize> {
    let script = format!(
        "{PYTHON} - <<'PY'
import collections, grpc
channel = grpc.insecure_channel('{vip}')
charge = channel.unary_unary('/pay.Pay/Charge')
calls = [charge.future(b'amount=100', timeout=20) for i in range({n})]
seen = collections.Counter(c.result().decode() for c in calls)
print(' '.join('%s=%d' % kv for kv in sorted(seen.items())))
PY"
    );
    client_says(agent, &script)
        .split_whitespace()
        .filter_map(|kv| kv.rsplit_once('='))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

/// More calls in flight at once than an HTTP/2 connection to an endpoint
/// carries (100): the agent opens another connection to the endpoint
/// rather than queue them on one; with fewer, one connection carries all,
/// from the first calls on (those that come while the caller's first
/// connection opens wait for it rather than each open one). (The endpoint
/// answers each call with the address of the connection it came on.)
#[test]
fn calls_beyond_a_connections_streams_open_another_connection() {
    let vip: SocketAddr = "127.77.9.13:8080".parse().unwrap();
    let servers = Servers::start(&["g1:peer"]);
    let config =
        AgentConfig::new(&[service("pay", &vip.to_string(), &servers.addrs).protocol("grpc")]);
    let agent = Agent::start(&config);
    let few = calls_at_once(&agent, vip, 40);
    assert_eq!(few.len(), 1, "one connection for 40 calls: {few:?}");
    assert_eq!(few.values().sum::<usize>(), 40);
    let many = calls_at_once(&agent, vip, 150);
    assert!(many.len() >= 2, "150 calls on one connection: {many:?}");
    assert_eq!(many.values().sum::<usize>(), 150);
}

/// An endpoint that allows fewer streams at once than the agent's own
/// cap (its first SETTINGS frame says 10): 40 calls at once open more
/// than one connection to it, where they would all ride one to an
/// endpoint that allows 100.
#[test]
fn an_endpoints_own_stream_limit_opens_another_connection_sooner() {
    let vip: SocketAddr = "127.77.9.14:8080".parse().unwrap();
    let servers = Servers::start(&["g1:peer10"]);
    let config =
        AgentConfig::new(&[service("pay", &vip.to_string(), &servers.addrs).protocol("grpc")]);
    let agent = Agent::start(&config);
    let calls = calls_at_once(&agent, vip, 40);
    assert!(calls.len() >= 2, "40 calls on one connection: {calls:?}");
    assert_eq!(calls.values().sum::<usize>(), 40);
}

/// `name=count` pairs as printed by [`calls`].
fn count(said: &str, name: &str) -> usize {
    said.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .map_or(0, |n| n.parse().unwrap())
}

#[test]
fn one_grpc_connection_spreads_its_calls_over_three_backends() {
    let vip: SocketAddr = "127.77.9.10:8080".parse().unwrap();
    let servers = Servers::start(&["g1:ok", "g2:ok", "g3:ok"]);
    // The default balancer (least_request: two choices by in-flight).
    let config =
        AgentConfig::new(&[service("pay", &vip.to_string(), &servers.addrs).protocol("grpc")]);
    let agent = Agent::start(&config);
    let said = calls(&agent, vip, 3000);
    for name in ["g1", "g2", "g3"] {
        let share = count(&said, name) as f64 / 3000.0;
        assert!((0.30..=0.37).contains(&share), "{name}: {share} ({said})");
    }
    assert_eq!(requests(&agent, "2xx"), 3000.0);
    assert_eq!(grpc_statuses(&agent, "0"), 3000.0);
}

#[test]
fn an_unavailable_backend_is_ejected_and_its_calls_retried_where_declared() {
    let vip: SocketAddr = "127.77.9.11:8080".parse().unwrap();
    let servers = Servers::start(&["g1:ok", "g2:ok", "bad:unavailable"]);
    let config = AgentConfig::new(&[service("pay", &vip.to_string(), &servers.addrs)
        .protocol("grpc")
        .load_balancer(LbPolicy::RoundRobin)
        .outlier_detection(OutlierDetection {
            consecutive_failures: Some(3),
            base_ejection_time: Some(Duration::from_secs(60)),
            ..Default::default()
        })
        .requests(Requests {
            grpc_retry_on: vec!["unavailable".into()],
            ..Default::default()
        })]);
    let agent = Agent::start(&config);
    let said = calls(&agent, vip, 300);
    assert_eq!(count(&said, "g1") + count(&said, "g2"), 300, "{said}");
    assert_eq!(retries(&agent), 3.0);
    let ejections = agent.metrics().sum(
        "sluice_endpoint_ejections_total",
        &[("destination_service", "pay")],
    );
    assert_eq!(ejections, 1.0);
}

/// An HTTP/2 endpoint that takes each call whole and then resets its
/// connection without a word of answer; counts the calls.
struct Breaker {
    addr: SocketAddr,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Breaker {
    fn start() -> Breaker {
        use std::{io::Read, io::Write, sync::atomic::Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = std::sync::Arc::<std::sync::atomic::AtomicUsize>::default();
        let counted = calls.clone();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().map_while(Result::ok) {
                let counted = counted.clone();
                std::thread::spawn(move || {
                    // An empty SETTINGS frame, as a server's first word.
                    let _ = conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
                    let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
                    while let Ok(n @ 1..) = conn.read(&mut buf) {
                        seen.extend_from_slice(&buf[..n]);
                        if seen.windows(10).any(|w| w == b"amount=100") {
                            counted.fetch_add(1, Ordering::SeqCst);
                            let _ = sluice_testkit::client::zero_linger(&conn);
                            return;
                        }
                    }
                });
            }
        });
        Breaker { addr, calls }
    }

    fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A call whose connection breaks after it went out may have reached the
/// application (a payment made): it is sent again only where the route
/// declares UNAVAILABLE retryable (what a gRPC client sees of a broken
/// connection), not because it declares some other status.
#[test]
fn a_call_whose_connection_breaks_is_resent_only_where_unavailable_is_retryable() {
    let servers = Servers::start(&["g1:ok"]);
    let breaker = Breaker::start();
    for (vip, retry_on, resent) in [
        ("127.77.9.15:8080", "resource_exhausted", false),
        ("127.77.9.16:8080", "unavailable", true),
    ] {
        let vip: SocketAddr = vip.parse().unwrap();
        let endpoints = [breaker.addr, servers.addrs[0]];
        let config = AgentConfig::new(&[service("pay", &vip.to_string(), &endpoints)
            .protocol("grpc")
            .load_balancer(LbPolicy::RoundRobin)
            .requests(Requests {
                grpc_retry_on: vec![retry_on.into()],
                ..Default::default()
            })]);
        let agent = Agent::start(&config);
        let before = breaker.calls();
        let said = calls(&agent, vip, 6);
        let broken = breaker.calls() - before;
        assert!(broken >= 1, "no call reached the breaker: {said}");
        match resent {
            true => {
                assert_eq!(count(&said, "g1"), 6, "{retry_on}: {said}");
                assert_eq!(retries(&agent), broken as f64, "{retry_on}");
            }
            false => {
                assert_eq!(count(&said, "UNAVAILABLE"), broken, "{retry_on}: {said}");
                assert_eq!(count(&said, "g1"), 6 - broken, "{retry_on}: {said}");
                assert_eq!(retries(&agent), 0.0, "{retry_on}");
            }
        }
    }
}

/// A call's `grpc-timeout` shorter than the route's timeout is its
/// deadline; a longer one yields to the route's. Sent with Python's h2 to
/// an endpoint that takes connections and never says a word (a gRPC
/// server would answer DEADLINE_EXCEEDED itself, from the deadline the
/// agent passes on), so the status read is the agent's.
#[test]
fn the_shorter_of_the_call_deadline_and_the_route_timeout_wins() {
    let vip: SocketAddr = "127.77.9.12:8080".parse().unwrap();
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_addr = mute.local_addr().unwrap();
    std::thread::spawn(move || {
        let held: Vec<_> = mute.incoming().map_while(Result::ok).collect();
        drop(held);
    });
    let config = AgentConfig::new(&[service("pay", &vip.to_string(), &[mute_addr])
        .protocol("grpc")
        .requests(Requests {
            timeout: Some(Duration::from_millis(800)),
            ..Default::default()
        })]);
    let agent = Agent::start(&config);
    let script = format!(
        "{PYTHON} - <<'PY'
import socket, h2.connection, h2.events
s = socket.create_connection(('{}', {}), timeout=10)
c = h2.connection.H2Connection()
c.initiate_connection()
for stream, deadline in ((1, '200m'), (3, '20S')):
    c.send_headers(stream, [(':method', 'POST'), (':scheme', 'http'),
        (':authority', '{vip}'), (':path', '/pay.Pay/Charge'),
        ('content-type', 'application/grpc'), ('te', 'trailers'),
        ('grpc-timeout', deadline)])
    c.send_data(stream, b'\\x00\\x00\\x00\\x00\\x01x', end_stream=True)
    s.sendall(c.data_to_send())
    seen, done = {{}}, False
    while not done:
        for event in c.receive_data(s.recv(65536)):
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                seen.update((k.decode(), v.decode()) for k, v in event.headers)
            done = done or isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset))
        s.sendall(c.data_to_send())
    print(seen.get('grpc-status'), seen.get('grpc-message'))
PY",
        vip.ip(),
        vip.port()
    );
    let out = agent.client_command(&script).output().expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lines(&out),
        [
            "4 sluice: no answer within 200 ms",
            "4 sluice: no answer within 800 ms"
        ]
    );
    assert_eq!(grpc_statuses(&agent, "4"), 2.0);
}

/// Calls the agent counted for service `pay` with gRPC status `status`.
fn grpc_statuses(agent: &Agent, status: &str) -> f64 {
    agent.metrics().sum(
        "sluice_grpc_requests_total",
        &[
            ("destination_service", "pay"),
            ("grpc_response_status", status),
        ],
    )
}
