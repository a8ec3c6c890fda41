//! End to end, as root: real eBPF programs on a real cgroup, a real agent
//! process, clients run inside the workload cgroup, real TCP backends.

use std::{
    fs,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Stdio,
    time::{Duration, Instant},
};

use crate::support::*;
use sluice_maps::Stat;

/// A virtual address inside 127/8: if a test ever ran without its hook the
/// call would fail on this machine instead of leaving it.
const VIP: &str = "127.77.0.10:8080";

#[test]
fn calls_to_the_virtual_address_are_round_robined_over_three_backends() {
    let backends = [
        Backend::start("b1"),
        Backend::start("b2"),
        Backend::start("b3"),
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = AgentConfig::new(&[service("payments", VIP, &addrs)]);
    let agent = Agent::start(&config);

    let replies = agent.calls(VIP.parse().unwrap(), 300);

    assert_eq!(replies.len(), 300);
    let answered_by: Vec<&str> = replies
        .iter()
        .map(|r| r.split_whitespace().next().unwrap())
        .collect();
    let first_three = &answered_by[..3];
    let mut distinct = first_three.to_vec();
    distinct.sort();
    assert_eq!(distinct, ["b1", "b2", "b3"], "{first_three:?}");
    for (i, who) in answered_by.iter().enumerate() {
        assert_eq!(
            *who,
            first_three[i % 3],
            "call {} broke the rotation",
            i + 1
        );
    }
    for (i, reply) in replies.iter().enumerate() {
        assert!(reply.ends_with(&format!("call {}", i + 1)), "{reply}");
    }
    for b in &backends {
        assert_eq!(b.accepted(), 100, "{} accepted", b.name);
    }
    assert_eq!(agent.stat(Stat::Redirected), 300);
}

#[test]
fn connections_to_other_destinations_go_straight_through() {
    let meshed = Backend::start("meshed");
    let direct = Backend::start("direct");
    let config = AgentConfig::new(&[service("payments", VIP, &[meshed.addr])]);
    let agent = Agent::start(&config);

    let replies = agent.calls(direct.addr, 3);

    assert_eq!(replies, ["direct call 1", "direct call 2", "direct call 3"]);
    assert_eq!(direct.accepted(), 3);
    assert_eq!(meshed.accepted(), 0);
    assert_eq!(agent.stat(Stat::Redirected), 0);
    assert!(agent.stat(Stat::NotMeshed) >= 3);
}

/// The agent runs inside the hooked cgroup and the service's virtual
/// address is its own endpoint's address: without the mark check the
/// agent's upstream connect would be redirected back to itself forever.
#[test]
fn the_agents_own_upstream_connections_are_not_redirected() {
    let backend = Backend::start("b1");
    let vip = backend.addr.to_string();
    let config = AgentConfig::new(&[service("loop", &vip, &[backend.addr])]);
    let agent_cgroup = config.cgroup_root_path().join("agent");
    fs::create_dir_all(&agent_cgroup).unwrap();
    let agent = Agent::start_in_cgroup(&config, &agent_cgroup);

    let replies = agent.calls(backend.addr, 2);

    assert_eq!(replies, ["b1 call 1", "b1 call 2"]);
    assert_eq!(backend.accepted(), 2);
    assert_eq!(
        agent.stat(Stat::Redirected),
        2,
        "only the client's connects"
    );
    assert_eq!(agent.stat(Stat::AgentSocket), 2, "the agent's own connects");
}

#[test]
fn record_maps_are_empty_after_10000_connections() {
    let backends = [Backend::start("b1"), Backend::start("b2")];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = AgentConfig::new(&[service("payments", VIP, &addrs)]);
    let agent = Agent::start(&config);

    let replies = agent.calls(VIP.parse().unwrap(), 10_000);

    assert_eq!(replies.len(), 10_000);
    assert!(!replies.iter().any(|r| r == "FAILED"));
    assert_eq!(agent.stat(Stat::Redirected), 10_000);
    assert_eq!(agent.stat(Stat::Established), 10_000);
    assert_eq!(agent.record_counts(), (0, 0));
}

/// SIGTERM with a connection mid-exchange: the agent stops accepting, lets
/// the exchange finish, then detaches, so the same address reaches its
/// real destination again.
#[test]
fn sigterm_drains_open_connections_then_detaches() {
    let backend = Backend::start("meshed");
    let real = Backend::start("real");
    let config = AgentConfig::new(&[service("payments", &real.addr.to_string(), &[backend.addr])]);
    let mut agent = Agent::start(&config);
    let go = config.dir.join("go");
    let after_exit = config.dir.join("after-exit");
    let script = format!(
        "exec 3<>/dev/tcp/{ip}/{port} || exit 1; printf 'pay' >&3; \
         while [ ! -e {go} ]; do sleep 0.02; done; \
         printf 'ment\\n' >&3; read -r reply <&3; echo \"$reply\"; exec 3>&-; \
         while [ ! -e {after} ]; do sleep 0.02; done; \
         exec 3<>/dev/tcp/{ip}/{port} || exit 1; echo again >&3; read -r reply <&3; echo \"$reply\"",
        ip = real.addr.ip(),
        port = real.addr.port(),
        go = go.display(),
        after = after_exit.display(),
    );
    let client = agent
        .client_command(&script)
        .stdout(Stdio::piped())
        .spawn_guarded()
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || backend.accepted() == 1));

    agent.sigterm();
    assert!(wait_until(Duration::from_secs(5), || agent.stopping()));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        agent.is_running(),
        "the agent must wait for the open exchange"
    );

    fs::write(&go, "").unwrap();
    let status = agent.wait(Duration::from_secs(10));
    assert!(status.success(), "agent exited with {status}");
    assert!(!config.pin_dir.exists(), "pins must be gone after the stop");

    fs::write(&after_exit, "").unwrap();
    let out = client.wait_with_output().unwrap();
    assert_eq!(lines(&out), ["meshed payment", "real again"]);
    assert_eq!(real.accepted(), 1);
}

