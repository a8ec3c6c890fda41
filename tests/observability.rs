//! Metrics, the admin API and the CLI against a running agent, as root.
//! A real Prometheus (Debian's package) scrapes it; promtool checks the
//! exposition; the Grafana dashboard only queries metrics that exist.

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::support::*;
use serde_json::Value;
use sluice::admin::client;

const VIP: &str = "127.77.4.10:8080";

fn vip() -> SocketAddr {
    VIP.parse().unwrap()
}

/// A config with a metrics listener (`agent.metrics`) on a port of its
/// own; returns its address too.
fn with_metrics(services: &[Service]) -> (AgentConfig, SocketAddr) {
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let config = AgentConfig::with(|c| {
        let mut config = c.base(services);
        config.agent.metrics = Some(metrics);
        config
    });
    (config, metrics)
}

/// A `/debug/trace` stream opened by hand: its status, and the rest of
/// the response to read events from.
fn open_trace(admin: SocketAddr, seconds: u64) -> (u16, BufReader<TcpStream>) {
    let mut stream = TcpStream::connect(admin).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    write!(
        stream,
        "GET /debug/trace?seconds={seconds} HTTP/1.1\r\nhost: sluice\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    let until = Instant::now() + Duration::from_secs(5);
    while !head.ends_with("\r\n\r\n") && Instant::now() < until {
        match reader.read_line(&mut head) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("trace stream: {e}"),
        }
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    (status, reader)
}

/// Reads a trace stream until a line contains `needle` (true) or the
/// stream ends or 10 s pass (false).
fn trace_shows(stream: &mut BufReader<TcpStream>, needle: &str) -> bool {
    let until = Instant::now() + Duration::from_secs(10);
    let mut line = String::new();
    while Instant::now() < until {
        match stream.read_line(&mut line) {
            Ok(0) => return false,
            Ok(_) if line.contains(needle) => return true,
            // A timed-out read may leave half a line behind: keep it.
            Ok(_) => line.clear(),
            Err(_) => {}
        }
    }
    false
}

/// The live trace streams the agent counts, from `/debug/status`.
fn open_traces(admin: SocketAddr) -> Option<u64> {
    let (_, body) = client::get(admin, "/debug/status").ok()?;
    let status: Value = serde_json::from_str(&body).ok()?;
    status["trace_streams"]["open"].as_u64()
}

/// `sluice ARGS --config CONFIG -o json`, parsed; with the exit code.
fn cli_json(agent: &Agent, args: &[&str]) -> (i32, Value) {
    let out = agent.sluice(&[args, &["-o", "json"]].concat());
    let code = out.status.code().unwrap_or(-1);
    let text = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "`sluice {args:?}` printed no JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, value)
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Prometheus {
    _child: ChildGuard,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(dir: &std::path::Path, target: SocketAddr) -> Prometheus {
        let port = free_port().unwrap();
        let config = dir.join("prometheus.yml");
        // JSON, which is YAML.
        let scrape = serde_json::json!({
            "global": { "scrape_interval": "1s" },
            "scrape_configs": [{
                "job_name": "sluice",
                "static_configs": [{ "targets": [target.to_string()] }]
            }]
        });
        std::fs::write(&config, scrape.to_string()).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn_guarded()
            .expect("prometheus is installed by `cargo xtask setup`");
        Prometheus {
            _child: child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// The single value of an instant query, once it has one.
    fn value(&self, query: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", percent_encode(query));
        let (status, body) = client::get(self.addr, &path).ok()?;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }
}

#[test]
fn prometheus_scrapes_the_calls_and_promtool_accepts_the_exposition() {
    let b1 = Backend::start("b1");
    let b2 = Backend::start("b2");
    let (config, metrics) = with_metrics(&[service("payments", VIP, &[b1.addr, b2.addr])]);
    let agent = Agent::start(&config);
    let replies = agent.calls(vip(), 7);
    assert_eq!(replies.len(), 7);

    // As shipped: Prometheus scrapes the metrics listener, not the admin API.
    let prometheus = Prometheus::start(&config.dir, metrics);
    let opened = r#"sum(sluice_tcp_connections_opened_total{source_workload="client",source_workload_namespace="payments",destination_service="payments",connection_security_policy="plaintext",mode="proxy"})"#;
    let closed = r#"sum(sluice_tcp_connections_closed_total{destination_service="payments",reason="closed"})"#;
    let redirected = r#"sluice_redirect_decisions_total{outcome="redirected"}"#;
    assert!(
        wait_until(Duration::from_secs(40), || prometheus.value(opened)
            == Some(7.0)),
        "Prometheus never saw 7 opened connections (last: {:?})",
        prometheus.value(opened)
    );
    assert_eq!(prometheus.value(closed), Some(7.0));
    assert_eq!(prometheus.value(redirected), Some(7.0));
    assert_eq!(
        prometheus.value(
            r#"sum(sluice_upstream_connect_duration_seconds_count{destination_service="payments"})"#
        ),
        Some(7.0)
    );
    assert_eq!(
        prometheus.value(r#"sluice_endpoints{destination_service="payments",state="healthy"}"#),
        Some(2.0)
    );

    let (status, exposition) = client::get(metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    let path = config.dir.join("metrics.txt");
    std::fs::write(&path, &exposition).unwrap();
    let check = Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", path.display()))
        .output()
        .unwrap();
    assert!(
        check.status.success() && check.stdout.is_empty() && check.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        !exposition.contains("127.0.0.1"),
        "no label carries an address"
    );
}

#[test]
fn cli_commands_report_live_connections_ejections_and_refusals() {
    let b1 = Backend::start("b1");
    let mut b2 = Some(Backend::start("b2"));
    let b2_addr = b2.as_ref().unwrap().addr;
    let config = AgentConfig::new(&[service("payments", VIP, &[b1.addr, b2_addr])
        .outlier_detection(OutlierDetection {
            consecutive_failures: Some(1),
            base_ejection_time: Some(Duration::from_secs(60)),
            ..OutlierDetection::default()
        })]);
    let mut agent = Agent::start(&config);

    // A live connection.
    let mut holder = agent.hold("client", vip());
    assert!(holder.ask("live").ends_with(" live"));
    assert_eq!(b1.accepted() + b2.as_ref().unwrap().accepted(), 1);
    assert!(wait_until(Duration::from_secs(5), || {
        let (_, conns) = cli_json(&agent, &["conns"]);
        conns
            .as_array()
            .is_some_and(|c| c.len() == 1 && c[0]["bytes_received"].as_u64() > Some(0))
    }));
    let (code, conns) = cli_json(&agent, &["conns"]);
    assert_eq!(code, 0);
    assert_eq!(conns[0]["source_workload"], "client");
    assert_eq!(conns[0]["destination_service"], "payments/payments");
    assert_eq!(conns[0]["security"], "plaintext");
    assert_eq!(conns[0]["bytes_sent"], 5);

    // An ejected endpoint.
    drop(b2.take());
    std::thread::sleep(Duration::from_millis(50));
    agent.calls(vip(), 4);
    let (_, endpoints) = cli_json(&agent, &["endpoints", "payments"]);
    let b2_row = endpoints
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == b2_addr.to_string())
        .expect("b2 listed");
    assert_eq!(b2_row["breaker"], "open", "{endpoints}");
    assert!(b2_row["ejected_for_seconds"].as_f64().unwrap() > 50.0);
    assert_eq!(b2_row["eligible"], false);
    let (_, breakers) = cli_json(&agent, &["breakers"]);
    assert_eq!(breakers[0]["ejected_endpoints"], 1);
    let (_, services) = cli_json(&agent, &["services"]);
    assert_eq!(services[0]["eligible"], 1);
    assert_eq!(services[0]["endpoints"], 2);

    // A refused peer on the inbound port.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", config.inbound_port)).unwrap();
    std::io::Write::write_all(&mut plain, b"hello\n").unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        agent.view("/debug/status")["inbound_refused"]["not_tls"] == 1
    }));
    let (code, status) = cli_json(&agent, &["status"]);
    assert_eq!(code, 0);
    assert_eq!(status["ready"], true);
    assert_eq!(status["inbound_refused"]["not_tls"], 1);
    assert_eq!(status["redirects"]["redirected"], 5);

    let (_, certs) = cli_json(&agent, &["certs"]);
    assert_eq!(
        certs[0]["identity"],
        "spiffe://cluster.local/ns/payments/sa/client"
    );
    assert!(certs[0]["expires_in_seconds"].as_u64().unwrap() > 3600);
    let (_, workloads) = cli_json(&agent, &["workloads"]);
    assert_eq!(workloads[0]["name"], "client");

    // A table for people.
    let table = agent.sluice(&["endpoints"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("SERVICE"), "{text}");
    assert!(text.contains("open"));

    // Stopping: not ready, honestly, while it drains.
    agent.sigterm();
    assert!(wait_until(Duration::from_secs(5), || agent.stopping()));
    let (code, body) = client::get(config.admin(), "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("stopping"));
    let out = agent.sluice(&["status"]);
    assert_eq!(out.status.code(), Some(4), "status exits 4 while not ready");
    holder.close();
    assert!(agent.wait(Duration::from_secs(10)).success());

    // Gone: the CLI says so, with exit code 3.
    let out = agent.sluice(&["conns"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the agent is not running"));
}

#[test]
fn maps_are_readable_with_the_agent_stopped() {
    let b1 = Backend::start("b1");
    let config = AgentConfig::new(&[service("payments", VIP, &[b1.addr])]);
    let mut agent = Agent::start(&config);
    agent.calls(vip(), 3);
    agent.kill();
    let (code, maps) = cli_json(&agent, &["maps"]);
    assert_eq!(code, 0);
    assert_eq!(maps["counters"]["redirected"], 3);
    assert_eq!(maps["records"]["orig_by_peer"], 0);
}

/// Every metric a dashboard query names must be one the agent exports.
#[test]
fn the_dashboard_only_queries_exported_metrics() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/grafana/sluice-dashboard.json"
    ))
    .unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is valid JSON");
    let mut queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if var["type"] == "query"
            && let Some(q) = var["query"].as_str()
        {
            queries.push(q.to_owned());
        }
    }
    assert!(queries.len() >= 8);

    // A TCP service and a gRPC one, each called once, so that every
    // family has a series.
    let b1 = Backend::start("b1");
    let grpc = crate::grpc::Servers::start(&["g1:ok"]);
    let grpc_vip: std::net::SocketAddr = "127.77.8.50:8080".parse().unwrap();
    let config = AgentConfig::new(&[
        service("payments", VIP, &[b1.addr]),
        service("pay-grpc", &grpc_vip.to_string(), &grpc.addrs).protocol("grpc"),
    ]);
    let agent = Agent::start(&config);
    agent.calls(vip(), 1);
    assert_eq!(crate::grpc::calls(&agent, grpc_vip, 1), "g1=1");
    let metrics = agent.metrics();
    let exported = metrics.names();
    for q in &queries {
        let names = q
            .match_indices("sluice_")
            .map(|(i, _)| {
                let rest = &q[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect::<Vec<_>>();
        assert!(!names.is_empty(), "query names no sluice metric: {q}");
        for name in names {
            assert!(exported.contains(name), "{name} (in `{q}`) is not exported");
        }
    }
}

/// `sluice trace` prints the programs' decisions live, and switches their
/// events off again when it ends.
#[test]
fn trace_follows_redirect_decisions_live() {
    let b1 = Backend::start("b1");
    let config = AgentConfig::new(&[service("payments", VIP, &[b1.addr])]);
    let agent = Agent::start(&config);
    let tracer = Command::new(sluice_bin())
        .args(["trace", "--seconds", "3", "--config"])
        .arg(&config.path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn_guarded()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    agent.calls(vip(), 2);
    let out = tracer.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("connect4: redirect").count(), 2, "{text}");
    assert_eq!(text.matches("sock_ops: established").count(), 2, "{text}");
    // Off again: a call now leaves no event in the agent's log.
    let before = agent.log().matches("connect4: redirect").count();
    agent.calls(vip(), 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(agent.log().matches("connect4: redirect").count(), before);
}

/// The metrics listener serves metrics and the probes, and none of the
/// views that name workloads, endpoints and connections; the admin API
/// still serves them all on loopback.
#[test]
fn the_metrics_listener_serves_metrics_and_probes_and_no_debug_view() {
    let b1 = Backend::start("b1");
    let (config, metrics) = with_metrics(&[service("payments", VIP, &[b1.addr])]);
    let mut agent = Agent::start(&config);
    agent.calls(vip(), 2);

    let (status, body) = client::get(metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("sluice_tcp_connections_opened_total"),
        "{body}"
    );
    for path in ["/healthz", "/readyz"] {
        assert_eq!(client::get(metrics, path).unwrap().0, 200, "{path}");
    }
    for path in [
        "/debug/conns",
        "/debug/workloads",
        "/debug/tunnels",
        "/debug/endpoints",
        "/debug/status",
        "/debug/trace?seconds=1",
        "/",
    ] {
        let (status, body) = client::get(metrics, path).unwrap();
        assert_eq!(status, 404, "{path}: {body}");
        assert!(!body.contains("payments"), "{path}: {body}");
    }

    for path in [
        "/debug/conns",
        "/debug/workloads",
        "/debug/endpoints",
        "/metrics",
    ] {
        assert_eq!(client::get(config.admin(), path).unwrap().0, 200, "{path}");
    }
    let (_, status) = client::get(config.admin(), "/debug/status").unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["listeners"]["metrics"], metrics.to_string());

    // It stops with the agent, like the admin API.
    agent.sigterm();
    assert!(agent.wait(Duration::from_secs(15)).success());
    assert!(client::get(metrics, "/healthz").is_err());
}

/// At most 4 traces stream at once; one more is refused with 429 while
/// the first ones go on streaming, and a slot is free again when a stream
/// ends, whether its client leaves or its time is up.
#[test]
fn trace_streams_are_bounded_and_freed_when_they_end() {
    let b1 = Backend::start("b1");
    let config = AgentConfig::new(&[service("payments", VIP, &[b1.addr])]);
    let agent = Agent::start(&config);
    let admin = config.admin();
    // As `sluice trace` does: the programs' events on.
    let on = agent.sluice(&["ebpf-log", "on"]);
    assert!(
        on.status.success(),
        "{}",
        String::from_utf8_lossy(&on.stderr)
    );

    let mut streams: Vec<BufReader<TcpStream>> = (0..4)
        .map(|i| {
            let (status, stream) = open_trace(admin, 60);
            assert_eq!(status, 200, "stream {i}");
            stream
        })
        .collect();
    assert_eq!(open_traces(admin), Some(4));
    let (status, body) = client::get(admin, "/debug/trace?seconds=60").unwrap();
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("4 trace streams are open already"), "{body}");
    assert_eq!(open_traces(admin), Some(4));

    // The first four still stream: a call's decision reaches every one.
    agent.calls(vip(), 1);
    for (i, stream) in streams.iter_mut().enumerate() {
        assert!(
            trace_shows(stream, "connect4: redirect"),
            "stream {i} saw no event"
        );
    }

    // A client that leaves frees its slot at once, events or not.
    drop(streams.pop());
    assert!(
        wait_until(Duration::from_secs(5), || open_traces(admin) == Some(3)),
        "open: {:?}",
        open_traces(admin)
    );
    // So does a stream whose time is up.
    let (status, mut short) = open_trace(admin, 1);
    assert_eq!(status, 200);
    assert_eq!(open_traces(admin), Some(4));
    assert_eq!(client::get(admin, "/debug/trace").unwrap().0, 429);
    short
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    short
        .read_to_end(&mut rest)
        .expect("the stream ends by itself");
    assert!(wait_until(Duration::from_secs(5), || open_traces(admin) == Some(3)));
    let (status, _again) = open_trace(admin, 60);
    assert_eq!(status, 200);
}

/// An upgrade hands the metrics listener over with the others: kubelet's
/// probe never finds the port closed while the versions change.
#[test]
fn the_metrics_listener_is_handed_over_in_an_upgrade() {
    let (config, metrics) = with_metrics(&[]);
    let mut old = Agent::start_with_args(&config, &["--stay-after-handover"]);

    let stop = Arc::new(AtomicBool::new(false));
    let probing = stop.clone();
    let prober = std::thread::spawn(move || {
        let (mut answered, mut failed) = (0, Vec::new());
        while !probing.load(Ordering::Relaxed) {
            match client::get(metrics, "/healthz") {
                Ok((200, _)) => answered += 1,
                other => failed.push(format!("{other:?}")),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (answered, failed)
    });
    assert!(wait_until(Duration::from_secs(5), || client::get(
        metrics, "/healthz"
    )
    .is_ok()));

    // The new agent binds nothing the old one holds: it starts only if it
    // inherited every listening socket, the metrics one included.
    let mut new = Agent::start(&config);
    // Whatever becomes of the old agent now, the socket is the new one's
    // too: with the old one gone, the new one answers on it.
    old.kill();
    let (status, body) = client::get(metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("sluice_build_info"), "{body}");

    stop.store(true, Ordering::Relaxed);
    let (answered, failed) = prober.join().unwrap();
    assert!(answered > 0);
    assert!(
        failed.is_empty(),
        "probes failed during the upgrade: {failed:?}"
    );
    new.sigterm();
    assert!(new.wait(Duration::from_secs(15)).success());
}
