//! Upgrades with connections open: the old agent suspends each one where
//! no byte is half moved and hands it, sockets and bytes in hand, to the
//! new agent, which carries it on; the old agent exits within moments, not
//! at a drain deadline. And the other way an agent goes: killed, its
//! connects take `on_agent_down` at once. Measured on what the clients
//! receive and on the agents' metrics.

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use sluice_testkit::{client::Client, process::SpawnGuarded, wait::wait_until};

use crate::support::*;

/// How long an old agent may take to exit after its successor is ready.
const EXIT_WITHIN: Duration = Duration::from_secs(2);

/// The connections the agent `agent` took over in the upgrade that
/// started it.
fn received(agent: &Agent) -> f64 {
    agent.metrics().sum(
        "sluice_handover_connections_total",
        &[("result", "received")],
    )
}

/// Waits for `old` to exit, at most [`EXIT_WITHIN`] after `since`.
fn exits_soon(old: &mut Agent, since: Instant) {
    let left = EXIT_WITHIN.saturating_sub(since.elapsed());
    let status = old.wait(left.max(Duration::from_millis(1)));
    assert!(status.success(), "old agent: {status}\n{}", old.log());
}

#[test]
fn a_streaming_connection_survives_two_upgrades_with_a_half_close_between() {
    let vip: SocketAddr = "127.77.7.10:8080".parse().unwrap();
    // About 2 s of sending, then 2 s of the server's tail after the
    // client's half-close: one upgrade in each.
    let (bytes, tail, pace) = (1 << 20, 512 << 10, Duration::from_millis(2));
    let server = StreamServer::start(tail, Duration::from_millis(4));
    let config = AgentConfig::new(&[service("stream", &vip.to_string(), &[server.addr])]);
    let mut first = Agent::start(&config);
    let client = first
        .client(
            "client",
            Client::Stream {
                to: vip,
                bytes,
                tail,
                pace,
            },
        )
        .stdout(Stdio::piped())
        .spawn_guarded()
        .expect("start the client");
    assert!(wait_until(Duration::from_secs(10), || {
        first.metrics().sum("sluice_tcp_connections_active", &[]) >= 1.0
    }));

    let mut second = Agent::start(&config);
    exits_soon(&mut first, Instant::now());
    assert_eq!(received(&second), 1.0);
    assert_eq!(
        server.half_closed(),
        0,
        "the half-close comes between the upgrades"
    );

    assert!(wait_until(Duration::from_secs(20), || server.half_closed() == 1));
    let third = Agent::start(&config);
    exits_soon(&mut second, Instant::now());
    assert_eq!(received(&third), 1.0);

    let out = client.wait_with_output().expect("the client ends");
    assert_eq!(
        lines(&out),
        [format!("intact {}", bytes + tail)],
        "every byte, once, in order"
    );
    // The connection closed normally in the agent that carried it last.
    let closed = third.metrics().sum(
        "sluice_tcp_connections_closed_total",
        &[("reason", "closed")],
    );
    assert_eq!(closed, 1.0);
    third.sigterm();
    let mut third = third;
    assert!(third.wait(Duration::from_secs(15)).success());
}

#[test]
fn persistent_clients_see_no_error_and_no_lost_or_doubled_answer_across_an_upgrade() {
    let vip: SocketAddr = "127.77.7.11:5432".parse().unwrap();
    let backends = [Backend::start("l1"), Backend::start("l2")];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = AgentConfig::new(&[service("ledger", &vip.to_string(), &addrs)]);
    let mut old = Agent::start(&config);
    // Eight persistent clients, as a connection pool holds them: each
    // request waits for its answer, which must echo it.
    let count = 1500;
    let clients: Vec<_> = (0..8)
        .map(|_| {
            old.client(
                "client",
                Client::Converse {
                    to: vip,
                    count,
                    pause: Duration::from_millis(2),
                },
            )
            .stdout(Stdio::piped())
            .spawn_guarded()
            .expect("start a client")
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || {
        old.metrics().sum("sluice_tcp_connections_active", &[]) >= 8.0
    }));
    let new = Agent::start(&config);
    exits_soon(&mut old, Instant::now());
    assert_eq!(received(&new), 8.0);
    for client in clients {
        let out = client.wait_with_output().expect("a client ends");
        assert_eq!(lines(&out), [format!("ok {count}")]);
    }
    assert_eq!(
        new.metrics().sum(
            "sluice_handover_connections_total",
            &[("result", "dropped")]
        ),
        0.0
    );
}

