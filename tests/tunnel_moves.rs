//! Tunnelled connections across upgrades (`mesh.tunnels`), as root: the
//! agent that leaves pauses each stream with its peer agent, which keeps
//! its side until the successor takes it up with a new stream carrying
//! the pause's token. Measured on what the client receives, and on both
//! agents' handover counters.

use std::{process::Stdio, time::Duration};

use sluice_testkit::{client::Client, process::SpawnGuarded, wait::wait_until};

use crate::{
    mtls::{Mesh, VIP, stream_client},
    support::*,
    tunnels::{H2_CLIENT, python_h2, streams_opened, tunnelled, tunnels_open},
};

/// Connections `agent` counted under `result` in an upgrade: `received`
/// from its predecessor, `taken_up` from a peer agent's successor.
fn handed(agent: &Agent, result: &str) -> f64 {
    agent
        .metrics()
        .sum("sluice_handover_connections_total", &[("result", result)])
}

/// What [`one_long_connection`] sends, and the stream server's tail.
const LONG: (usize, usize) = (24 << 20, 256 << 10);

/// A tunnelled mesh and one connection through it from node A's client to
/// node B's stream server, open, bytes in flight both ways (fast enough
/// that some are at each pause), a KiB every `pace`.
fn one_long_connection(pace: Duration) -> (Mesh, ChildGuard) {
    let (bytes, tail) = LONG;
    let m = tunnelled(Some((tail, Duration::from_millis(4))));
    let long = stream_client(&m, bytes, tail, pace);
    assert!(wait_until(Duration::from_secs(10), || streams_opened(
        &m.b, "server"
    ) >= 1.0));
    (m, long)
}

/// The long connection's client saw every byte, once, in order, both ways.
fn assert_intact(long: ChildGuard, context: &str) {
    let out = long.wait_with_output().expect("the client ends");
    let (bytes, tail) = LONG;
    assert_eq!(
        lines(&out),
        [format!("intact {}", bytes + tail)],
        "every byte, once, in order\n{context}"
    );
}

/// `agent` counted `n` connections under `result`, and no more. A move
/// is counted when the connection goes on, which can be after the old
/// agent is gone: a successor's first try can reach the peer's
/// predecessor, and try again (for up to the agent's 10 s wait for a
/// paused side).
fn assert_handed(agent: &Agent, result: &str, n: usize, context: &str) {
    let counted = || handed(agent, result) >= n as f64;
    let log = || format!("{context}\n{}", agent.log());
    assert!(wait_until(Duration::from_secs(12), counted), "{}", log());
    assert_eq!(handed(agent, result), n as f64, "{}", log());
}

/// Starts node A's (`a`) or node B's next agent and waits for the old one
/// to exit.
fn upgrade(m: &mut Mesh, a: bool) {
    let (config, netns) = match a {
        true => (&m.configs.0, &m.pair.a),
        false => (&m.configs.1, &m.pair.b),
    };
    let next = Agent::start_in_netns(config, netns);
    let old = if a { &mut m.a } else { &mut m.b };
    let mut old = std::mem::replace(old, next);
    let status = old.wait(Duration::from_secs(10));
    assert!(status.success(), "the old agent: {status}\n{}", old.log());
}

/// One connection from node A's client to node B's stream server, in a
/// tunnel: node A's agent is upgraded while it sends, then node B's. It
/// arrives whole, once, in order, both ways, and each side's successor or
/// peer says what it did.
#[test]
fn a_tunnelled_connection_survives_an_upgrade_of_either_agent() {
    let (mut m, long) = one_long_connection(Duration::from_micros(200));

    upgrade(&mut m, true);
    assert_handed(&m.a, "received", 1, "node A's successor took it");
    assert_handed(&m.b, "taken_up", 1, "node B kept its side");

    upgrade(&mut m, false);
    assert_handed(&m.b, "received", 1, "node B's successor took it");
    assert_handed(&m.a, "taken_up", 1, "node A kept its side");

    assert_intact(long, "");
    let stream = m.stream.as_ref().expect("a stream server");
    assert_eq!(stream.half_closed(), 1, "the client's half-close arrived");
}

