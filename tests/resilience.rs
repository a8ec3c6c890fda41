//! Resilience end to end, as root: real backends that die and come back,
//! held connections that reach a threshold, a backend that never answers,
//! config reloads under traffic. The agent and redirect are the real ones.

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use crate::support::*;

const VIP: &str = "127.77.1.10:8080";

fn vip() -> SocketAddr {
    VIP.parse().unwrap()
}

/// One of three backends dies under a steady stream of calls: it is ejected
/// after the configured two failures, no call fails (the failed connects
/// are retried on another endpoint), and once it is back it is probed and
/// trusted again within its ejection time.
#[test]
fn a_dead_backend_is_ejected_then_taken_back() {
    let b1 = Backend::start("b1");
    let mut b2 = Some(Backend::start("b2"));
    let b2_addr = b2.as_ref().unwrap().addr;
    let b3 = Backend::start("b3");
    let config = AgentConfig::new(&[service("payments", VIP, &[b1.addr, b2_addr, b3.addr])
        .outlier_detection(OutlierDetection {
            consecutive_failures: Some(2),
            base_ejection_time: Some(Duration::from_secs(2)),
            max_ejection_time: Some(Duration::from_secs(10)),
            ..OutlierDetection::default()
        })]);
    let agent = Agent::start(&config);

    let before = agent.calls(vip(), 30);
    assert_eq!(
        answered_by(&before).iter().filter(|b| **b == "b2").count(),
        10
    );

    drop(b2.take());
    std::thread::sleep(Duration::from_millis(50));
    let during = agent.calls(vip(), 60);
    assert!(!during.iter().any(|r| r == "FAILED"), "{during:?}");
    assert!(!answered_by(&during).contains(&"b2"));
    // Ejected once, for the base ejection time (2 s)...
    let b2_view = agent.endpoint(b2_addr);
    let ejected_at = Instant::now();
    assert_eq!(b2_view["breaker"], "open", "{b2_view}");
    assert_eq!(b2_view["ejections"], 1, "{b2_view}");
    let ejected_for = b2_view["ejected_for_seconds"].as_f64().unwrap_or(0.0);
    assert!(ejected_for > 0.0 && ejected_for <= 2.0, "{b2_view}");
    // ...after exactly two failed connects, each retried on another
    // endpoint (no call failed).
    let retries = agent.metrics().sum(
        "sluice_connect_retries_total",
        &[("destination_service", "payments")],
    );
    assert_eq!(retries, 2.0, "ejected after exactly two failures");

    let _b2 = Backend::start_on("b2", b2_addr);
    // Calls every 100 ms until b2 answers again.
    let mut client = agent
        .client(
            "client",
            Calls::new(vip(), 80).pause(Duration::from_millis(100)),
        )
        .stdout(Stdio::piped())
        .spawn_guarded()
        .unwrap();
    // Trusted again once its half-open probe passes.
    let restored = wait_until(Duration::from_secs(5), || {
        agent.endpoint(b2_addr)["breaker"] == "closed"
    });
    let back_after = ejected_at.elapsed();
    let _ = client.kill();
    let out = client.wait_with_output().unwrap();
    let replies: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(restored, "{}", agent.endpoint(b2_addr));
    assert!(
        back_after < Duration::from_millis(3500),
        "taken back after {back_after:?} (ejection time 2s)"
    );
    assert!(answered_by(&replies).contains(&"b2"), "{replies:?}");
    assert!(!replies.iter().any(|r| r == "FAILED"), "{replies:?}");
}

/// A backend that takes every connection and resets it once the call is
/// in: each connect succeeds, and it is ejected after the configured two
/// resets all the same; the calls after go to the good backend. (A call
/// whose bytes went out cannot be retried at L4: those two fail.)
#[test]
fn a_backend_that_resets_every_connection_is_ejected() {
    let good = Backend::start("b1");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let resetter = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().map_while(Result::ok) {
            let mut first = [0u8; 1];
            let _ = std::io::Read::read(&mut &conn, &mut first);
            let _ = sluice_testkit::client::zero_linger(&conn);
        }
    });
    let config = AgentConfig::new(&[service("payments", VIP, &[good.addr, resetter])
        .load_balancer(LbPolicy::RoundRobin)
        .outlier_detection(OutlierDetection {
            consecutive_failures: Some(2),
            base_ejection_time: Some(Duration::from_secs(60)),
            ..OutlierDetection::default()
        })]);
    let agent = Agent::start(&config);
    let replies = agent.calls(vip(), 20);
    let failed = replies.iter().filter(|r| *r == "FAILED").count();
    assert_eq!(failed, 2, "{replies:?}");
    let by_good = answered_by(&replies).iter().filter(|b| **b == "b1").count();
    assert_eq!(by_good, 18, "{replies:?}");
    let view = agent.endpoint(resetter);
    assert_eq!(view["breaker"], "open", "{view}");
    assert_eq!(view["ejections"], 1, "{view}");
    assert_eq!(agent.endpoint(good.addr)["breaker"], "closed");
}

