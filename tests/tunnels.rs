//! Pooled tunnels between two nodes (`mesh.tunnels.enabled`), as root: the
//! two-node mesh of `mtls`, its application connections carried as HTTP/2
//! CONNECT streams inside shared mTLS connections.

use std::time::Duration;

use crate::{
    mtls::{HOUR, Mesh, VIP, calls, issue, mesh_with, stream_client},
    support::*,
};
use sluice_testkit::{client::Client, process::SpawnGuarded, wait::wait_until};

/// Tunnel connections `agent` made (`client`) or took (`server`): one TLS
/// handshake each.
fn tunnels_opened(agent: &Agent, side: &str) -> f64 {
    agent
        .metrics()
        .sum("sluice_tunnel_connections_opened_total", &[("side", side)])
}

pub(crate) fn streams_opened(agent: &Agent, side: &str) -> f64 {
    agent
        .metrics()
        .sum("sluice_tunnel_streams_opened_total", &[("side", side)])
}

pub(crate) fn tunnelled(stream: Option<(usize, Duration)>) -> Mesh {
    mesh_with(HOUR, true, stream, Some(tunnels_on()))
}

fn tunnels_on() -> config::Tunnels {
    config::Tunnels {
        enabled: true,
        ..Default::default()
    }
}

fn handshakes(agent: &Agent, side: &str, kind: &str) -> f64 {
    agent.metrics().sum(
        "sluice_tunnel_connections_opened_total",
        &[("side", side), ("handshake", kind)],
    )
}

pub(crate) fn tunnels_open(agent: &Agent, side: &str) -> f64 {
    agent
        .metrics()
        .sum("sluice_tunnel_connections", &[("side", side)])
}

#[test]
fn many_connections_share_one_tunnel_and_each_identity_has_its_own() {
    let m = tunnelled(None);
    let answers = m.a.run_client("client", calls(VIP, 40, "charge"));
    let expected: Vec<String> = (1..=40).map(|i| format!("ledger charge {i}")).collect();
    assert_eq!(answers, expected);
    assert_eq!(m.ledger.accepted(), 40);
    assert_eq!(tunnels_opened(&m.a, "client"), 1.0, "one handshake for 40");
    assert_eq!(tunnels_opened(&m.b, "server"), 1.0);
    assert_eq!(streams_opened(&m.a, "client"), 40.0);
    assert_eq!(streams_opened(&m.b, "server"), 40.0);

    // Another identity gets a connection of its own (its certificate),
    // and ledger's policy refuses its stream, audited on node B.
    let denied = m.a.run_client("batch", calls(VIP, 1, "charge"));
    assert_eq!(denied, ["FAILED"]);
    assert_eq!(tunnels_opened(&m.a, "client"), 2.0);
    assert_eq!(tunnels_opened(&m.b, "server"), 2.0);
    assert_eq!(m.ledger.accepted(), 40, "no byte of the denied stream");
    let denials = audit_lines(&m.configs.1.audit_path(), "denied", 1);
    assert_eq!(denials.len(), 1, "{denials:?}");
    assert_eq!(
        denials[0]["source"]["identity"],
        "spiffe://cluster.local/ns/payments/sa/batch"
    );
    assert_eq!(denials[0]["rule"], "workload payments/ledger default deny");
    // A refusal is the caller's, not the endpoint's failure: more denials
    // than `consecutive_failures` (5) do not eject ledger for everyone.
    let denied = m.a.run_client("batch", calls(VIP, 6, "charge"));
    assert_eq!(denied, ["FAILED"; 6]);
    let ledger = m.a.endpoint(m.ledger.addr);
    assert_eq!(
        (&ledger["breaker"], &ledger["ejections"]),
        (&"closed".into(), &0.into()),
        "{ledger}"
    );

    // checkout's connection is still the one it had.
    let again = m.a.run_client("client", calls(VIP, 1, "again"));
    assert_eq!(again, ["ledger again 1"]);
    assert_eq!(tunnels_opened(&m.a, "client"), 2.0);

    // `sluice tunnels` shows the two pools, one connection each, to B.
    let node_b = format!("{}:{}", m.pair.b_addr, m.inbound_port);
    let pools = m.a.view("/debug/tunnels");
    let pools = pools.as_array().expect("a list of pools");
    let sources: Vec<&str> = pools
        .iter()
        .map(|p| p["source"].as_str().unwrap())
        .collect();
    assert_eq!(
        sources,
        [
            "spiffe://cluster.local/ns/payments/sa/batch",
            "spiffe://cluster.local/ns/payments/sa/checkout"
        ],
        "{pools:?}"
    );
    for pool in pools {
        assert_eq!(pool["node"], node_b.as_str(), "{pool}");
        assert_eq!(
            pool["destination"],
            "spiffe://cluster.local/ns/payments/sa/ledger"
        );
        assert_eq!(
            (&pool["connections"], &pool["closing"]),
            (&1.into(), &0.into()),
            "{pool}"
        );
        // Its peer speaks moves: the control stream is open.
        assert_eq!(pool["movable"], 1, "{pool}");
        assert_eq!(pool["last_dial_failure"], serde_json::Value::Null, "{pool}");
    }
    let table = lines(&m.a.sluice(&["tunnels"]));
    assert!(table[0].starts_with("NODE"), "{table:?}");
    assert_eq!(table.len(), 3, "a header and two pools: {table:?}");
    assert!(
        table[2].contains("sa/checkout") && table[2].contains(&node_b),
        "{table:?}"
    );
    // And `sluice status` sums them up on each side.
    assert_eq!(m.a.view("/debug/status")["tunnels"]["pools"], 2);
    assert_eq!(m.a.view("/debug/status")["tunnels"]["connections"], 2);
    assert_eq!(m.b.view("/debug/status")["tunnels"]["from_peers"], 2);
    let status = lines(&m.a.sluice(&["status"]));
    assert!(
        status
            .iter()
            .any(|l| l.starts_with("tunnels") && l.contains("2 pools to peers, 2 connections")),
        "{status:?}"
    );
}

