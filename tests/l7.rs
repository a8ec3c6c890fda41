//! Requests, not just connections (`protocol: http`), as root: a workload
//! on one keep-alive HTTP/1.1 connection (Python's `http.client`) to a
//! service of three real HTTP backends, through the agent's redirect.
//! Each request is balanced on its own; a backend that answers 503 is
//! ejected by its consecutive failures, and only requests that cannot
//! double a payment are sent again; a backend that never answers meets the
//! route's timeout.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::support::*;

/// What a test backend does with each request.
#[derive(Clone, Copy)]
pub(crate) enum Answer {
    /// Answers this status, its name as the body, and keeps the
    /// connection open.
    Status(u16),
    /// Answers the status this holds now.
    Switch(&'static AtomicU16),
    /// Reads the request and never answers.
    Never,
    /// Answers 200 with a head promising 100 bytes, sends 10, then resets
    /// the connection.
    ResetMidBody,
    /// Answers 200 this many milliseconds after the request arrived.
    Slow(u64),
    /// Answers 200 saying `Keep-Alive: timeout=1`, and closes a
    /// connection that has no next request within this many milliseconds
    /// (as Node.js servers do, after 5 s).
    IdleClose(u64),
    /// Answers this status with `Retry-After:` this value.
    RetryAfter(u16, &'static str),
    /// Says `Keep-Alive: timeout=1` too, but drops a request that comes
    /// on a connection quiet for longer than this many milliseconds
    /// without a word: what a client sees when its request crosses the
    /// server's close.
    CrossedClose(u64),
}

/// An HTTP/1.1 server that logs every request it gets (`METHOD path`, the
/// idempotency key and the `traceparent`, if any) before it answers.
pub(crate) struct HttpBackend {
    pub(crate) addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

impl HttpBackend {
    pub(crate) fn start(name: &'static str, answer: Answer) -> HttpBackend {
        Self::start_on(name, answer, "127.0.0.1:0".parse().unwrap())
    }

    /// On `addr` (in the calling thread's network namespace). A backend
    /// stopped there a moment ago may still hold it: waits up to 1 s.
    pub(crate) fn start_on(name: &'static str, answer: Answer, addr: SocketAddr) -> HttpBackend {
        let mut bound = TcpListener::bind(addr);
        for _ in 0..100 {
            match &bound {
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    bound = TcpListener::bind(addr);
                }
                _ => break,
            }
        }
        let listener = bound.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (log, accepted) = (arrivals.clone(), connections.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                accepted.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                std::thread::spawn(move || serve(conn, name, answer, &log));
            }
        });
        HttpBackend {
            addr,
            arrivals,
            connections,
        }
    }

    /// Connections it accepted.
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub(crate) fn requests(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    pub(crate) fn arrivals(&self) -> Vec<String> {
        self.arrivals.lock().unwrap().clone()
    }
}

/// One backend connection: requests (a head and a Content-Length body),
/// each logged, then answered.
fn serve(conn: std::net::TcpStream, name: &str, answer: Answer, log: &Mutex<Vec<String>>) {
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    let mut answered = std::time::Instant::now();
    loop {
        if let Answer::IdleClose(ms) = answer {
            let idle = Some(Duration::from_millis(ms));
            reader.get_ref().set_read_timeout(idle).unwrap();
        }
        let mut first = String::new();
        let (mut length, mut key, mut chunked) = (0, String::new(), false);
        let mut traceparent = String::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) if first.is_empty() => {
                    if let Answer::CrossedClose(ms) = answer
                        && answered.elapsed() > Duration::from_millis(ms)
                    {
                        return;
                    }
                    first = line
                }
                Ok(_) => {
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if let Some(v) = lower.strip_prefix("idempotency-key:") {
                        key = format!(" key={}", v.trim());
                    }
                    if let Some(v) = lower.strip_prefix("traceparent:") {
                        traceparent = format!(" tp={}", v.trim());
                    }
                    chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() || (chunked && !skip_chunks(&mut reader)) {
            return;
        }
        let mut words = first.split_whitespace();
        let (method, path) = (words.next().unwrap(), words.next().unwrap());
        log.lock()
            .unwrap()
            .push(format!("{method} {path}{key}{traceparent}"));
        let status = match answer {
            Answer::Status(status) | Answer::RetryAfter(status, _) => status,
            Answer::Switch(now) => now.load(Ordering::SeqCst),
            Answer::Slow(ms) => {
                std::thread::sleep(Duration::from_millis(ms));
                200
            }
            Answer::IdleClose(_) | Answer::CrossedClose(_) => 200,
            Answer::Never => {
                // Holds the connection without a word until the client goes.
                let _ = reader.read(&mut [0; 1]);
                return;
            }
            Answer::ResetMidBody => {
                let head = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789";
                let _ = writer.write_all(head.as_bytes());
                std::thread::sleep(Duration::from_millis(50));
                let _ = sluice_testkit::client::zero_linger(&writer);
                return;
            }
        };
        let keep_alive = match answer {
            Answer::IdleClose(_) | Answer::CrossedClose(_) => "Keep-Alive: timeout=1\r\n".into(),
            Answer::RetryAfter(_, after) => format!("Retry-After: {after}\r\n"),
            _ => String::new(),
        };
        let body = format!("{name}\n");
        let answer = format!(
            "HTTP/1.1 {status} X\r\n{keep_alive}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
        answered = std::time::Instant::now();
    }
}

/// Reads a chunked body to its end (trailers included); false if the
/// connection broke or the chunking was bad.
fn skip_chunks(reader: &mut impl BufRead) -> bool {
    loop {
        let mut size = String::new();
        if reader.read_line(&mut size).is_err() {
            return false;
        }
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return false;
        };
        if n == 0 {
            // Trailers, then an empty line.
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return false,
                    Ok(_) if line == "\r\n" => return true,
                    Ok(_) => {}
                }
            }
        }
        let mut chunk = vec![0; n + 2];
        if reader.read_exact(&mut chunk).is_err() {
            return false;
        }
    }
}