/// A SIGKILL under a steady stream of new connects to a fail_open
/// service: every connect made after the kill goes around the agent, none
/// is sent to the killed agent's lingering listener to be reset. (A call
/// already through the agent when it dies fails with it: that is the
/// crash, not the window.) The agent killed is an upgrade's successor,
/// which let its predecessor's watch of the kill window go (the pinned
/// tracepoint links) and keeps its own.
#[test]
fn connects_after_a_kill_go_around_the_agent_and_none_is_reset() {
    let vip: SocketAddr = "127.77.7.12:8080".parse().unwrap();
    let backend = Backend::start("open");
    let config = AgentConfig::new(&[service("catalog", &vip.to_string(), &[backend.addr])
        .mode(Mode::Plaintext)
        .on_agent_down(OnAgentDown::FailOpen)]);
    let mut first = Agent::start(&config);
    let mut agent = Agent::start(&config);
    exits_soon(&mut first, Instant::now());
    let watches = std::fs::read_dir(&config.pin_dir)
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().starts_with("tracepoint_")
        })
        .count();
    assert_eq!(watches, 2, "the successor's two tracepoint links alone");
    let clients: Vec<_> = (0..4)
        .map(|_| {
            agent
                .client(
                    "client",
                    Calls::new(vip, 1_000_000)
                        .lasting(Duration::from_secs(3))
                        .stamped()
                        .show_error(),
                )
                .stdout(Stdio::piped())
                .spawn_guarded()
                .expect("start a client")
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || backend.accepted() >= 400));
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) }, 0);
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    agent.kill();
    let (mut after, mut failed_after) = (0, Vec::new());
    for client in clients {
        for line in lines(&client.wait_with_output().expect("a client ends")) {
            let (began, reply) = line.split_once(' ').expect("a stamped line");
            if began.parse::<u128>().expect("a stamp") > killed_at {
                after += 1;
                if !reply.starts_with("open ") {
                    failed_after.push(line.clone());
                }
            }
        }
    }
    assert!(after >= 100, "only {after} calls after the kill");
    assert!(
        failed_after.is_empty(),
        "reset in the kill window: {failed_after:?}"
    );
}

/// The cgroups the first agent made outlive its upgrade and its
/// successor's crash, and the agent that finally stops removes them.
#[test]
fn the_last_agent_removes_the_cgroups_every_generation_made() {
    let vip: SocketAddr = "127.77.7.13:8080".parse().unwrap();
    let backend = Backend::start("b");
    let config = AgentConfig::new(&[service("cg", &vip.to_string(), &[backend.addr])]);
    let root = config.cgroup_root_path();
    let mut first = Agent::start(&config);
    assert!(root.exists(), "the first agent makes the cgroup root");
    let mut second = Agent::start(&config);
    exits_soon(&mut first, Instant::now());
    assert!(
        root.exists(),
        "an upgrade leaves the cgroups to the successor"
    );
    second.kill();
    let third = Agent::start(&config);
    assert!(third.calls(vip, 2).iter().all(|r| r.starts_with("b ")));
    third.sigterm();
    let mut third = third;
    assert!(third.wait(Duration::from_secs(15)).success());
    assert!(!root.exists(), "cgroups left behind: {}", root.display());
}

/// An endpoint the old agent ejected is still ejected in the new one, for
/// what was left of its ejection, and takes no call there.
#[test]
fn an_ejected_endpoint_stays_ejected_across_an_upgrade() {
    let vip: SocketAddr = "127.77.7.14:8080".parse().unwrap();
    let alive = Backend::start("alive");
    let mut dead = Some(Backend::start("dead"));
    let dead_addr = dead.as_ref().unwrap().addr;
    let config =
        AgentConfig::new(&[
            service("ejecting", &vip.to_string(), &[alive.addr, dead_addr]).outlier_detection(
                OutlierDetection {
                    consecutive_failures: Some(1),
                    base_ejection_time: Some(Duration::from_secs(60)),
                    ..OutlierDetection::default()
                },
            ),
        ]);
    let mut old = Agent::start(&config);
    drop(dead.take());
    let calls = old.calls(vip, 10);
    assert!(calls.iter().all(|r| r.starts_with("alive ")), "{calls:?}");
    assert_eq!(old.endpoint(dead_addr)["breaker"], "open");

    let new = Agent::start(&config);
    exits_soon(&mut old, Instant::now());
    // Before any call through the new agent.
    let view = new.endpoint(dead_addr);
    assert_eq!(view["breaker"], "open", "{view}");
    assert_eq!(view["ejections"], 1, "{view}");
    let left = view["ejected_for_seconds"].as_f64().unwrap_or(0.0);
    assert!(left > 50.0 && left <= 60.0, "{view}");
    // The dead endpoint is not tried (no failed connect to retry).
    let _dead_again = Backend::start_on("dead", dead_addr);
    let calls = new.calls(vip, 10);
    assert!(calls.iter().all(|r| r.starts_with("alive ")), "{calls:?}");
}