/// With max_connections reached, a new call is reset at once (the connect
/// timeout is 5 s) and counted; the held connections and other services
/// carry on.
#[test]
fn over_max_connections_new_calls_fail_fast() {
    let backend = Backend::start("b1");
    let other = Backend::start("other");
    let config = AgentConfig::new(&[
        service("payments", VIP, &[backend.addr])
            .circuit_breakers(CircuitBreakers {
                max_connections: Some(2),
                ..CircuitBreakers::default()
            })
            .timeouts(Timeouts {
                connect: Some(Duration::from_secs(5)),
                ..Timeouts::default()
            }),
        service("ledger", "127.77.1.11:8080", &[other.addr]),
    ]);
    let agent = Agent::start(&config);

    let (mut held_1, mut held_2) = (agent.hold("client", vip()), agent.hold("client", vip()));
    assert_eq!(held_1.ask("held-1"), "b1 held-1");
    assert_eq!(held_2.ask("held-2"), "b1 held-2");
    let third = agent.run_client("client", Calls::new(vip(), 1).text("third").timed());
    assert_eq!(third[0], "FAILED", "{third:?}");
    let elapsed: u64 = third[1]
        .strip_prefix("elapsed_ms ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(elapsed < 500, "failed after {elapsed} ms; not fast");
    assert_eq!(
        agent.calls("127.77.1.11:8080".parse().unwrap(), 1),
        ["other call 1"]
    );
    assert_eq!(held_1.ask("again-1"), "b1 again-1");
    assert_eq!(held_2.ask("again-2"), "b1 again-2");
    assert_eq!(
        backend.accepted(),
        2,
        "the third call never reached the backend"
    );
    let fast_failures = || {
        agent.metrics().sum(
            "sluice_circuit_breaker_fast_failures_total",
            &[
                ("destination_service", "payments"),
                ("reason", "max_connections"),
            ],
        )
    };
    assert!(wait_until(Duration::from_secs(5), || fast_failures() >= 1.0));
    assert_eq!(fast_failures(), 1.0, "the third call alone failed fast");
}

/// A backend that accepts and never answers: the idle timeout (500 ms here)
/// resets the connection.
#[test]
fn a_backend_that_never_answers_is_cut_by_the_idle_timeout() {
    let silent = SilentBackend::start();
    let config = AgentConfig::new(
        &[service("payments", VIP, &[silent.addr]).timeouts(Timeouts {
            idle: Some(Duration::from_millis(500)),
            ..Timeouts::default()
        })],
    );
    let agent = Agent::start(&config);

    let script = format!(
        "exec 3<>/dev/tcp/{}/{} || exit 1; echo hello >&3; start=$(date +%s%N); \
         if read -r -t 10 r <&3; then echo \"got $r\"; else echo CLOSED; fi; \
         echo \"elapsed_ms $(( ($(date +%s%N) - start) / 1000000 ))\"",
        vip().ip(),
        vip().port()
    );
    let replies = lines(&agent.run_as_client(&script));
    assert_eq!(replies[0], "CLOSED");
    let elapsed: u64 = replies[1]
        .strip_prefix("elapsed_ms ")
        .unwrap()
        .parse()
        .unwrap();
    assert!((400..3000).contains(&elapsed), "closed after {elapsed} ms");
}

/// A reload adds an endpoint and removes one while a connection to the
/// removed one is open: that connection carries on (drains), new calls use
/// the new set. A broken file is refused and the running config kept.
#[test]
fn reload_applies_without_dropping_connections() {
    let old = Backend::start("old");
    let new = Backend::start("new");
    let config = AgentConfig::new(&[service("payments", VIP, &[old.addr])]);
    let agent = Agent::start(&config);
    let mut held = agent.hold("client", vip());
    assert_eq!(held.ask("first"), "old first");

    let reloads = |result: &str| agent.reloads(result);
    let endpoints = || -> Vec<serde_json::Value> {
        let view = agent.view("/debug/endpoints");
        view.as_array().cloned().unwrap_or_default()
    };
    let reloaded = reloads("success");
    config.write_raw("node: [this is not a config\n");
    assert!(wait_until(Duration::from_secs(5), || reloads("failure") == 1.0));
    assert_eq!(
        reloads("success"),
        reloaded,
        "the broken file was not applied"
    );
    config.rewrite(&[service("payments", VIP, &[new.addr])]);
    assert!(
        wait_until(Duration::from_secs(5), || reloads("success")
            == reloaded + 1.0),
        "{}",
        agent.log()
    );
    let now = endpoints();
    assert!(
        now.len() == 1 && now[0]["address"] == new.addr.to_string(),
        "{now:?}"
    );
    assert_eq!(held.ask("second"), "old second");
    assert_eq!(agent.calls(vip(), 2), ["new call 1", "new call 2"]);
    assert_eq!(old.accepted(), 1);
}

/// A reload that changes what the agent builds once at its start (the
/// tunnels' idle timeout, the inbound handshake deadline) applies the rest
/// of the file at once, and names the fields that wait for a restart in
/// `sluice status` and in `sluice_config_restart_pending`; a file that
/// takes them back clears them.
/// SIGHUP reloads the file even when its modification time says nothing
/// changed (a file put in place with its old time, as some config
/// managers and `cp -p` do), which the poll alone would miss.
#[test]
fn sighup_reloads_a_file_the_poll_would_miss() {
    let old = Backend::start("old");
    let new = Backend::start("new");
    let config = AgentConfig::new(&[service("payments", VIP, &[old.addr])]);
    let agent = Agent::start(&config);
    assert_eq!(agent.calls(vip(), 1), ["old call 1"]);
    let reloads = || agent.reloads("success");
    let before = reloads();
    // The new file, given the old one's time before it takes its place.
    let time = std::fs::metadata(&config.path).unwrap().modified().unwrap();
    let staged = config.dir.join("staged.yaml");
    config
        .base(&[service("payments", VIP, &[new.addr])])
        .write(&staged)
        .unwrap();
    std::fs::File::options()
        .write(true)
        .open(&staged)
        .and_then(|f| f.set_modified(time))
        .unwrap();
    std::fs::rename(&staged, &config.path).unwrap();
    assert_eq!(
        std::fs::metadata(&config.path).unwrap().modified().unwrap(),
        time
    );
    // SAFETY: kill(2) on the agent this test started.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) }, 0);
    assert!(
        wait_until(Duration::from_secs(5), || reloads() == before + 1.0),
        "{}",
        agent.log()
    );
    assert_eq!(agent.calls(vip(), 1), ["new call 1"]);
}

#[test]
fn a_reload_names_the_changes_that_wait_for_a_restart() {
    let old = Backend::start("old");
    let new = Backend::start("new");
    let config = AgentConfig::new(&[service("payments", VIP, &[old.addr])]);
    let agent = Agent::start(&config);
    let reloads = || agent.reloads("success");
    let pending = |field: &str| {
        agent
            .metrics()
            .get("sluice_config_restart_pending", &[("field", field)])
    };
    let status = || agent.view("/debug/status")["restart_pending"].clone();
    assert_eq!(
        pending("mesh.tunnels"),
        Some(0.0),
        "every field is listed from the start"
    );
    assert_eq!(status(), serde_json::json!([]));

    let mut changed = config.base(&[service("payments", VIP, &[new.addr])]);
    changed.mesh = Some(config::Mesh {
        inbound_handshake_timeout: Some(Duration::from_secs(3)),
        certificates: None,
        tunnels: Some(config::Tunnels {
            enabled: true,
            idle_timeout: Some(Duration::from_secs(5)),
            ..config::Tunnels::default()
        }),
    });
    let before = reloads();
    config.write(&changed);
    assert!(
        wait_until(Duration::from_secs(5), || reloads() == before + 1.0),
        "{}",
        agent.log()
    );
    assert_eq!(
        agent.calls(vip(), 1),
        ["new call 1"],
        "the rest applies now"
    );
    assert_eq!(pending("mesh.tunnels"), Some(1.0));
    assert_eq!(pending("mesh.inbound_handshake_timeout"), Some(1.0));
    assert_eq!(pending("agent"), Some(0.0));
    assert_eq!(
        status(),
        serde_json::json!(["mesh.inbound_handshake_timeout", "mesh.tunnels"])
    );
    let shown = agent.sluice(&["status"]);
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains(
            "restart      needed: the file in force changed mesh.inbound_handshake_timeout, mesh.tunnels"
        ),
        "{shown:?}"
    );

    config.rewrite(&[service("payments", VIP, &[new.addr])]);
    assert!(wait_until(Duration::from_secs(5), || reloads() == before + 2.0));
    assert_eq!(pending("mesh.tunnels"), Some(0.0));
    assert_eq!(status(), serde_json::json!([]));
}