/// A stream whose client resets it ends alone: a stream beside it on the
/// same tunnel connection carries on to the end of its half-close.
#[test]
fn a_reset_and_a_half_close_are_per_stream() {
    let (bytes, tail) = (256 << 10, 128 << 10);
    let m = tunnelled(Some((tail, Duration::from_millis(2))));
    let stream = m.stream.as_ref().expect("a stream server");
    let long = stream_client(&m, bytes, tail, Duration::from_millis(4));
    assert!(wait_until(Duration::from_secs(10), || streams_opened(
        &m.b, "server"
    ) >= 1.0));
    // Five connections that the client resets after its first reply.
    for _ in 0..5 {
        let out = m.a.run_client(
            "client",
            Client::Reset {
                to: VIP.parse().unwrap(),
            },
        );
        assert_eq!(out, ["reset"]);
    }
    let out = long.wait_with_output().expect("the client ends");
    assert_eq!(lines(&out), [format!("intact {}", bytes + tail)]);
    assert_eq!(stream.half_closed(), 1);
    assert_eq!(tunnels_opened(&m.a, "client"), 1.0, "all on one connection");
    assert_eq!(streams_opened(&m.b, "server"), 6.0);
}

#[test]
fn a_killed_peer_fails_its_streams_at_once_and_the_next_connect_uses_a_new_tunnel() {
    let (bytes, tail) = (4 << 20, 0);
    let mut m = tunnelled(Some((tail, Duration::from_millis(1))));
    let long = stream_client(&m, bytes, tail, Duration::from_millis(5));
    assert!(wait_until(Duration::from_secs(10), || streams_opened(
        &m.b, "server"
    ) >= 1.0));
    m.b.kill();
    // At once: well before the 20 s a PING would take to find the peer
    // silent. The client's connection is reset (an error) or ends short.
    let mut long = long;
    assert!(
        wait_until(Duration::from_secs(10), || long
            .try_wait()
            .ok()
            .flatten()
            .is_some()),
        "the client's stream did not fail when the peer agent died"
    );
    let out = long.wait_with_output().expect("the client ends");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() || said.starts_with("corrupt"),
        "the stream failed: {said:?} ({})",
        out.status
    );
    // Meanwhile a connect finds no agent: the pool says why.
    assert_eq!(m.a.run_client("client", calls(VIP, 1, "down")), ["FAILED"]);
    let pools = m.a.view("/debug/tunnels");
    let failure = pools[0]["last_dial_failure"].as_str().unwrap_or_default();
    assert!(failure.contains("refused"), "{pools}");
    m.b = Agent::start_in_netns(&m.configs.1, &m.pair.b);
    // The stream server echoes the calls' lines as they are.
    let answers = m.a.run_client("client", calls(VIP, 3, "after"));
    assert_eq!(answers, ["after 1", "after 2", "after 3"]);
    assert_eq!(tunnels_opened(&m.a, "client"), 2.0, "a new connection");
}