/// A connection the new agent cannot carry on (its service is gone from
/// the config the new agent starts with) is reset on both sides and
/// counted as dropped; the old agent still exits at once.
#[test]
fn a_moved_connection_whose_service_is_gone_is_reset_and_counted() {
    let vip: SocketAddr = "127.77.7.13:5432".parse().unwrap();
    let other: SocketAddr = "127.77.7.14:5432".parse().unwrap();
    let backend = Backend::start("gone");
    let config = AgentConfig::new(&[service("ledger", &vip.to_string(), &[backend.addr])]);
    let mut old = Agent::start(&config);
    let client = old
        .client(
            "client",
            Client::Converse {
                to: vip,
                count: 2000,
                pause: Duration::from_millis(5),
            },
        )
        .stdout(Stdio::piped())
        .spawn_guarded()
        .expect("start a client");
    assert!(wait_until(Duration::from_secs(10), || {
        old.metrics().sum("sluice_tcp_connections_active", &[]) >= 1.0
    }));
    // The old agent reloads this too; its open connection carries on.
    config.rewrite(&[service("audit", &other.to_string(), &[backend.addr])]);
    assert!(wait_until(Duration::from_secs(10), || {
        old.view("/debug/services").to_string().contains("audit")
    }));
    let new = Agent::start(&config);
    exits_soon(&mut old, Instant::now());
    let dropped = || {
        new.metrics().sum(
            "sluice_handover_connections_total",
            &[("result", "dropped")],
        )
    };
    assert!(
        wait_until(Duration::from_secs(5), || dropped() == 1.0),
        "dropped: {}",
        dropped()
    );
    assert_eq!(received(&new), 0.0);
    let out = client.wait_with_output().expect("the client ends");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("FAILED at"), "{said}");
}

/// HTTP connections (a `protocol: http` service) cannot move: when the
/// old agent drains it ends each one gracefully (the request in hand is
/// answered, with `Connection: close`), and the clients' next requests
/// open connections to the new agent. The old agent exits at once, not at
/// its drain deadline. Each client resends a GET once if its kept
/// connection was closed as the request went out, as HTTP clients do.
#[test]
fn http_connections_end_gracefully_in_an_upgrade_and_their_clients_go_on() {
    let vip: SocketAddr = "127.77.7.15:8080".parse().unwrap();
    let backends = [
        crate::l7::HttpBackend::start("h1", crate::l7::Answer::Status(200)),
        crate::l7::HttpBackend::start("h2", crate::l7::Answer::Status(200)),
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = AgentConfig::new(&[service("pay", &vip.to_string(), &addrs).protocol("http")]);
    let mut old = Agent::start(&config);
    let script = format!(
        "python3 - <<'PY'
import http.client, time
c = http.client.HTTPConnection('{}', {}, timeout=10)
ok = resent = 0
for i in range(600):
    for attempt in (1, 2):
        try:
            c.request('GET', '/balance/%d' % i)
            r = c.getresponse()
            r.read()
            ok += r.status == 200
            break
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            c.close()
            resent += 1
    time.sleep(0.005)
print('ok', ok, 'resent', resent)
PY",
        vip.ip(),
        vip.port()
    );
    let clients: Vec<_> = (0..4)
        .map(|_| {
            old.client_command(&script)
                .stdout(Stdio::piped())
                .spawn_guarded()
                .expect("start a client")
        })
        .collect();
    let served = |agent: &Agent| {
        agent.metrics().sum(
            "sluice_requests_total",
            &[
                ("destination_service", "pay"),
                ("response_code_class", "2xx"),
            ],
        )
    };
    assert!(wait_until(Duration::from_secs(10), || served(&old) >= 100.0));
    let new = Agent::start(&config);
    exits_soon(&mut old, Instant::now());
    for client in clients {
        let out = client.wait_with_output().expect("a client ends");
        let said = String::from_utf8_lossy(&out.stdout);
        let f: Vec<&str> = said.split_whitespace().collect();
        assert_eq!(f[..2], ["ok", "600"], "{said}");
        // At most the one request each connection had out as it closed.
        assert!(f[3].parse::<u32>().unwrap() <= 1, "{said}");
    }
    assert!(served(&new) > 0.0, "the new agent served none");
}
