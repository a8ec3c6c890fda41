//! The kernel fast path and what survives the agent, as root: kernel-mode
//! services balanced by `connect4` with no proxy process in the path,
//! outcomes fed back to outlier detection, and proxy-mode services failing
//! open or closed while the agent is killed.

use std::{net::SocketAddr, time::Duration};

use crate::support::*;
use sluice_maps::Stat;

#[test]
fn kernel_mode_keeps_weights_with_no_agent_running() {
    let vip: SocketAddr = "127.77.6.10:8080".parse().unwrap();
    let backends = [
        Backend::start("w1"),
        Backend::start("w2"),
        Backend::start("w3"),
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let service = service("ledger", &vip.to_string(), &addrs)
        .weights(&[1, 2, 3])
        .mode(Mode::Kernel)
        .load_balancer(LbPolicy::WeightedRoundRobin);
    let config = AgentConfig::new(&[service]);
    let mut agent = Agent::start(&config);
    // The agent wrote the table; now it goes away as a crash would, and
    // the kernel balances on its own.
    agent.kill();

    const CALLS: usize = 10_000;
    let replies = agent.calls(vip, CALLS);
    assert_eq!(replies.len(), CALLS);
    let by = counts(answered_by(&replies));
    assert_eq!(by.get("FAILED"), None, "{by:?}");
    for (name, weight) in [("w1", 1.0), ("w2", 2.0), ("w3", 3.0)] {
        let share = *by.get(name).unwrap_or(&0) as f64 / CALLS as f64;
        let want = weight / 6.0;
        assert!(
            (share - want).abs() <= 0.02 * want,
            "{name}: share {share:.4}, configured {want:.4} ({by:?})"
        );
    }
    assert_eq!(agent.stat(Stat::KernelBalanced), CALLS as u64);
    assert_eq!(agent.stat(Stat::Redirected), 0, "the proxy was never asked");
    // Clean up what the killed agent left attached: a new agent takes the
    // pins over and removes them when it stops.
    let successor = Agent::start(&config);
    successor.sigterm();
}

#[test]
fn the_application_sees_the_virtual_address_as_its_peer() {
    let vip: SocketAddr = "127.77.6.20:8080".parse().unwrap();
    let backend = Backend::start("p1");
    let service = service("ledger", &vip.to_string(), &[backend.addr]).mode(Mode::Kernel);
    let config = AgentConfig::new(&[service]);
    let agent = Agent::start(&config);

    let out = agent.run_client("client", Calls::new(vip, 1).text("hello").show_peer());
    assert_eq!(out, [format!("{vip} p1 hello 1")]);
    assert_eq!(backend.accepted(), 1);
    assert_eq!(agent.stat(Stat::KernelBalanced), 1);
}

/// Every endpoint of a kernel-mode service ejected: with `panic:
/// fail_closed` the hook's table is emptied and a connect is refused with
/// EPERM by the hook itself; with `route_to_all` it still goes to an
/// endpoint (here one that refuses: ECONNREFUSED).
#[test]
fn with_every_endpoint_ejected_fail_closed_refuses_in_the_hook() {
    let closed = || -> SocketAddr {
        format!("127.0.0.1:{}", free_port().unwrap())
            .parse()
            .unwrap()
    };
    let (shut, all) = ("127.77.6.40:8080", "127.77.6.41:8080");
    let ejecting = |name: &str, vip: &str, panic: &str| {
        service(name, vip, &[closed(), closed()])
            .mode(Mode::Kernel)
            .panic(panic)
            .outlier_detection(OutlierDetection {
                consecutive_failures: Some(1),
                base_ejection_time: Some(Duration::from_secs(60)),
                max_ejection_percent: Some(100),
                ..OutlierDetection::default()
            })
    };
    let config = AgentConfig::new(&[
        ejecting("shut", shut, "fail_closed"),
        ejecting("all", all, "route_to_all"),
    ]);
    let agent = Agent::start(&config);
    // The errno name of one connect to `vip`, as the client workload.
    let connect = |vip: &str| {
        let (host, port) = vip.split_once(':').unwrap();
        let script = format!(
            "python3 -c \"
import errno, socket
try:
    socket.create_connection(('{host}', {port}), timeout=5)
    print('connected')
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno))
\""
        );
        lines(&agent.client_command(&script).output().expect("run python3")).join(" ")
    };
    let ejected = |name: &str| {
        agent
            .view("/debug/endpoints")
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["service"] == format!("payments/{name}") && e["breaker"] == "open")
            .count()
    };
    for (name, vip) in [("shut", shut), ("all", all)] {
        assert!(
            wait_until(Duration::from_secs(10), || {
                connect(vip);
                ejected(name) == 2
            }),
            "{name}: {}",
            agent.view("/debug/endpoints")
        );
    }
    // The agent writes the next table within 100 ms of an ejection.
    assert!(
        wait_until(Duration::from_secs(3), || connect(shut) == "EPERM"),
        "{}",
        connect(shut)
    );
    assert_eq!(connect(all), "ECONNREFUSED");
}