/// `n` requests `METHOD /pay/<i>` on one keep-alive connection to `vip`,
/// as the client workload, with an `Idempotency-Key: k<i>` header when
/// `keyed`; prints how many answers came from each backend (or with each
/// status).
pub(crate) fn send(agent: &Agent, vip: SocketAddr, method: &str, n: usize, keyed: bool) -> String {
    let script = format!(
        "python3 - <<'PY'
import collections, http.client
c = http.client.HTTPConnection('{}', {}, timeout=10)
seen = collections.Counter()
for i in range({n}):
    headers = {{'Idempotency-Key': 'k%d' % i}} if {keyed} else {{}}
    body = b'amount=100' if '{method}' == 'POST' else None
    c.request('{method}', '/pay/%d' % i, body=body, headers=headers)
    r = c.getresponse()
    body = r.read().decode().strip()
    seen[body if r.status == 200 else str(r.status)] += 1
print(' '.join('%s=%d' % kv for kv in sorted(seen.items())))
PY",
        vip.ip(),
        vip.port(),
        keyed = if keyed { "True" } else { "False" },
    );
    let out = agent.client_command(&script).output().expect("run python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `n` POSTs without an idempotency key, `apart` seconds apart, on one
/// keep-alive connection to `vip` from the client workload: each answer's
/// status.
pub(crate) fn posts_apart(agent: &Agent, vip: SocketAddr, n: usize, apart: f64) -> Vec<String> {
    let script = format!(
        "python3 - <<'PY'
import http.client, time
c = http.client.HTTPConnection('{}', {}, timeout=30)
for i in range({n}):
    if i:
        time.sleep({apart})
    c.request('POST', '/pay', body=b'x' * 64)
    r = c.getresponse()
    r.read()
    print(r.status)
PY",
        vip.ip(),
        vip.port()
    );
    // `lines` fails the test with python's stderr when it failed.
    lines(&agent.client_command(&script).output().expect("run python3"))
}

fn gets(agent: &Agent, vip: SocketAddr, n: usize) -> String {
    send(agent, vip, "GET", n, false)
}

#[test]
fn one_keep_alive_connection_spreads_its_requests_over_three_backends() {
    let vip: SocketAddr = "127.77.8.10:8080".parse().unwrap();
    let backends = ["b1", "b2", "b3"].map(|name| HttpBackend::start(name, Answer::Status(200)));
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

/// Three backends, the third answering 503 to everything; ejected after
/// `consecutive_failures`.
fn with_a_failing_backend(
    vip: SocketAddr,
    consecutive_failures: u32,
) -> (AgentConfig, Agent, [HttpBackend; 3]) {
    let backends = [
        HttpBackend::start("b1", Answer::Status(200)),
        HttpBackend::start("b2", Answer::Status(200)),
        HttpBackend::start("bad", Answer::Status(503)),
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = AgentConfig::new(&[service("pay", &vip.to_string(), &addrs)
        .protocol("http")
        .load_balancer(LbPolicy::RoundRobin)
        .outlier_detection(OutlierDetection {
            consecutive_failures: Some(consecutive_failures),
            base_ejection_time: Some(Duration::from_secs(60)),
            ..Default::default()
        })]);
    let agent = Agent::start(&config);
    (config, agent, backends)
}

#[test]
fn a_backend_answering_503_is_ejected_and_gets_see_none() {
    let vip: SocketAddr = "127.77.8.11:8080".parse().unwrap();
    let (_config, agent, backends) = with_a_failing_backend(vip, 3);
    let said = gets(&agent, vip, 300);
    // Its first three answers are retried elsewhere (GET is idempotent);
    // then it is ejected and gets nothing more.
    assert!(!said.contains("503"), "{said}");
    assert_eq!(backends[2].requests(), 3, "{said}");
    assert_eq!(backends[0].requests() + backends[1].requests(), 300);
    assert_eq!(requests(&agent, "2xx"), 300.0);
    assert_eq!(requests(&agent, "5xx"), 0.0);
    assert_eq!(retries(&agent), 3.0);
}

/// A POST without an idempotency key may charge twice if sent twice: its
/// 503 goes back to the caller. With a key it is retried elsewhere. No
/// POST arrives twice but a keyed one, once at the failing backend.
#[test]
fn posts_are_retried_only_with_an_idempotency_key() {
    let vip: SocketAddr = "127.77.8.13:8080".parse().unwrap();
    // Never ejected here: every third POST meets the failing backend.
    let (_config, agent, backends) = with_a_failing_backend(vip, 1000);
    let said = send(&agent, vip, "POST", 30, false);
    assert_eq!(said, "503=10 b1=10 b2=10");
    let said = send(&agent, vip, "POST", 30, true);
    assert!(!said.contains("503"), "{said}");
    let mut all: Vec<String> = backends.iter().flat_map(HttpBackend::arrivals).collect();
    let failed = backends[2].arrivals();
    let keyed_failed = failed.iter().filter(|a| a.contains("key=")).count();
    assert_eq!(failed.len() - keyed_failed, 10, "{failed:?}");
    // Round robin moves on with each retry too, so more than a third of
    // the keyed POSTs meet the failing backend first; each was retried.
    assert!(keyed_failed >= 10, "{failed:?}");
    all.sort();
    for pair in all.windows(2) {
        if pair[0] == pair[1] {
            assert!(
                pair[0].contains("key="),
                "an unkeyed POST arrived twice: {}",
                pair[0]
            );
            assert!(failed.contains(&pair[0]), "{} arrived twice", pair[0]);
        }
    }
    assert_eq!(requests(&agent, "5xx"), 10.0);
    assert_eq!(retries(&agent), keyed_failed as f64);
}

/// What a retry waits for: a 503 asking for a wait of at most 1 s is
/// retried after it, elsewhere; one asking for longer goes back to the
/// caller with its `Retry-After`, as does a 500 (an application's answer,
/// not a gateway's). Each service: the failing backend and a good one,
/// round robin, two GETs.
#[test]
fn retry_after_is_waited_for_up_to_a_second_and_a_500_goes_back() {
    let good = HttpBackend::start("b1", Answer::Status(200));
    let cases = [
        ("127.77.8.20:8080", "soon", Answer::RetryAfter(503, "1")),
        ("127.77.8.21:8080", "late", Answer::RetryAfter(503, "5")),
        ("127.77.8.22:8080", "app", Answer::Status(500)),
    ];
    let bad: Vec<HttpBackend> = cases
        .iter()
        .map(|(_, _, answer)| HttpBackend::start("bad", *answer))
        .collect();
    let services: Vec<Service> = cases
        .iter()
        .zip(&bad)
        .map(|((vip, name, _), bad)| {
            service(name, vip, &[bad.addr, good.addr])
                .protocol("http")
                .load_balancer(LbPolicy::RoundRobin)
                .outlier_detection(OutlierDetection {
                    consecutive_failures: Some(1000),
                    ..Default::default()
                })
        })
        .collect();
    let config = AgentConfig::new(&services);
    let agent = Agent::start(&config);
    // Two GETs on one connection: each status with its Retry-After, and
    // the seconds both took.
    let gets = |vip: &str| {
        let (host, port) = vip.split_once(':').unwrap();
        let script = format!(
            "python3 - <<'PY'
import http.client, time
c = http.client.HTTPConnection('{host}', {port}, timeout=10)
said, start = [], time.monotonic()
for i in range(2):
    c.request('GET', '/pay/%d' % i)
    r = c.getresponse()
    r.read()
    said.append('%d/%s' % (r.status, r.getheader('Retry-After')))
print(' '.join(said), '%.2f' % (time.monotonic() - start))
PY"
        );
        lines(&agent.client_command(&script).output().expect("run python3")).join(" ")
    };
    let retries = |name: &str| {
        agent.metrics().sum(
            "sluice_connect_retries_total",
            &[("destination_service", name)],
        )
    };
    // (the answers, sorted; the seconds taken)
    let answers = |said: &str| {
        let mut words: Vec<String> = said.split_whitespace().map(str::to_owned).collect();
        let took: f64 = words.pop().unwrap().parse().unwrap();
        words.sort();
        (words.join(" "), took)
    };
    let (said, took) = answers(&gets(cases[0].0));
    assert_eq!(said, "200/None 200/None");
    // Round robin moves on with each retry, so both GETs may meet the
    // failing backend first: a wait of 1 s for each that did.
    let waited = bad[0].requests();
    assert!(waited >= 1);
    assert_eq!(retries("soon"), waited as f64);
    assert!(took >= 0.95 * waited as f64, "{waited} waits in {took} s");

    assert_eq!(answers(&gets(cases[1].0)).0, "200/None 503/5");
    assert_eq!(retries("late"), 0.0);
    assert_eq!(answers(&gets(cases[2].0)).0, "200/None 500/None");
    assert_eq!(retries("app"), 0.0);
    for b in &bad[1..] {
        assert_eq!(b.requests(), 1, "not sent again");
    }
}

/// A body longer than `max_replay_bytes` is streamed through and the
/// request is never sent again, though it carries an idempotency key: the
/// agent kept no whole copy to send. One within the bound is retried.
#[test]
fn a_body_over_the_replay_bound_is_streamed_and_never_retried() {
    let vip: SocketAddr = "127.77.8.19:8080".parse().unwrap();
    let good = HttpBackend::start("b1", Answer::Status(200));
    let bad = HttpBackend::start("bad", Answer::Status(503));
    let config = AgentConfig::new(&[service("pay", &vip.to_string(), &[good.addr, bad.addr])
        .protocol("http")
        .load_balancer(LbPolicy::RoundRobin)
        .outlier_detection(OutlierDetection {
            consecutive_failures: Some(1000),
            ..Default::default()
        })
        .requests(Requests {
            max_replay_bytes: Some(1024),
            ..Default::default()
        })]);
    let agent = Agent::start(&config);
    // Keyed PUTs of `size` bytes: each answer's status, and the body
    // length the backend said it read.
    let puts = |size: usize, tag: &str| {
        let script = format!(
            "python3 - <<'PY'
import collections, http.client
c = http.client.HTTPConnection('{}', {}, timeout=10)
seen = collections.Counter()
for i in range(10):
    c.request('PUT', '/{tag}/%d' % i, body=b'x' * {size},
              headers={{'Idempotency-Key': '{tag}%d' % i}})
    r = c.getresponse()
    r.read()
    seen[r.status] += 1
print(' '.join('%s=%d' % kv for kv in sorted(seen.items())))
PY",
            vip.ip(),
            vip.port()
        );
        lines(&agent.client_command(&script).output().expect("run python3")).join(" ")
    };
    assert_eq!(puts(4096, "big"), "200=5 503=5");
    assert_eq!(retries(&agent), 0.0);
    assert_eq!(puts(512, "small"), "200=10");
    assert!(retries(&agent) >= 5.0, "{}", retries(&agent));
    let big_at_bad: Vec<String> = bad
        .arrivals()
        .into_iter()
        .filter(|a| a.contains("/big/"))
        .collect();
    assert_eq!(big_at_bad.len(), 5, "{big_at_bad:?}");
    let big_at_good = good
        .arrivals()
        .iter()
        .filter(|a| a.contains("/big/"))
        .count();
    assert_eq!(big_at_good, 5, "no big PUT arrived twice");
}

/// A backend that never answers: the request gets 504 at the route's
/// timeout, and the backend's silence counts against it.
#[test]
fn a_backend_that_never_answers_times_out_at_the_route_timeout() {
    let vip: SocketAddr = "127.77.8.14:8080".parse().unwrap();
    let backend = HttpBackend::start("mute", Answer::Never);
    let config = AgentConfig::new(&[service("pay", &vip.to_string(), &[backend.addr])
        .protocol("http")
        .requests(Requests {
            timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        })]);
    let agent = Agent::start(&config);
    let started = std::time::Instant::now();
    let said = send(&agent, vip, "POST", 1, false);
    let took = started.elapsed();
    assert_eq!(said, "504=1");
    assert_eq!(backend.requests(), 1);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert_eq!(requests(&agent, "error"), 1.0);
    assert_eq!(flagged(&agent, "UT"), 1.0);
    let codes = |code| {
        agent.metrics().sum(
            "sluice_requests_total",
            &[("destination_service", "pay"), ("response_code", code)],
        )
    };
    assert_eq!(codes("504"), 1.0, "the agent's answer, by its code");
}

/// A rate limit of 100 requests a second per caller identity, at the
/// workload the requests reach: a caller sending 300 a second gets about
/// 200 a second refused, each with a Retry-After; another caller, at the
/// same time, none.
#[test]
fn a_rate_limit_per_caller_refuses_the_excess_with_retry_after() {
    let vip: SocketAddr = "127.77.8.15:8080".parse().unwrap();
    let backend = HttpBackend::start("ledger", Answer::Status(200));
    let config = AgentConfig::with(|c| {
        to_ledger(
            c,
            vip,
            &backend,
            Workload::new("ledger", "payments", "ledger").rate_limit(RateLimit {
                requests_per_second: 100,
                burst: 10,
                per_source: true,
            }),
        )
    });
    let agent = Agent::start(&config);
    let (_, refused, _) = two_callers_against_a_limit(&agent, vip);
    let counted = agent.metrics().sum(
        "sluice_rate_limited_requests_total",
        &[("destination_workload", "ledger")],
    );
    assert_eq!(counted, refused);
    assert_eq!(flagged(&agent, "RL"), refused);
}

/// Against a rate limit of 100 requests a second per caller at `vip`'s
/// workload: `client` sends 300 a second and `batch` 30, for 3 s each, at
/// once, through `agent`. Asserts that about 200 a second of client's are
/// refused, each 429 with a Retry-After, and none of batch's. Returns
/// client's passed and refused requests, and batch's passed ones.
pub(crate) fn two_callers_against_a_limit(agent: &Agent, vip: SocketAddr) -> (f64, f64, f64) {
    two_callers_at_once(
        agent.client_command(&paced_gets(vip, 300)),
        agent.workload_command("batch", &paced_gets(vip, 30)),
    )
}

/// `checkout` (paced GETs at 300 a second) and `batch` (at 30), run at
/// once against a limit of 100 a second per caller: asserts and returns
/// as [`two_callers_against_a_limit`].
pub(crate) fn two_callers_at_once(
    mut checkout: std::process::Command,
    mut batch: std::process::Command,
) -> (f64, f64, f64) {
    let checkout = checkout
        .stdout(std::process::Stdio::piped())
        .spawn_guarded()
        .unwrap();
    let batch = batch.stdout(std::process::Stdio::piped()).output().unwrap();
    let checkout = checkout.wait_with_output().unwrap();
    let (passed, refused, told, seconds) = paced_result(&checkout);
    let per_second = refused / seconds;
    assert!(
        (150.0..=250.0).contains(&per_second),
        "{refused} in {seconds} s"
    );
    assert!(told, "a 429 without Retry-After");
    let (batch_passed, batch_refused, _, _) = paced_result(&batch);
    assert_eq!((batch_passed, batch_refused), (90.0, 0.0));
    (passed, refused, batch_passed)
}

/// [`paced_gets_python`] as a bash script.
fn paced_gets(vip: SocketAddr, rate: u32) -> String {
    format!("python3 - <<'PY'\n{}\nPY", paced_gets_python(vip, rate))
}

/// `GET /balance` at `rate` a second for 3 s on one connection to `vip`;
/// prints the answers by status (200, 429), whether every 429 said when to
/// come back, and the seconds it took.
pub(crate) fn paced_gets_python(vip: SocketAddr, rate: u32) -> String {
    format!(
        "import collections, http.client, time
c = http.client.HTTPConnection('{}', {}, timeout=10)
seen, told, start = collections.Counter(), True, time.monotonic()
for i in range({n}):
    time.sleep(max(0, start + i / {rate} - time.monotonic()))
    c.request('GET', '/balance')
    r = c.getresponse()
    r.read()
    seen[r.status] += 1
    told = told and (r.status != 429 or int(r.getheader('Retry-After', '0')) >= 1)
print(seen[200], seen[429], told, round(time.monotonic() - start, 2))",
        vip.ip(),
        vip.port(),
        n = rate * 3,
    )
}

/// What [`paced_gets`] printed: (200s, 429s, every 429 said when, seconds).
fn paced_result(out: &std::process::Output) -> (f64, f64, bool, f64) {
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let f: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(
        f.len(),
        4,
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n = |i: usize| f[i].parse::<f64>().unwrap();
    (n(0), n(1), f[2] == "True", n(3))
}

/// While every endpoint of a service is ejected its fallback answers:
/// another service (a secondary processor), or a fixed answer; once an
/// endpoint is back, it answers again.
#[test]
fn the_fallback_answers_while_every_endpoint_is_ejected() {
    let (vip, backup_vip, fixed_vip): (SocketAddr, SocketAddr, SocketAddr) = (
        "127.77.8.16:8080".parse().unwrap(),
        "127.77.8.17:8080".parse().unwrap(),
        "127.77.8.18:8080".parse().unwrap(),
    );
    let status: &'static AtomicU16 = Box::leak(Box::new(AtomicU16::new(503)));
    let main = HttpBackend::start("main", Answer::Switch(status));
    let backup = HttpBackend::start("backup", Answer::Status(200));
    let down = HttpBackend::start("down", Answer::Status(503));
    let ejecting = || OutlierDetection {
        consecutive_failures: Some(1),
        base_ejection_time: Some(Duration::from_millis(500)),
        max_ejection_percent: Some(100),
        ..Default::default()
    };
    let falling_back = |fallback| Requests {
        fallback: Some(fallback),
        ..Default::default()
    };
    let config = AgentConfig::new(&[
        service("pay", &vip.to_string(), &[main.addr])
            .protocol("http")
            .outlier_detection(ejecting())
            .requests(falling_back(Fallback {
                service: Some("pay-backup".into()),
                ..Default::default()
            })),
        service("pay-backup", &backup_vip.to_string(), &[backup.addr]).protocol("http"),
        service("pay-fixed", &fixed_vip.to_string(), &[down.addr])
            .protocol("http")
            .outlier_detection(ejecting())
            .requests(falling_back(Fallback {
                status: Some(202),
                body: Some("queued for the batch processor\n".into()),
                ..Default::default()
            })),
    ]);
    let agent = Agent::start(&config);
    // The first answer ejects the only endpoint (nothing else to retry
    // on: its 503 goes back); the backup answers the rest.
    assert_eq!(gets(&agent, vip, 10), "503=1 backup=9");
    assert_eq!(send(&agent, fixed_vip, "POST", 10, false), "202=9 503=1");
    status.store(200, Ordering::SeqCst);
    // Back once its ejection ends and a probe succeeds.
    let back = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        gets(&agent, vip, 1) == "main=1"
    });
    assert!(back, "the fallback kept answering");
    assert_eq!(gets(&agent, vip, 10), "main=10");
    let fallbacks = |name| {
        agent.metrics().sum(
            "sluice_fallback_requests_total",
            &[("destination_service", name)],
        )
    };
    assert!(fallbacks("pay") >= 9.0, "{}", fallbacks("pay"));
    assert_eq!(fallbacks("pay-fixed"), 9.0);
    assert_eq!(backup.requests() as f64, fallbacks("pay"));
}

/// A connection to an endpoint belongs to the caller it was made for:
/// requests of a caller the endpoint's workload refuses never ride a
/// connection another caller opened.
#[test]
fn pooled_connections_are_never_shared_across_caller_identities() {
    let vip: SocketAddr = "127.77.8.20:8080".parse().unwrap();
    let backend = HttpBackend::start("ledger", Answer::Status(200));
    let config = AgentConfig::with(|c| {
        to_ledger(
            c,
            vip,
            &backend,
            Workload::new("ledger", "payments", "ledger").authorization(Authorization {
                default: Decision::Deny,
                allow: vec!["spiffe://cluster.local/ns/payments/sa/client".into()],
                deny: vec![],
                requests: vec![],
            }),
        )
    });
    let agent = Agent::start(&config);
    assert_eq!(send(&agent, vip, "GET", 3, false), "ledger=3");
    // batch asks while client's connection to ledger sits idle in the pool.
    let script = format!(
        "python3 - <<'PY'
import http.client
c = http.client.HTTPConnection('{}', {}, timeout=10)
for i in range(3):
    c.request('GET', '/balance')
    r = c.getresponse()
    r.read()
    print(r.status)
PY",
        vip.ip(),
        vip.port()
    );
    let out = agent.workload_command("batch", &script).output().unwrap();
    assert_eq!(lines(&out), ["403", "403", "403"]);
    assert_eq!(backend.requests(), 3, "none of batch's requests arrived");
    assert_eq!(send(&agent, vip, "GET", 2, false), "ledger=2");
}

/// An authorization's `requests` rules decide single requests by caller,
/// method and path at the destination workload (here on this node): 403
/// with the rule, audited as a denial; the caller's other requests go on
/// on the same connection.
#[test]
fn request_rules_deny_by_method_and_path() {
    let vip: SocketAddr = "127.77.8.21:8080".parse().unwrap();
    let backend = HttpBackend::start("ledger", Answer::Status(200));
    let rule = |from: &[&str], methods: &[&str], paths: &[&str], decision| RequestRule {
        from: from.iter().map(|s| s.to_string()).collect(),
        methods: methods.iter().map(|s| s.to_string()).collect(),
        paths: paths.iter().map(|s| s.to_string()).collect(),
        decision,
    };
    let batch = "spiffe://cluster.local/ns/payments/sa/batch";
    let config = AgentConfig::with(|c| {
        let ledger = Workload::new("ledger", "payments", "ledger").authorization(Authorization {
            default: Decision::Allow,
            allow: vec![],
            deny: vec![],
            requests: vec![
                rule(&[batch], &["POST"], &[], Decision::Deny),
                rule(&[], &[], &["/admin/*"], Decision::Deny),
            ],
        });
        Config {
            audit: Some(Audit {
                output: c.audit_path(),
                requests: false,
            }),
            ..to_ledger(c, vip, &backend, ledger)
        }
    });
    let agent = Agent::start(&config);
    let asks = |workload: &str, asks: &[(&str, &str)]| {
        let asks: Vec<String> = asks
            .iter()
            .map(|(m, p)| format!("('{m}', '{p}')"))
            .collect();
        let script = format!(
            "python3 - <<'PY'
import http.client
c = http.client.HTTPConnection('{}', {}, timeout=10)
for method, path in [{}]:
    c.request(method, path, body=b'x' if method == 'POST' else None)
    r = c.getresponse()
    r.read()
    print(method, path, r.status)
PY",
            vip.ip(),
            vip.port(),
            asks.join(", ")
        );
        lines(&agent.workload_command(workload, &script).output().unwrap())
    };
    assert_eq!(
        asks(
            "client",
            &[
                ("POST", "/pay"),
                ("GET", "/admin/keys"),
                ("GET", "/balance")
            ]
        ),
        ["POST /pay 200", "GET /admin/keys 403", "GET /balance 200"]
    );
    assert_eq!(
        asks("batch", &[("POST", "/pay"), ("GET", "/balance")]),
        ["POST /pay 403", "GET /balance 200"]
    );
    assert_eq!(backend.requests(), 3);
    let denials = audit_lines(&config.audit_path(), "denied", 2);
    let said: Vec<(&str, &str)> = denials
        .iter()
        .map(|d| (d["rule"].as_str().unwrap(), d["detail"].as_str().unwrap()))
        .collect();
    assert_eq!(
        said,
        [
            (
                "workload payments/ledger requests[1]",
                "request GET /admin/keys"
            ),
            ("workload payments/ledger requests[0]", "request POST /pay"),
        ]
    );
    assert_eq!(flagged(&agent, "UAEX"), 2.0);
}

/// With `audit.requests`, each request is one JSON line of the audit
/// trail: who asked what, the answer, how long, how many retries, and
/// what the agent did about it.
#[test]
fn the_access_log_has_a_line_per_request() {
    let vip: SocketAddr = "127.77.8.19:8080".parse().unwrap();
    let backends = [
        HttpBackend::start("b1", Answer::Status(200)),
        HttpBackend::start("bad", Answer::Status(503)),
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let config = AgentConfig::with(|c| Config {
        audit: Some(Audit {
            output: c.audit_path(),
            requests: true,
        }),
        ..c.base(&[service("pay", &vip.to_string(), &addrs)
            .protocol("http")
            .load_balancer(LbPolicy::RoundRobin)
            .outlier_detection(OutlierDetection {
                consecutive_failures: Some(1000),
                ..Default::default()
            })])
    });
    let agent = Agent::start(&config);
    // Round robin: the first keyed POST meets b1, the second the failing
    // backend and is retried on b1; the unkeyed one meets the failing
    // backend and its 503 goes back.
    assert_eq!(send(&agent, vip, "POST", 2, true), "b1=2");
    assert_eq!(send(&agent, vip, "POST", 1, false), "503=1");
    let lines = access_log(&config, 3);
    let field = |i: usize, f: &str| lines[i][f].clone();
    for (i, (path, status, retries)) in [("/pay/0", 200, 0), ("/pay/1", 200, 1), ("/pay/0", 503, 0)]
        .into_iter()
        .enumerate()
    {
        assert_eq!(field(i, "method"), "POST", "{:?}", lines[i]);
        assert_eq!(field(i, "path"), path, "{:?}", lines[i]);
        assert_eq!(field(i, "status"), status, "{:?}", lines[i]);
        assert_eq!(field(i, "retries"), retries, "{:?}", lines[i]);
        assert_eq!(field(i, "response_flags"), "-", "{:?}", lines[i]);
        assert_eq!(field(i, "service"), "payments/pay", "{:?}", lines[i]);
        assert_eq!(
            lines[i]["source"]["identity"], "spiffe://cluster.local/ns/payments/sa/client",
            "{:?}",
            lines[i]
        );
    }
    assert_eq!(
        lines[1]["destination"]["address"],
        backends[0].addr.to_string()
    );
    assert_eq!(
        lines[2]["destination"]["address"],
        backends[1].addr.to_string()
    );
}

/// The first `n` lines of `config`'s access log, once there are `n`.
fn access_log(config: &AgentConfig, n: usize) -> Vec<serde_json::Value> {
    let read = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(config.audit_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v: &serde_json::Value| v["event"] == "request")
            .collect()
    };
    assert!(wait_until(Duration::from_secs(5), || read().len() >= n));
    read().into_iter().take(n).collect()
}

/// W3C Trace Context. With the access log off, a request's `traceparent`
/// reaches the endpoint untouched. With it on, the agent is a hop of the
/// trace: the endpoint gets the caller's trace with the agent's span as
/// its parent, the request's access-log line records the trace, the
/// agent's span and the caller's, and a request that came without a
/// `traceparent` starts a trace.
#[test]
fn traceparent_passes_through_and_with_the_access_log_the_agent_is_a_hop() {
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const CALLER_SPAN: &str = "00f067aa0ba902b7";
    let caller = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let two_gets = |vip: SocketAddr| {
        format!(
            "python3 - <<'PY'
import http.client
c = http.client.HTTPConnection('{}', {}, timeout=10)
for headers in [{{'traceparent': '{caller}'}}, {{}}]:
    c.request('GET', '/trace', headers=headers)
    r = c.getresponse()
    r.read()
    print(r.status)
PY",
            vip.ip(),
            vip.port()
        )
    };
    let pay = |vip: SocketAddr, backend: &HttpBackend| {
        service("pay", &vip.to_string(), &[backend.addr]).protocol("http")
    };

    let vip: SocketAddr = "127.77.8.25:8080".parse().unwrap();
    let backend = HttpBackend::start("b1", Answer::Status(200));
    let config = AgentConfig::new(&[pay(vip, &backend)]);
    let agent = Agent::start(&config);
    let out = agent.client_command(&two_gets(vip)).output().unwrap();
    assert_eq!(lines(&out), ["200", "200"]);
    assert_eq!(
        backend.arrivals(),
        [format!("GET /trace tp={caller}"), "GET /trace".to_owned()]
    );
    drop(agent);

    let vip: SocketAddr = "127.77.8.26:8080".parse().unwrap();
    let backend = HttpBackend::start("b1", Answer::Status(200));
    let config = AgentConfig::with(|c| Config {
        audit: Some(Audit {
            output: c.audit_path(),
            requests: true,
        }),
        ..c.base(&[pay(vip, &backend)])
    });
    let agent = Agent::start(&config);
    let out = agent.client_command(&two_gets(vip)).output().unwrap();
    assert_eq!(lines(&out), ["200", "200"]);
    let logged = access_log(&config, 2);
    let arrivals = backend.arrivals();
    // The caller's trace, continued under the agent's span.
    let (continued, started) = (&logged[0], &logged[1]);
    assert_eq!(continued["trace_id"], TRACE, "{continued}");
    assert_eq!(continued["parent_span_id"], CALLER_SPAN, "{continued}");
    let span = continued["span_id"].as_str().unwrap();
    assert_ne!(span, CALLER_SPAN);
    assert_eq!(arrivals[0], format!("GET /trace tp=00-{TRACE}-{span}-01"));
    // A trace the agent started: sampled, with no parent.
    let trace = started["trace_id"].as_str().unwrap();
    let span = started["span_id"].as_str().unwrap();
    assert_eq!((trace.len(), span.len()), (32, 16), "{started}");
    assert_ne!(trace, TRACE);
    assert_eq!(started["parent_span_id"], serde_json::Value::Null);
    assert_eq!(arrivals[1], format!("GET /trace tp=00-{trace}-{span}-01"));
}

/// The base config with HTTP service `pay` at `vip`, whose one endpoint
/// (`backend`) is workload `ledger` on this node, and a second caller
/// workload, `batch` (payments/batch), beside `client`.
fn to_ledger(c: &AgentConfig, vip: SocketAddr, backend: &HttpBackend, ledger: Workload) -> Config {
    let mut config = c.base(&[service("pay", &vip.to_string(), &[])
        .protocol("http")
        .endpoints(vec![Endpoint::new(backend.addr).workload("ledger")])]);
    config
        .workloads
        .extend([Workload::new("batch", "payments", "batch"), ledger]);
    config
}

/// Requests the agent flagged `flag` for service `pay`.
fn flagged(agent: &Agent, flag: &str) -> f64 {
    agent.metrics().sum(
        "sluice_request_flags_total",
        &[("destination_service", "pay"), ("response_flags", flag)],
    )
}

/// Retries the agent made for service `pay`.
pub(crate) fn retries(agent: &Agent) -> f64 {
    agent.metrics().sum(
        "sluice_connect_retries_total",
        &[("destination_service", "pay")],
    )
}

/// Requests the agent counted for service `pay`, by response code class.
pub(crate) fn requests(agent: &Agent, class: &str) -> f64 {
    agent.metrics().sum(
        "sluice_requests_total",
        &[
            ("destination_service", "pay"),
            ("response_code_class", class),
        ],
    )
}

/// A backend that resets mid-response, after its head and some of its
/// body went to the caller: the caller sees the body break off, and the
/// request (a GET, which could be retried) is not sent again, as bytes of
/// the answer are out; the endpoint counts a failure.
#[test]
fn a_backend_reset_mid_response_reaches_the_client_and_is_not_retried() {
    let vip: SocketAddr = "127.77.8.24:8080".parse().unwrap();
    let breaking = HttpBackend::start("breaking", Answer::ResetMidBody);
    let healthy = HttpBackend::start("healthy", Answer::Status(200));
    let config = AgentConfig::new(&[service("pay", &vip.to_string(), &[])
        .protocol("http")
        .load_balancer(LbPolicy::RoundRobin)
        .endpoints(vec![
            Endpoint::new(breaking.addr),
            Endpoint::new(healthy.addr),
        ])
        .outlier_detection(OutlierDetection {
            consecutive_failures: Some(2),
            base_ejection_time: Some(Duration::from_secs(60)),
            ..Default::default()
        })]);
    let agent = Agent::start(&config);
    let script = format!(
        "python3 - <<'PY'
import http.client
for i in range(4):
    c = http.client.HTTPConnection('{}', {}, timeout=10)
    c.request('GET', '/pay/%d' % i)
    r = c.getresponse()
    try:
        print(r.status, r.read().decode().strip())
    except http.client.IncompleteRead as e:
        print(r.status, 'broke off after', len(e.partial))
    c.close()
PY",
        vip.ip(),
        vip.port()
    );
    let said = lines(&agent.client_command(&script).output().unwrap());
    assert_eq!(
        said,
        [
            "200 broke off after 10",
            "200 healthy",
            "200 broke off after 10",
            "200 healthy"
        ]
    );
    assert_eq!(breaking.arrivals(), ["GET /pay/0", "GET /pay/2"]);
    assert_eq!(healthy.arrivals(), ["GET /pay/1", "GET /pay/3"]);
    assert_eq!(retries(&agent), 0.0);
    // Both broken answers counted against it: ejected after the second.
    let ejected = || agent.endpoint(breaking.addr)["ejections"] == 1;
    assert!(
        wait_until(Duration::from_secs(5), ejected),
        "{}",
        agent.endpoint(breaking.addr)
    );
}

/// A workload's HTTP connection to a request service is listed by
/// `sluice conns` while it is open (the service, the address dialled, its
/// bytes each way), and leaves the list when it closes.
/// An endpoint that says how long it keeps a quiet connection
/// (`Keep-Alive: timeout=1`): the agent sends no request on a kept
/// connection past that, so a POST without an idempotency key 1.2 s after
/// the one before goes on a new connection and is answered. (The endpoint
/// here drops a request that comes later on an old connection, as a
/// request crossing the server's close is lost: before, that POST got
/// 502.)
#[test]
fn a_kept_connection_is_not_used_past_the_endpoints_keep_alive_timeout() {
    let vip: SocketAddr = "127.77.8.28:8080".parse().unwrap();
    let backend = HttpBackend::start("ledger", Answer::CrossedClose(1000));
    let config = AgentConfig::with(|c| {
        let ledger = Workload::new("ledger", "payments", "ledger");
        to_ledger(c, vip, &backend, ledger)
    });
    let agent = Agent::start(&config);
    assert_eq!(
        posts_apart(&agent, vip, 2, 1.2),
        ["200", "200"],
        "{}",
        agent.log()
    );
    assert_eq!(backend.requests(), 2, "{:?}", backend.arrivals());
    assert_eq!(backend.connections(), 2);
}

#[test]
fn an_http_connection_is_listed_with_its_bytes_while_open() {
    let vip: SocketAddr = "127.77.8.27:8080".parse().unwrap();
    let backend = HttpBackend::start("b1", Answer::Status(200));
    let config =
        AgentConfig::new(&[service("pay", &vip.to_string(), &[backend.addr]).protocol("http")]);
    let agent = Agent::start(&config);
    // Three requests, then the connection stays open until stdin closes.
    let mut held = agent
        .client_command(&format!(
            // `-c`, not a here-document: stdin is the test's pipe.
            "python3 -c '
import http.client, os
c = http.client.HTTPConnection(\"{}\", {}, timeout=10)
for i in range(3):
    c.request(\"GET\", \"/pay/%d\" % i)
    c.getresponse().read()
os.read(0, 1)
'",
            vip.ip(),
            vip.port()
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn_guarded()
        .unwrap();
    let listed = || {
        let rows = agent.view("/debug/conns");
        rows.as_array().unwrap().clone()
    };
    let answered = |rows: &[serde_json::Value]| {
        rows.len() == 1 && rows[0]["bytes_received"].as_u64().unwrap_or(0) >= 3 * 40
    };
    assert!(
        wait_until(Duration::from_secs(10), || answered(&listed())),
        "{:?}",
        listed()
    );
    let row = &listed()[0];
    assert_eq!(row["destination_service"], "payments/pay", "{row}");
    assert_eq!(row["endpoint"], vip.to_string(), "{row}");
    assert_eq!(row["security"], "per_request", "{row}");
    assert_eq!(row["source_workload"], "client", "{row}");
    assert!(row["bytes_sent"].as_u64().unwrap() >= 3 * 30, "{row}");
    drop(held.stdin.take());
    assert!(held.wait().unwrap().success());
    assert!(
        wait_until(Duration::from_secs(5), || listed().is_empty()),
        "{:?}",
        listed()
    );
    assert_eq!(backend.requests(), 3);
}

/// `requests.max_requests_per_connection`: a connection to an endpoint
/// carries at most that many requests; the next request opens another.
#[test]
fn a_connection_to_an_endpoint_carries_at_most_max_requests_per_connection() {
    let vip: SocketAddr = "127.77.8.22:8080".parse().unwrap();
    let backend = HttpBackend::start("b1", Answer::Status(200));
    let config = AgentConfig::new(&[service("pay", &vip.to_string(), &[backend.addr])
        .protocol("http")
        .requests(Requests {
            max_requests_per_connection: Some(10),
            ..Requests::default()
        })]);
    let agent = Agent::start(&config);
    assert_eq!(gets(&agent, vip, 30), "b1=30");
    assert_eq!(backend.connections(), 3);
}

/// `circuit_breakers.max_pending_requests`: while two requests wait on an
/// endpoint that does not answer, a third is answered 503 at once (flag
/// UO) and counted as a fast failure; the two end at the route's timeout
/// and their slots are free again.
#[test]
fn requests_over_max_pending_requests_fail_fast() {
    let vip: SocketAddr = "127.77.8.23:8080".parse().unwrap();
    let backend = HttpBackend::start("stuck", Answer::Never);
    let config = AgentConfig::new(&[service("pay", &vip.to_string(), &[backend.addr])
        .protocol("http")
        .circuit_breakers(CircuitBreakers {
            max_pending_requests: Some(2),
            ..CircuitBreakers::default()
        })
        .requests(Requests {
            timeout: Some(Duration::from_secs(4)),
            max_attempts: Some(1),
            ..Requests::default()
        })]);
    let agent = Agent::start(&config);
    let pending = || {
        let rows = agent.view("/debug/breakers");
        let row = rows
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["service"] == "payments/pay");
        row.map_or(-1, |r| r["pending_requests"].as_i64().unwrap())
    };
    let waiting = agent
        .client_command(&format!(
            "python3 - <<'PY'
import http.client, threading
statuses = []
def get():
    c = http.client.HTTPConnection('{}', {}, timeout=30)
    c.request('GET', '/slow')
    statuses.append(c.getresponse().status)
ts = [threading.Thread(target=get) for _ in range(2)]
[t.start() for t in ts]
[t.join() for t in ts]
# Printed after both: two threads printing at once interleave.
print('\\n'.join(map(str, statuses)))
PY",
            vip.ip(),
            vip.port()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn_guarded()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || pending() == 2),
        "pending requests: {}",
        pending()
    );
    assert_eq!(send(&agent, vip, "GET", 1, false), "503=1");
    assert_eq!(flagged(&agent, "UO"), 1.0);
    let fast = agent.metrics().sum(
        "sluice_circuit_breaker_fast_failures_total",
        &[
            ("destination_service", "pay"),
            ("reason", "max_pending_requests"),
        ],
    );
    assert_eq!(fast, 1.0);
    assert_eq!(lines(&waiting.wait_with_output().unwrap()), ["504", "504"]);
    assert_eq!(pending(), 0);
}

/// Bytes that are no HTTP, sent to an HTTP service, get a 400 at once and
/// the connection closes; nothing reaches a backend.
#[test]
fn bytes_that_are_no_http_get_a_400() {
    let vip: SocketAddr = "127.77.8.12:8080".parse().unwrap();
    let backend = HttpBackend::start("b1", Answer::Status(200));
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