#[test]
fn a_peer_upgrade_under_a_stream_of_connects_refuses_none() {
    let mut m = tunnelled(None);
    let ticks =
        m.a.client(
            "client",
            calls(VIP, 400, "tick").pause(Duration::from_millis(5)),
        )
        .stdout(std::process::Stdio::piped())
        .spawn_guarded()
        .expect("start the client");
    assert!(wait_until(Duration::from_secs(10), || streams_opened(
        &m.a, "client"
    ) >= 20.0));
    let b = Agent::start_in_netns(&m.configs.1, &m.pair.b);
    let mut old = std::mem::replace(&mut m.b, b);
    let status = old.wait(Duration::from_secs(10));
    assert!(
        status.success(),
        "node b's old agent: {status}\n{}",
        old.log()
    );
    let out = ticks.wait_with_output().expect("the client ends");
    let answers = lines(&out);
    assert_eq!(answers.len(), 400);
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| !a.starts_with("ledger tick"))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(
        streams_opened(&m.b, "server") >= 1.0,
        "the new agent took streams"
    );
    assert_eq!(
        tunnels_opened(&m.a, "client"),
        2.0,
        "after the old agent's GOAWAY, new streams went to a new connection"
    );
}

/// Python's `h2` (not the agent's HTTP/2) with the standard library's TLS
/// opens CONNECT streams on the inbound port: one to ledger (200, and
/// ledger's echo), one to an address that is no workload here (400).
#[test]
fn an_independent_http2_client_speaks_to_the_inbound_port() {
    let m = tunnelled(None);
    let ledger = format!("127.0.0.1:{}", m.ledger.addr.port());
    let out = python_h2(&m, H2_CLIENT, &[&ledger, "127.0.0.1:9"]);
    assert_eq!(
        lines(&out),
        [
            format!("{ledger} 200 ledger hello"),
            "127.0.0.1:9 400".to_owned()
        ]
    );
    assert_eq!(m.ledger.accepted(), 1);
}

/// With `mesh.tunnels.stream_window` at 256 KiB, the inbound port grants
/// that window (Python's `h2` reads it from the SETTINGS and keeps to it),
/// and 200 KiB sent at once on one stream, with no window given back yet,
/// reach the workload and come back; at the default 64 KiB Python's `h2`
/// would refuse to send them. Node A's tunnels carry calls as before.
#[test]
fn a_configured_stream_window_is_granted_on_the_inbound_port() {
    let m = mesh_with(
        HOUR,
        true,
        None,
        Some(config::Tunnels {
            stream_window: Some(256 * 1024),
            ..tunnels_on()
        }),
    );
    let ledger = format!("127.0.0.1:{}", m.ledger.addr.port());
    let out = python_h2(&m, H2_WIDE_WINDOW, &[&ledger]);
    assert_eq!(
        lines(&out),
        ["granted 262144", "stream 262144", "echoed 200"]
    );
    let answers = m.a.run_client("client", calls(VIP, 2, "wide"));
    assert_eq!(answers, ["ledger wide 1", "ledger wide 2"]);
    assert_eq!(streams_opened(&m.a, "client"), 2.0);
}