#[test]
fn an_endpoint_ejected_in_userspace_leaves_the_kernels_table() {
    let vip: SocketAddr = "127.77.6.30:8080".parse().unwrap();
    let good = [Backend::start("g1"), Backend::start("g2")];
    let refusing: SocketAddr = format!("127.0.0.1:{}", free_port().unwrap())
        .parse()
        .unwrap();
    let addrs = [good[0].addr, refusing, good[1].addr];
    let service = service("ledger", &vip.to_string(), &addrs)
        .mode(Mode::Kernel)
        .outlier_detection(OutlierDetection {
            consecutive_failures: Some(2),
            base_ejection_time: Some(Duration::from_secs(60)),
            max_ejection_percent: Some(50),
            ..OutlierDetection::default()
        });
    let config = AgentConfig::new(&[service]);
    let agent = Agent::start(&config);

    // Round robin over three: the refusing endpoint gets every third
    // connect until its failures, reported by sock_ops, eject it.
    let first = agent.calls(vip, 12);
    assert!(first.iter().any(|r| r == "FAILED"), "{first:?}");
    assert!(
        wait_until(Duration::from_secs(5), || {
            agent.endpoint(refusing)["breaker"] == "open"
        }),
        "never ejected: {}",
        agent.endpoint(refusing)
    );
    assert!(agent.stat(Stat::KernelConnectFailed) >= 2);

    // The next table no longer holds it: no failure at all.
    let before = agent.stat(Stat::KernelBalanced);
    std::thread::sleep(Duration::from_millis(300));
    let after = agent.calls(vip, 200);
    let by = counts(answered_by(&after));
    assert_eq!(by.get("FAILED"), None, "{by:?}");
    // Each CPU keeps its own place in the table, so a client moving
    // between CPUs may see a slot twice: about half each, not exactly.
    for name in ["g1", "g2"] {
        assert!(
            by.get(name).is_some_and(|&n| (90..=110).contains(&n)),
            "{by:?}"
        );
    }
    assert_eq!(agent.stat(Stat::KernelBalanced) - before, 200);

    // Outcomes reach the metrics, labelled as kernel mode (successes are
    // read at the agent's next periodic look, within 100 ms).
    let kernel_opened = || {
        agent.metrics().sum(
            "sluice_tcp_connections_opened_total",
            &[("mode", "kernel"), ("source_workload", "client")],
        )
    };
    assert!(
        wait_until(Duration::from_secs(3), || kernel_opened() >= 200.0),
        "{} kernel-mode connections counted",
        kernel_opened()
    );
}

#[test]
fn killed_agent_fail_open_goes_around_it_fail_closed_refuses_both_recover() {
    let open_vip: SocketAddr = "127.77.6.40:8080".parse().unwrap();
    let closed_vip: SocketAddr = "127.77.6.41:8080".parse().unwrap();
    let kernel_vip: SocketAddr = "127.77.6.42:8080".parse().unwrap();
    let open_backend = Backend::start("open");
    let closed_backend = Backend::start("closed");
    let kernel_backend = Backend::start("kernel");
    let services = [
        service("catalog", &open_vip.to_string(), &[open_backend.addr])
            .mode(Mode::Plaintext)
            .on_agent_down(OnAgentDown::FailOpen),
        // mtls: fails closed by default.
        service("payments", &closed_vip.to_string(), &[closed_backend.addr]),
        service("ledger", &kernel_vip.to_string(), &[kernel_backend.addr]).mode(Mode::Kernel),
    ];
    let config = AgentConfig::new(&services);
    let mut agent = Agent::start(&config);

    // A steady stream to the kernel-mode service across the crash and the
    // restart: not one call may fail.
    let stream = agent
        .client(
            "client",
            Calls::new(kernel_vip, 3000).pause(Duration::from_millis(1)),
        )
        .stdout(std::process::Stdio::piped())
        .spawn_guarded()
        .expect("start the stream");
    assert!(wait_until(Duration::from_secs(10), || kernel_backend
        .accepted()
        >= 100));
    agent.kill();

    let open = agent.calls(open_vip, 20);
    assert!(open.iter().all(|r| r.starts_with("open ")), "{open:?}");
    let closed = agent.calls(closed_vip, 5);
    assert!(closed.iter().all(|r| r == "FAILED"), "{closed:?}");
    assert_eq!(closed_backend.accepted(), 0);
    assert!(agent.stat(Stat::FailOpen) >= 20);

    let agent = Agent::start(&config);
    let open = agent.calls(open_vip, 5);
    assert!(open.iter().all(|r| r.starts_with("open ")), "{open:?}");
    let closed = agent.calls(closed_vip, 5);
    assert!(
        closed.iter().all(|r| r.starts_with("closed ")),
        "{closed:?}"
    );

    let out = stream.wait_with_output().expect("stream ends");
    let replies = lines(&out);
    assert_eq!(replies.len(), 3000);
    let by = counts(answered_by(&replies));
    assert_eq!(by.get("kernel"), Some(&3000), "{by:?}");
    agent.sigterm();
}