/// One connection from node A's client to node B's stream server, in a
/// tunnel, while both agents are upgraded at the same moment: whichever
/// pauses first, or both at once (then the calling end's pause stands and
/// the called end's successor keeps its side), or one leaving while it
/// keeps the other's side, the connection arrives whole, once, in order,
/// both ways, and neither agent drops it. Then each agent is upgraded
/// again on its own: a side that was kept for the peer's successor is now
/// the called end of the stream that took it up, wherever its connection
/// came from, and moves as such.
#[test]
fn a_tunnelled_connection_survives_both_agents_upgraded_at_once() {
    // Slower than the others: it stays open across three upgrades.
    let (mut m, long) = one_long_connection(Duration::from_micros(400));

    let (next_a, next_b) = std::thread::scope(|s| {
        let a = s.spawn(|| Agent::start_in_netns(&m.configs.0, &m.pair.a));
        let b = s.spawn(|| Agent::start_in_netns(&m.configs.1, &m.pair.b));
        (a.join().unwrap(), b.join().unwrap())
    });
    let mut old_a = std::mem::replace(&mut m.a, next_a);
    let mut old_b = std::mem::replace(&mut m.b, next_b);
    for old in [&mut old_a, &mut old_b] {
        let status = old.wait(Duration::from_secs(20));
        assert!(status.success(), "an old agent: {status}\n{}", old.log());
    }

    for agent in [&m.a, &m.b] {
        assert_handed(agent, "received", 1, "");
        assert_eq!(handed(agent, "dropped"), 0.0, "{}", agent.log());
    }

    for a in [true, false] {
        upgrade(&mut m, a);
        let (moved, kept) = if a { (&m.a, &m.b) } else { (&m.b, &m.a) };
        assert_handed(moved, "received", 1, "moved again");
        let logs = format!("{}\n{}", moved.log(), kept.log());
        assert_eq!(handed(moved, "dropped"), 0.0, "{logs}");
        assert_eq!(handed(kept, "dropped"), 0.0, "{logs}");
    }
    assert_intact(long, &format!("{}\n{}", m.a.log(), m.b.log()));
}

/// Twenty persistent request/response clients (a connection pool's, on one
/// pool connection) through an upgrade of node A's agent and then node
/// B's: every request answered once, in order, none lost; every
/// connection moved and taken up, none dropped.
#[test]
fn persistent_tunnelled_clients_see_no_error_across_upgrades_of_both_agents() {
    let mut m = tunnelled(None);
    // About 10 s of requests: both upgrades happen while they flow.
    let (clients, count) = (20, 3000);
    let running: Vec<_> = (0..clients)
        .map(|_| {
            let converse = Client::Converse {
                to: VIP.parse().unwrap(),
                count,
                pause: Duration::from_millis(3),
            };
            m.a.client("client", converse)
                .stdout(Stdio::piped())
                .spawn_guarded()
                .expect("start a client")
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || streams_opened(
        &m.b, "server"
    ) >= clients as f64));
    upgrade(&mut m, true);
    upgrade(&mut m, false);
    for client in running {
        let out = client.wait_with_output().expect("a client ends");
        assert_eq!(lines(&out), [format!("ok {count}")]);
    }
    // Node A's agent now took them over from its predecessor, then
    // up from node B's; node B's took them over from its predecessor.
    assert_handed(&m.a, "received", clients, "");
    assert_handed(&m.a, "taken_up", clients, "");
    assert_handed(&m.b, "received", clients, "");
    for agent in [&m.a, &m.b] {
        assert_eq!(handed(agent, "dropped"), 0.0);
    }
}