/// Reads the SETTINGS' stream window, opens a CONNECT to `args[0]`, sends
/// 200 lines of 1 KiB at once and counts the echoed lines.
const H2_WIDE_WINDOW: &str = r#"
import h2.config, h2.connection, h2.events

sock = tls()
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
conn.initiate_connection()
sock.sendall(conn.data_to_send())
sid, status, echoed, ended = None, None, b"", False
while not ended:
    for event in conn.receive_data(sock.recv(65536)):
        if isinstance(event, h2.events.RemoteSettingsChanged) and sid is None:
            print("granted", conn.remote_settings.initial_window_size)
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "CONNECT"), (":authority", args[0])])
        elif isinstance(event, h2.events.ResponseReceived):
            assert dict(event.headers)[b":status"] == b"200", event.headers
            print("stream", conn.local_flow_control_window(sid))
            data = (b"x" * 1023 + b"\n") * 200
            for at in range(0, len(data), 16384):
                conn.send_data(sid, data[at:at + 16384], end_stream=at + 16384 >= len(data))
        elif isinstance(event, h2.events.DataReceived):
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            echoed += event.data
        elif isinstance(event, h2.events.StreamEnded):
            ended = True
    sock.sendall(conn.data_to_send())
print("echoed", sum(1 for l in echoed.split(b"\n") if l.startswith(b"ledger x")))
"#;

/// Bad tunnel peers, each with a valid certificate, against the inbound
/// port while a good stream carries on: one that sends no HTTP/2 preface,
/// one that sends a GET instead of a CONNECT, one that opens 150 streams
/// where 100 are allowed (the rest are refused by the protocol, without
/// disturbing the others), one whose header block is over 16 KiB (431).
/// Each refusal is counted under its reason: 2 + 50 + 1.
#[test]
fn bad_tunnel_peers_are_refused_and_a_good_stream_carries_on() {
    let m = tunnelled(None);
    let ledger = format!("127.0.0.1:{}", m.ledger.addr.port());
    let out = python_h2(&m, H2_ABUSE, &[&ledger]);
    let said = lines(&out);
    assert_eq!(
        said,
        [
            "good stream: ledger before",
            "get: 405",
            "flood: 100 answered 200, 50 refused",
            "big header block: 431",
            "good stream: ledger after",
        ],
        "{said:?}"
    );
    let refused = |reason: &str| {
        m.b.metrics()
            .sum("sluice_inbound_refusals_total", &[("reason", reason)])
    };
    assert!(
        wait_until(Duration::from_secs(5), || refused("tunnel_protocol")
            == 53.0),
        "the preface-less peer, the GET, 50 streams over the limit, the big header block: {}",
        refused("tunnel_protocol")
    );
}

/// Runs `script` with Python's `h2` in node A's namespace against node B's
/// inbound port, as checkout (a certificate from the mesh's CA): its
/// arguments are B's address and port, the certificate and key files, then
/// `args`. Panics with its stderr if it fails.
pub(crate) fn python_h2(m: &Mesh, script: &str, args: &[&str]) -> std::process::Output {
    python_h2_peer((&m.pair, m.state.path(), m.inbound_port), script, args)
}