#[test]
fn pins_of_an_incompatible_layout_are_replaced_cleanly() {
    let vip: SocketAddr = "127.77.6.50:8080".parse().unwrap();
    let backend = Backend::start("l1");
    let config = AgentConfig::new(&[service("ledger", &vip.to_string(), &[backend.addr])]);
    let mut old = Agent::start(&config);
    old.kill();
    // Make the pins look like an older agent's.
    let layout = aya::maps::MapData::from_pin(config.pin_dir.join(sluice_maps::LAYOUT)).unwrap();
    let mut layout: aya::maps::Array<_, u32> =
        aya::maps::Array::try_from(aya::maps::Map::Array(layout)).unwrap();
    layout.set(0, sluice_maps::LAYOUT_VERSION - 1, 0).unwrap();
    drop(layout);

    let mut agent = Agent::start(&config);
    let log = agent.log();
    assert_eq!(
        log.matches("from an incompatible agent version").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains(&format!("layout {}", sluice_maps::LAYOUT_VERSION - 1)),
        "{log}"
    );
    let replies = agent.calls(vip, 3);
    assert!(replies.iter().all(|r| r.starts_with("l1 ")), "{replies:?}");
    // Only the new agent's programs are attached: each call was redirected
    // once, by the new connect4.
    assert_eq!(agent.stat(Stat::Redirected), 3);

    agent.sigterm();
    agent.wait(Duration::from_secs(15));
    let parent = config.pin_dir.parent().unwrap();
    let name = config
        .pin_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let left: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&name))
        .collect();
    assert!(left.is_empty(), "pins left behind: {left:?}");
}