/// An endpoint that refuses: the client is closed at once, one warning
/// names the service and endpoint, other connections carry on.
#[test]
fn a_refusing_endpoint_resets_the_client_and_is_logged() {
    let healthy = Backend::start("healthy");
    let refusing: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let config = AgentConfig::new(&[
        service("broken", VIP, &[refusing]),
        service("payments", "127.77.0.11:8080", &[healthy.addr]),
    ]);
    let agent = Agent::start(&config);

    // A long-lived connection to the healthy service spans the failure.
    let started = Instant::now();
    let mut held = agent.hold("client", "127.77.0.11:8080".parse().unwrap());
    let replies = [
        vec![held.ask("before")],
        agent.calls(VIP.parse().unwrap(), 1),
        vec![held.ask("after")],
    ]
    .concat();
    assert_eq!(
        replies,
        ["healthy before", "FAILED", "healthy after"],
        "log:\n{}",
        agent.log()
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(agent.wait_for_log(&format!("endpoint {refusing}")));
    let warnings: Vec<String> = agent
        .log()
        .lines()
        .filter(|l| l.contains("WARN"))
        .map(str::to_owned)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("service payments/broken"),
        "{warnings:?}"
    );
    assert!(
        warnings[0].contains(&format!("endpoint {refusing}")),
        "{warnings:?}"
    );
}

/// An endpoint whose accept queue is full drops SYNs: the agent gives up
/// after connect_timeout (300ms here) and closes the client.
#[test]
fn an_endpoint_that_never_answers_times_out() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    // Listening again resets the backlog: zero leaves room for one.
    // SAFETY: listen(2) on a socket we own.
    assert_eq!(unsafe { libc::listen(silent.as_raw_fd(), 0) }, 0);
    let silent_addr = silent.local_addr().unwrap();
    // Fill the one-slot accept queue so further SYNs are dropped.
    let fillers: Vec<TcpStream> = (0..4)
        .filter_map(|_| TcpStream::connect_timeout(&silent_addr, Duration::from_millis(100)).ok())
        .collect();
    let config = AgentConfig::new(&[service("slow", VIP, &[silent_addr])]);
    let agent = Agent::start(&config);

    let started = Instant::now();
    let replies = agent.calls(VIP.parse().unwrap(), 1);
    let took = started.elapsed();

    assert_eq!(replies, ["FAILED"]);
    assert!(took >= Duration::from_millis(250), "gave up after {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(
        agent.wait_for_log(&format!("service payments/slow: endpoint {silent_addr}")),
        "{}",
        agent.log()
    );
    assert!(agent.log().contains("no answer within 300ms"));
    drop(fillers);
}