/// [`python_h2`] for any pair of nodes: `pair`, the state directory whose
/// CA issues the certificate, and node B's inbound port.
pub(crate) fn python_h2_peer(
    (pair, state, inbound_port): (&NodePair, &std::path::Path, u16),
    script: &str,
    args: &[&str],
) -> std::process::Output {
    let now = std::time::SystemTime::now();
    let uri = "spiffe://cluster.local/ns/payments/sa/checkout";
    let (cert, key) = issue(Some(&state.join("ca")), uri, now - HOUR, now + HOUR);
    let dir = TempDir::create("h2-python").unwrap();
    let (cert_path, key_path, script_path) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("peer.py"),
    );
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::write(&script_path, format!("{H2_PEER_PRELUDE}{script}")).unwrap();
    // Debian's Python, which has Debian's h2 (`cargo xtask setup`
    // installs python3-h2); the `python3` on PATH may be another.
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.arg(&script_path)
        .arg(pair.b_addr.to_string())
        .arg(inbound_port.to_string())
        .arg(&cert_path)
        .arg(&key_path)
        .args(args);
    pair.a.enter_on_exec(&mut cmd).unwrap();
    let out = cmd.output().expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What every script [`python_h2_peer`] runs begins with: its arguments
/// (node B's address and inbound port, the certificate and key, then
/// `args`), and `tls(timeout)`, a TLS 1.3 connection to node B's inbound
/// port with the certificate, offering h2.
const H2_PEER_PRELUDE: &str = r#"
import socket, ssl, sys

host, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
args = sys.argv[5:]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(["h2"])

def tls(timeout=10):
    return ctx.wrap_socket(socket.create_connection((host, port), timeout=timeout),
                           server_hostname="ledger.payments.sluice")
"#;

pub(crate) const H2_CLIENT: &str = r#"
import h2.config, h2.connection, h2.events

targets = args
sock = tls()
assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
conn.initiate_connection()
sock.sendall(conn.data_to_send())

def until(want):
    while True:
        for event in conn.receive_data(sock.recv(65536)):
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            got = want(event)
            if got is not None:
                sock.sendall(conn.data_to_send())
                return got
        sock.sendall(conn.data_to_send())

for target in targets:
    # `ip:port+token` asks to take up a paused connection with the token.
    target, _, token = target.partition("+")
    headers = [(":method", "CONNECT"), (":authority", target)]
    if token:
        headers.append(("sluice-resume", token))
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers)
    sock.sendall(conn.data_to_send())
    status = until(lambda e: dict(e.headers)[b":status"].decode()
                   if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid else None)
    if status != "200":
        print(target, status)
        continue
    conn.send_data(sid, b"hello\n", end_stream=True)
    sock.sendall(conn.data_to_send())
    line = until(lambda e: e.data.decode().strip()
                 if isinstance(e, h2.events.DataReceived) and e.stream_id == sid and e.data else None)
    print(target, status, line)
    sys.stdout.flush()
"#;

/// A pool connection idle for its timeout closes; the next one resumes
/// the TLS session of the first (one full handshake for the two).
#[test]
fn an_idle_tunnel_closes_and_the_next_one_resumes_its_session() {
    let idle = config::Tunnels {
        idle_timeout: Some(Duration::from_secs(1)),
        ..tunnels_on()
    };
    let m = mesh_with(HOUR, false, None, Some(idle));
    assert_eq!(
        m.a.run_client("client", calls(VIP, 1, "one")),
        ["ledger one 1"]
    );
    assert_eq!(tunnels_open(&m.a, "client"), 1.0);
    assert!(
        wait_until(Duration::from_secs(10), || tunnels_open(&m.a, "client")
            == 0.0
            && tunnels_open(&m.b, "server") == 0.0),
        "the idle tunnel connection closed on both sides"
    );
    assert_eq!(
        m.a.run_client("client", calls(VIP, 1, "two")),
        ["ledger two 1"]
    );
    assert_eq!(handshakes(&m.a, "client", "full"), 1.0);
    assert_eq!(handshakes(&m.a, "client", "resumed"), 1.0);
    assert_eq!(handshakes(&m.b, "server", "resumed"), 1.0);
}