/// A stream that names a token no paused connection has (a guess, a
/// replay, one that expired) is answered 410 and counted; one whose token
/// is no token, 400. The connection's other streams go on.
#[test]
fn a_stream_with_an_unknown_token_takes_nothing_up() {
    let m = tunnelled(None);
    let ledger = format!("127.0.0.1:{}", m.ledger.addr.port());
    let unknown = format!("{ledger}+{}", "5a".repeat(16));
    let bad = format!("{ledger}+not-a-token");
    let out = python_h2(&m, H2_CLIENT, &[&unknown, &bad, &ledger]);
    assert_eq!(
        lines(&out),
        [
            format!("{ledger} 410"),
            format!("{ledger} 400"),
            format!("{ledger} 200 ledger hello"),
        ]
    );
    let refused = |reason: &str| {
        m.b.metrics()
            .sum("sluice_inbound_refusals_total", &[("reason", reason)])
    };
    assert_eq!(refused("resume_refused"), 1.0);
    assert_eq!(refused("tunnel_protocol"), 1.0);
    assert_eq!(m.ledger.accepted(), 1, "only the plain stream reached it");
}

/// An agent that is leaving answers a stream whose token it does not keep
/// 503 at once, not 410 after the wait for a pause still on its way: what
/// it kept went to its successor, which the stream's next try (on a new
/// connection, after this one's GOAWAY) reaches. Node B's agent is
/// stopped under an open tunnel connection; the stream crosses its
/// GOAWAY.
#[test]
fn a_leaving_agent_answers_a_token_it_does_not_keep_503() {
    let mut m = tunnelled(None);
    let ledger = format!("127.0.0.1:{}", m.ledger.addr.port());
    let unknown = format!("{ledger}+{}", "5a".repeat(16));
    let out = std::thread::scope(|s| {
        let peer = s.spawn(|| python_h2(&m, H2_ACROSS_GOAWAY, &[&unknown]));
        assert!(
            wait_until(Duration::from_secs(10), || tunnels_open(&m.b, "server")
                >= 1.0),
            "the peer's connection is open\n{}",
            m.b.log()
        );
        m.b.sigterm();
        peer.join().expect("the peer ends")
    });
    assert_eq!(lines(&out), [format!("{ledger} 503")], "{}", m.b.log());
    let status = m.b.wait(Duration::from_secs(10));
    assert!(status.success(), "node B's agent: {status}\n{}", m.b.log());
    assert_eq!(m.ledger.accepted(), 0, "nothing reached the workload");
}

/// Opens a tunnel connection, waits for the agent's GOAWAY, sends one
/// take-up stream (`ip:port+token`) and prints its status. h2 never sees
/// a GOAWAY (it would open no stream after one, nor take a PING): they
/// are taken out of what it is handed.
const H2_ACROSS_GOAWAY: &str = r#"
import h2.config, h2.connection, h2.events

target = args[0]
sock = tls(20)
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
conn.initiate_connection()
sock.sendall(conn.data_to_send())

pending = b""
def frames():
    """Reads whole frames: (type, bytes)."""
    global pending
    while True:
        while len(pending) < 9 or len(pending) < 9 + int.from_bytes(pending[:3], "big"):
            got = sock.recv(65536)
            assert got, "the agent closed the connection"
            pending += got
        end = 9 + int.from_bytes(pending[:3], "big")
        frame, pending = pending[:end], pending[end:]
        yield frame[3], frame

def hand(frame):
    events = conn.receive_data(frame)
    sock.sendall(conn.data_to_send())
    return events

incoming = frames()
held = []
# Until the agent's GOAWAY: the connection is open, and the agent leaving.
for kind, frame in incoming:
    if kind == 7:
        break
    held.append(frame)
target, _, token = target.partition("+")
sid = conn.get_next_available_stream_id()
conn.send_headers(sid, [(":method", "CONNECT"), (":authority", target), ("sluice-resume", token)])
sock.sendall(conn.data_to_send())
status = None
for frame in held:
    hand(frame)
for kind, frame in incoming:
    if kind == 7:
        continue
    for event in hand(frame):
        if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
            status = dict(event.headers)[b":status"].decode()
    if status is not None:
        break
print(target, status)
sys.stdout.flush()
sock.close()
"#;