/// A crash (SIGKILL) leaves the programs pinned: other destinations still
/// work and meshed ones fail fast. The next agent takes over the pins, with
/// exactly one set of programs attached afterwards.
#[test]
fn a_new_agent_takes_over_from_a_crashed_one() {
    let meshed = Backend::start("meshed");
    let direct = Backend::start("direct");
    let config = AgentConfig::new(&[service("payments", VIP, &[meshed.addr])]);
    let mut first = Agent::start(&config);
    first.kill();
    assert!(config.pin_dir.join("link_connect4").exists());

    assert_eq!(first.calls(direct.addr, 1), ["direct call 1"]);
    assert_eq!(first.calls(VIP.parse().unwrap(), 1), ["FAILED"]);

    let second = Agent::start(&config);
    assert!(
        second
            .log()
            .contains("replaced the link a previous agent pinned")
    );
    let not_meshed_before = second.stat(Stat::NotMeshed);
    let redirected_before = second.stat(Stat::Redirected);
    assert_eq!(
        second.calls(VIP.parse().unwrap(), 2),
        ["meshed call 1", "meshed call 2"]
    );
    // A second, stale connect4 would see the rewritten address and count it
    // as not meshed; one program counts each call once as redirected.
    assert_eq!(second.stat(Stat::Redirected), redirected_before + 2);
    assert_eq!(second.stat(Stat::NotMeshed), not_meshed_before);
}

#[test]
fn ebpf_log_events_switch_on_and_off_at_run_time() {
    const EVENT: &str = "connect4: redirect";
    let backend = Backend::start("b1");
    let config = AgentConfig::new(&[service("payments", VIP, &[backend.addr])]);
    let agent = Agent::start(&config);
    let vip: SocketAddr = VIP.parse().unwrap();

    agent.calls(vip, 1);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!agent.log().contains(EVENT), "off by default");

    assert!(agent.sluice(&["ebpf-log", "on"]).status.success());
    agent.calls(vip, 1);
    assert!(agent.wait_for_log(EVENT), "{}", agent.log());

    assert!(agent.sluice(&["ebpf-log", "off"]).status.success());
    let events = agent.log().matches(EVENT).count();
    agent.calls(vip, 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(agent.log().matches(EVENT).count(), events);
}

/// A root process in a workload cgroup that sets the agent's mark on its
/// socket is still redirected: the mark counts only from the agent's own
/// cgroup. The virtual address has no listener, so a bypass would fail.
#[test]
fn a_workload_that_sets_the_agents_mark_is_still_redirected() {
    let backend = Backend::start("meshed");
    let config = AgentConfig::audited(&[service("payments", VIP, &[backend.addr])]);
    let audit = config.audit_path();
    let agent = Agent::start(&config);
    let spoofed = Calls::new(VIP.parse().unwrap(), 1)
        .text("spoofed")
        .mark(0x51ce);

    let replies = agent.run_client("client", spoofed);

    assert_eq!(replies, ["meshed spoofed 1"]);
    assert_eq!(agent.stat(Stat::MarkSpoofed), 1);
    // The attempt is in the audit trail, with who made it.
    let attempts = audit_lines(&audit, "mark_spoofed", 1);
    let attempt = attempts.first().expect("the attempt is audited");
    assert_eq!(attempt["event"], "bypass_attempt");
    assert_eq!(attempt["decision"], "redirect");
    assert_eq!(
        attempt["source"]["identity"],
        "spiffe://cluster.local/ns/payments/sa/client"
    );
    assert_eq!(attempt["destination"]["address"], VIP);
    assert_eq!(agent.stat(Stat::Redirected), 1);
    assert_eq!(agent.stat(Stat::AgentSocket), 0);
}

/// SIGTERM with a connection open: a new redirected connect is refused at
/// once (the listening socket stops listening for every holder, the
/// handover offer too), while the open connection keeps flowing.
#[test]
fn during_the_drain_a_new_connect_is_refused_at_once() {
    let backend = Backend::start("meshed");
    let config = AgentConfig::new(&[service("payments", VIP, &[backend.addr])]);
    let mut agent = Agent::start(&config);
    let vip: std::net::SocketAddr = VIP.parse().unwrap();
    let mut open = agent.hold("client", vip);
    assert_eq!(open.ask("first"), "meshed first");

    agent.sigterm();
    // Stopping: the admin API says so until the end.
    assert!(wait_until(Duration::from_secs(10), || agent.stopping()));
    let probe = agent.run_client("client", Calls::new(vip, 1).show_error().timed());
    assert_eq!(probe[0], "FAILED ConnectionRefused", "{probe:?}");
    let millis: u64 = probe[1]
        .strip_prefix("elapsed_ms ")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("{probe:?}"));
    assert!(millis < 100, "refused after {millis} ms");
    assert!(agent.is_running(), "the open connection is still draining");

    assert_eq!(open.ask("second"), "meshed second");
    open.close();
    assert!(agent.wait(Duration::from_secs(10)).success());
}