/// Certificates that live 4 s are renewed every 2 s on both nodes: each
/// renewal retires the pool connections made with the old certificate, a
/// stream open across the renewals finishes intact on its connection, and
/// no connect fails.
#[test]
fn certificate_rotation_retires_tunnels_without_failing_a_stream() {
    let (bytes, tail) = (1 << 20, 64 << 10);
    let m = mesh_with(
        Duration::from_secs(4),
        false,
        Some((tail, Duration::from_millis(1))),
        Some(tunnels_on()),
    );
    let long = stream_client(&m, bytes, tail, Duration::from_millis(6));
    let ticks =
        m.a.client(
            "client",
            calls(VIP, 600, "tick").pause(Duration::from_millis(10)),
        )
        .stdout(std::process::Stdio::piped())
        .spawn_guarded()
        .expect("start the calls");
    let out = ticks.wait_with_output().expect("the calls end");
    let answers = lines(&out);
    assert_eq!(answers.len(), 600);
    let failed: Vec<_> = answers.iter().filter(|a| !a.starts_with("tick")).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let out = long.wait_with_output().expect("the stream ends");
    assert_eq!(lines(&out), [format!("intact {}", bytes + tail)]);
    assert!(
        tunnels_opened(&m.a, "client") >= 3.0,
        "renewals made new pool connections: {}",
        tunnels_opened(&m.a, "client")
    );
}

const H2_ABUSE: &str = r#"
import h2.config, h2.connection, h2.errors, h2.events, h2.settings

ledger = args[0]

class Peer:
    def __init__(self):
        self.sock = tls()
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
        self.conn.initiate_connection()
        self.flush()
    def flush(self):
        self.sock.sendall(self.conn.data_to_send())
    def events(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("closed")
        events = self.conn.receive_data(data)
        for e in events:
            if isinstance(e, h2.events.DataReceived):
                self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        self.flush()
        return events
    def connect(self, target, method="CONNECT"):
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":authority", target)]
        if method != "CONNECT":
            headers += [(":scheme", "https"), (":path", "/")]
        self.conn.send_headers(sid, headers)
        return sid
    def status(self, sid):
        while True:
            for e in self.events():
                if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                    return dict(e.headers)[b":status"].decode()
    def line(self, sid, text):
        self.conn.send_data(sid, text.encode() + b"\n")
        self.flush()
        while True:
            for e in self.events():
                if isinstance(e, h2.events.DataReceived) and e.stream_id == sid and e.data:
                    return e.data.decode().strip()

good = Peer()
sid = good.connect(ledger)
good.flush()
assert good.status(sid) == "200"
print("good stream:", good.line(sid, "before"))

# No HTTP/2 preface: bytes that are not one, after ALPN h2.
bad = tls()
bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
try:
    while bad.recv(4096):
        pass
except (ConnectionError, ssl.SSLError, socket.timeout):
    pass

# A GET instead of a CONNECT.
get = Peer()
gid = get.connect("127.0.0.1:1", method="GET")
get.flush()
print("get:", get.status(gid))

# 150 CONNECTs sent before the server's SETTINGS are read: the library
# does not know the limit yet, the server does.
flood = Peer()
sids = [flood.connect(ledger) for _ in range(150)]
flood.flush()
answered, refused, left = 0, 0, set(sids)
while left:
    for e in flood.events():
        if isinstance(e, h2.events.ResponseReceived) and e.stream_id in left:
            answered += 1
            left.discard(e.stream_id)
        elif isinstance(e, h2.events.StreamReset) and e.stream_id in left:
            refused += int(e.error_code == h2.errors.ErrorCodes.REFUSED_STREAM)
            left.discard(e.stream_id)
print(f"flood: {answered} answered 200, {refused} refused")

# A header block over the 16 KiB the agent takes (in CONTINUATION frames).
big = Peer()
bid = big.conn.get_next_available_stream_id()
big.conn.send_headers(bid, [(":method", "CONNECT"), (":authority", ledger), ("x-filler", "a" * 20000)])
big.flush()
print("big header block:", big.status(bid))

print("good stream:", good.line(sid, "after"))
sys.stdout.flush()
"#;