#[test]
fn an_upgrade_under_load_refuses_nothing_and_the_old_agent_drains_and_exits() {
    let vip: SocketAddr = "127.77.6.60:8080".parse().unwrap();
    let backends = [Backend::start("u1"), Backend::start("u2")];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = AgentConfig::new(&[service("payments", &vip.to_string(), &addrs)]);
    // As the DaemonSet runs it: after the handover the old agent waits for
    // the SIGTERM that deletes its pod, rather than exit and be restarted.
    let mut old = Agent::start_with_args(&config, &["--stay-after-handover"]);

    // One connection opened through the old agent that is still talking
    // when the new one takes over.
    let mut held = old.hold("client", vip);
    let one = held.ask("one");
    // New connections all through the handover.
    let stream = old
        .client(
            "client",
            Calls::new(vip, 1500).pause(Duration::from_millis(2)),
        )
        .stdout(std::process::Stdio::piped())
        .spawn_guarded()
        .expect("start the stream");
    let accepted = || backends.iter().map(Backend::accepted).sum::<usize>();
    assert!(wait_until(Duration::from_secs(10), || accepted() >= 100));

    let new = Agent::start(&config);
    assert!(new.log().contains("took over"), "{}", new.log());
    // The held connection talks on through the old agent, then ends.
    let two = held.ask("two");
    held.close();
    assert!(
        one.starts_with('u')
            && one.ends_with(" one")
            && two.starts_with('u')
            && two.ends_with(" two"),
        "{one}|{two}"
    );
    assert!(
        old.wait_for_log("staying, holding nothing, until SIGTERM"),
        "{}",
        old.log()
    );
    assert!(old.is_running());
    assert!(old.log().contains("drained; the new agent has taken over"));
    old.sigterm();
    let status = old.wait(Duration::from_secs(5));
    assert!(status.success(), "old agent: {status}\n{}", old.log());

    let replies = lines(&stream.wait_with_output().expect("stream ends"));
    assert_eq!(replies.len(), 1500);
    let by = counts(answered_by(&replies));
    assert_eq!(by.get("FAILED"), None, "{by:?}");

    // The new agent serves on its own, and cleans up when it stops.
    let after = new.calls(vip, 4);
    assert!(after.iter().all(|r| r.starts_with('u')), "{after:?}");
    // A second upgrade: the path leads to the new agent's socket now.
    let mut new = new;
    let mut newest = Agent::start(&config);
    assert!(newest.log().contains("took over"), "{}", newest.log());
    assert!(new.wait(Duration::from_secs(20)).success());
    let after = newest.calls(vip, 2);
    assert!(after.iter().all(|r| r.starts_with('u')), "{after:?}");
    newest.sigterm();
    assert!(newest.wait(Duration::from_secs(15)).success());
    assert!(
        !config.pin_dir.exists(),
        "pins left after the last agent stopped"
    );

    // `--upgrade` with nothing to upgrade is an error, not a cold start.
    let out = config.run(&["agent", "--upgrade"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no running agent answers"), "{stderr}");
}

/// The handover socket of `config`'s agent.
fn handover_socket(config: &AgentConfig) -> std::path::PathBuf {
    let pins = config.pin_dir.file_name().unwrap().to_str().unwrap();
    config.dir.join(format!("state/run/handover-{pins}.sock"))
}

/// `sluice_handover_refusals_total` for `reason`, as the agent's admin API
/// shows it.
fn handover_refusals(config: &AgentConfig, reason: &str) -> f64 {
    let metrics = scrape(config.admin());
    metrics
        .get("sluice_handover_refusals_total", &[("reason", reason)])
        .unwrap_or_else(|| panic!("no refusals for {reason} in {metrics:?}"))
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A root process that is not the agent asks for the listening sockets as
/// a successor would, and prints how many bytes and descriptors it got.
const ASK_FOR_SOCKETS: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(b"sluice-handover/1 HELLO\n")
    msg, fds, _, _ = socket.recv_fds(s, 64, 16)
except (BrokenPipeError, ConnectionResetError):
    msg, fds = b"", []
print(len(msg), len(fds))
"#;

#[test]
fn a_process_that_is_not_the_agent_gets_no_socket_and_a_real_upgrade_still_works() {
    let vip: SocketAddr = "127.77.6.61:8080".parse().unwrap();
    let backends = [Backend::start("r1")];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = AgentConfig::new(&[service("payments", &vip.to_string(), &addrs)]);
    let mut old = Agent::start(&config);
    let path = handover_socket(&config);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(handover_refusals(&config, "other_program"), 0.0);

    let out = std::process::Command::new("python3")
        .args(["-c", ASK_FOR_SOCKETS])
        .arg(&path)
        .output()
        .expect("run python3");
    assert_eq!(lines(&out), ["0 0"], "the impostor got an answer");
    assert!(
        wait_until(Duration::from_secs(5), || handover_refusals(
            &config,
            "other_program"
        ) == 1.0),
        "the refusal was not counted"
    );
    // The agent neither handed over nor began to drain: it serves on.
    let replies = old.calls(vip, 3);
    assert!(replies.iter().all(|r| r.starts_with("r1 ")), "{replies:?}");
    assert!(old.is_running());

    // A real successor still takes over; the old agent drains and exits.
    let mut new = Agent::start(&config);
    assert!(old.wait(Duration::from_secs(20)).success(), "{}", old.log());
    let replies = new.calls(vip, 3);
    assert!(replies.iter().all(|r| r.starts_with("r1 ")), "{replies:?}");
    // The admin port answers from the new process: its count starts at 0.
    assert_eq!(handover_refusals(&config, "other_program"), 0.0);
    new.sigterm();
    assert!(new.wait(Duration::from_secs(15)).success());
    assert!(!path.exists(), "the last agent left its handover socket");
}

#[test]
fn a_stale_or_squatted_handover_socket_never_blocks_a_start() {
    use std::os::unix::{fs::PermissionsExt, net::UnixListener};
    let vip: SocketAddr = "127.77.6.62:8080".parse().unwrap();
    let backends = [Backend::start("q1")];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = AgentConfig::new(&[service("payments", &vip.to_string(), &addrs)]);
    let path = handover_socket(&config);
    let run = path.parent().unwrap();
    // A directory others may enter, with a killed agent's socket file in
    // it: bound, and nothing listening any more.
    std::fs::create_dir_all(run).unwrap();
    std::fs::set_permissions(run, std::fs::Permissions::from_mode(0o755)).unwrap();
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());

    let mut agent = Agent::start(&config);
    assert_eq!(mode(run), 0o700, "the run directory was not tightened");
    let replies = agent.calls(vip, 3);
    assert!(replies.iter().all(|r| r.starts_with("q1 ")), "{replies:?}");
    agent.sigterm();
    assert!(agent.wait(Duration::from_secs(15)).success());
    assert!(!path.exists(), "a stopped agent left its handover socket");

    // A live listener that is not an agent. `--upgrade`, which needs a
    // running agent, refuses to start and names the path.
    let squatter = UnixListener::bind(&path).unwrap();
    let out = config.run(&["agent", "--upgrade"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("not this node's agent"), "{stderr}");

    // Without it the agent starts and serves, and the path leads to it:
    // a successor takes over from it.
    let mut agent = Agent::start(&config);
    let replies = agent.calls(vip, 3);
    assert!(replies.iter().all(|r| r.starts_with("q1 ")), "{replies:?}");
    let mut successor = Agent::start(&config);
    assert!(
        agent.wait(Duration::from_secs(20)).success(),
        "{}",
        agent.log()
    );
    let replies = successor.calls(vip, 3);
    assert!(replies.iter().all(|r| r.starts_with("q1 ")), "{replies:?}");
    successor.sigterm();
    assert!(successor.wait(Duration::from_secs(15)).success());
    drop(squatter);
}

/// A workload that sends 4 MiB (after `delay`), half-closes, reads the
/// echo to EOF and says whether it came back intact.
fn send_and_compare(vip: SocketAddr, delay: Duration) -> Client {
    Client::Blob {
        to: vip,
        bytes: 4 << 20,
        delay,
    }
}

#[test]
fn sockmap_bypass_skips_loopback_and_keeps_bytes_intact_both_ways() {
    let pair = NodePair::new();
    let vip: SocketAddr = "127.77.6.70:8080".parse().unwrap();
    let echo: SocketAddr = SocketAddr::new(pair.b_addr, free_port().unwrap());
    // Node B holds the endpoint, so the agent-to-endpoint leg crosses the
    // veth and node A's loopback carries only the workload-to-agent leg.
    let server = eof_echo(&pair.b, echo, 3);
    let service = || service("blob", &vip.to_string(), &[echo]).mode(Mode::Plaintext);

    let bypassed = AgentConfig::with(|c| {
        let mut config = c.base(&[service()]);
        config.agent.sockmap = Some(true);
        config
    });
    let mut agent = Agent::start_in_netns(&bypassed, &pair.a);
    // The workload waits until the agent has its socket: both directions
    // skip the stack.
    let before = loopback_bytes(&pair.a);
    let out = agent.run_client("client", send_and_compare(vip, Duration::from_millis(300)));
    let bypass_lo = loopback_bytes(&pair.a) - before;
    assert_eq!(out, ["intact"]);
    assert!(agent.stat(Stat::BypassSocket) >= 1);
    assert!(agent.stat(Stat::BypassMessage) >= 2);
    assert!(
        bypass_lo < 1 << 20,
        "8 MiB crossed the agent leg, yet {bypass_lo} bytes went over loopback"
    );
    // A workload that sends at once may beat the agent's accept: its bytes
    // then keep TCP for that connection, and must still arrive in order.
    let out = agent.run_client("client", send_and_compare(vip, Duration::ZERO));
    assert_eq!(out, ["intact"]);
    agent.sigterm();
    agent.wait(Duration::from_secs(15));

    // The same exchange without the bypass: the loopback carries it all.
    let plain = AgentConfig::new(&[service()]);
    let agent = Agent::start_in_netns(&plain, &pair.a);
    let before = loopback_bytes(&pair.a);
    let out = agent.run_client("client", send_and_compare(vip, Duration::from_millis(300)));
    let plain_lo = loopback_bytes(&pair.a) - before;
    assert_eq!(out, ["intact"]);
    assert!(plain_lo > 8 << 20, "only {plain_lo} bytes over loopback");
    assert_eq!(agent.stat(Stat::BypassMessage), 0);
    agent.sigterm();
    server.join().unwrap();
}
