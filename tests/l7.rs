//! Requests, not just connections (`protocol: http`), as root: a workload
//! on one keep-alive HTTP/1.1 connection (Python's `http.client`) to a
//! service of three real HTTP backends, through the agent's redirect.
//! Each request is balanced on its own, and a backend that answers 503 is
//! ejected by its consecutive failures.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::support::*;

/// An HTTP/1.1 server: every request answered `status` with its name as
/// the body, the connection kept open; counts the requests it got.
struct HttpBackend {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl HttpBackend {
    fn start(name: &'static str, status: u16) -> HttpBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let counted = counted.clone();
                std::thread::spawn(move || {
                    let mut writer = conn.try_clone().unwrap();
                    let mut reader = BufReader::new(conn);
                    loop {
                        // A request line, headers, an empty line (GETs: no body).
                        let mut head = String::new();
                        loop {
                            let mut line = String::new();
                            match reader.read_line(&mut line) {
                                Ok(0) | Err(_) => return,
                                Ok(_) if line == "\r\n" => break,
                                Ok(_) => head.push_str(&line),
                            }
                        }
                        counted.fetch_add(1, Ordering::SeqCst);
                        let body = format!("{name}\n");
                        let answer = format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if writer.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        HttpBackend { addr, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// `n` GETs on one keep-alive connection to `vip`, as the client workload;
/// prints how many answers came from each backend (or with each status).
fn gets(agent: &Agent, vip: SocketAddr, n: usize) -> String {
    let script = format!(
        "python3 - <<'PY'
import collections, http.client
c = http.client.HTTPConnection('{}', {}, timeout=10)
seen = collections.Counter()
for i in range({n}):
    c.request('GET', '/pay/%d' % i)
    r = c.getresponse()
    body = r.read().decode().strip()
    seen[body if r.status == 200 else str(r.status)] += 1
print(' '.join('%s=%d' % kv for kv in sorted(seen.items())))
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
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn one_keep_alive_connection_spreads_its_requests_over_three_backends() {
    let vip: SocketAddr = "127.77.8.10:8080".parse().unwrap();
    let backends = [
        HttpBackend::start("b1", 200),
        HttpBackend::start("b2", 200),
        HttpBackend::start("b3", 200),
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = AgentConfig::new(&[service("pay", &vip.to_string(), &addrs)
        .protocol("http")
        .load_balancer(LbPolicy::RoundRobin)]);
    let agent = Agent::start(&config);
    assert_eq!(gets(&agent, vip, 300), "b1=100 b2=100 b3=100");
    assert_eq!(requests(&agent, "2xx"), 300.0);
    for backend in &backends {
        let share = backend.requests() as f64 / 300.0;
        assert!((0.30..=0.37).contains(&share), "{share}");
    }
}

#[test]
fn a_backend_answering_503_is_ejected_and_the_rest_see_none() {
    let vip: SocketAddr = "127.77.8.11:8080".parse().unwrap();
    let backends = [
        HttpBackend::start("b1", 200),
        HttpBackend::start("b2", 200),
        HttpBackend::start("bad", 503),
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = AgentConfig::new(&[service("pay", &vip.to_string(), &addrs)
        .protocol("http")
        .load_balancer(LbPolicy::RoundRobin)
        .outlier_detection(OutlierDetection {
            consecutive_failures: Some(3),
            base_ejection_time: Some(Duration::from_secs(60)),
            ..Default::default()
        })]);
    let agent = Agent::start(&config);
    let said = gets(&agent, vip, 300);
    // Its first three answers pass through (GETs are not retried yet);
    // then it is ejected and gets nothing more.
    assert_eq!(backends[2].requests(), 3, "{said}");
    assert!(said.starts_with("503=3 "), "{said}");
    assert_eq!(backends[0].requests() + backends[1].requests(), 297);
    assert_eq!(requests(&agent, "5xx"), 3.0);
    assert_eq!(requests(&agent, "2xx"), 297.0);
}

/// Requests the agent counted for service `pay`, by response code class.
fn requests(agent: &Agent, class: &str) -> f64 {
    agent.metrics().sum(
        "sluice_requests_total",
        &[
            ("destination_service", "pay"),
            ("response_code_class", class),
        ],
    )
}

/// Bytes that are no HTTP, sent to an HTTP service, get a 400 at once and
/// the connection closes; nothing reaches a backend.
#[test]
fn bytes_that_are_no_http_get_a_400() {
    let vip: SocketAddr = "127.77.8.12:8080".parse().unwrap();
    let backend = HttpBackend::start("b1", 200);
    let config =
        AgentConfig::new(&[service("pay", &vip.to_string(), &[backend.addr]).protocol("http")]);
    let agent = Agent::start(&config);
    let script = format!(
        "python3 - <<'PY'
import socket
s = socket.create_connection(('{}', {}), timeout=5)
s.sendall(b'\\x16\\x03\\x01 not a request\\r\\n\\r\\n')
print(s.recv(200).split(b'\\r\\n')[0].decode())
print('closed' if s.recv(200) == b'' else 'open')
PY",
        vip.ip(),
        vip.port()
    );
    let out = agent.client_command(&script).output().expect("run python3");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        lines(&out),
        ["HTTP/1.1 400 Bad Request", "closed"],
        "{said}"
    );
    assert_eq!(backend.requests(), 0);
}
