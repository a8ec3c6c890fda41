//! Hostile clients at the request path, as root: a request-smuggling
//! corpus at an HTTP/1.1 service and an HTTP/2 abuse corpus (rapid reset,
//! ping and settings floods, a header-list bomb) at an HTTP/2 one, each
//! from a workload behind the agent's redirect, while a well-behaved
//! client keeps sending on its own connection. Every case is refused (or
//! framed one way only) and counted by reason; no smuggled request reaches
//! a backend; the good client loses nothing.

use std::{net::SocketAddr, time::Duration};

use crate::support::*;

/// Python: a keep-alive client that sends `n` GETs in a thread while the
/// corpus runs, then prints how many got 200.
const GOOD_CLIENT: &str = r#"
import http.client, threading
good = []
def keep_sending(host, port, n):
    c = http.client.HTTPConnection(host, port, timeout=10)
    ok = 0
    for i in range(n):
        c.request('GET', '/good/%d' % i)
        r = c.getresponse()
        r.read()
        ok += r.status == 200
    good.append(ok)
"#;

/// Each case: bytes sent on a fresh connection, each followed by a second
/// request that must never reach a backend; prints what came back (the
/// status line, or `reset`) and whether the connection was closed.
const SMUGGLING: &str = r#"
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
good_thread = threading.Thread(target=keep_sending, args=(host, port, 300))
good_thread.start()
SMUGGLED = b'GET /smuggled HTTP/1.1\r\nHost: pay\r\n\r\n'
cases = [
    ('cl_then_te', b'POST /a HTTP/1.1\r\nHost: pay\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG'),
    ('te_then_cl', b'POST /a HTTP/1.1\r\nHost: pay\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nG'),
    ('two_lengths', b'POST /a HTTP/1.1\r\nHost: pay\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!'),
    ('te_not_chunked', b'POST /a HTTP/1.1\r\nHost: pay\r\nTransfer-Encoding: gzip\r\n\r\n'),
    ('te_chunked_then_other', b'POST /a HTTP/1.1\r\nHost: pay\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n'),
    ('space_before_colon', b'POST /a HTTP/1.1\r\nHost: pay\r\nContent-Length : 5\r\n\r\nhello'),
    ('bad_length', b'POST /a HTTP/1.1\r\nHost: pay\r\nContent-Length: +5\r\n\r\nhello'),
    ('http10_chunked', b'POST /a HTTP/1.0\r\nHost: pay\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n'),
    ('nul_in_header', b'GET /a HTTP/1.1\r\nHost: pay\r\nX-Pay: a\x00b\r\n\r\n'),
    ('huge_head', b'GET /a HTTP/1.1\r\nHost: pay\r\n' + b''.join(b'X-Pad-%d: %s\r\n' % (i, b'p' * 1000) for i in range(600)) + b'\r\n'),
]
for name, data in cases:
    s = socket.create_connection((host, port), timeout=10)
    try:
        s.sendall(data + SMUGGLED)
        got = b''
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        status = got.split(b'\r\n')[0].decode() if got else 'nothing'
        answers = got.count(b'HTTP/1.1 ')
        print(name, status, 'answers=%d' % answers, 'closed')
    except ConnectionResetError:
        print(name, 'reset')
    finally:
        s.close()
good_thread.join()
print('good', good[0])
"#;

fn backend_service(vip: SocketAddr, protocol: &str, backend: SocketAddr) -> Service {
    service("pay", &vip.to_string(), &[backend]).protocol(protocol)
}

#[test]
fn a_smuggling_corpus_is_refused_and_a_good_client_loses_nothing() {
    let vip: SocketAddr = "127.77.8.30:8080".parse().unwrap();
    let backend = crate::l7::HttpBackend::start("b1", crate::l7::Answer::Status(200));
    let config = AgentConfig::new(&[backend_service(vip, "http", backend.addr)]);
    let agent = Agent::start(&config);
    let script = format!(
        "python3 - {} {} <<'PY'\n{GOOD_CLIENT}\n{SMUGGLING}\nPY",
        vip.ip(),
        vip.port()
    );
    let out = agent.client_command(&script).output().unwrap();
    // Both lengths at once: Transfer-Encoding wins (RFC 9112 section
    // 6.1), the request is framed by it alone, and the connection closes
    // after its answer, so what follows is never read as a request.
    // Everything else that could be read two ways: 400 and a close.
    assert_eq!(
        lines(&out),
        [
            "cl_then_te HTTP/1.1 200 X answers=1 closed",
            "te_then_cl HTTP/1.1 200 X answers=1 closed",
            "two_lengths HTTP/1.1 400 Bad Request answers=1 closed",
            "te_not_chunked HTTP/1.1 400 Bad Request answers=1 closed",
            "te_chunked_then_other HTTP/1.1 400 Bad Request answers=1 closed",
            "space_before_colon HTTP/1.1 400 Bad Request answers=1 closed",
            "bad_length HTTP/1.1 400 Bad Request answers=1 closed",
            "http10_chunked HTTP/1.1 400 Bad Request answers=1 closed",
            "nul_in_header HTTP/1.1 400 Bad Request answers=1 closed",
            "huge_head HTTP/1.1 431 Request Header Fields Too Large answers=1 closed",
            "good 300",
        ],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let arrivals = backend.arrivals();
    let not_good: Vec<&String> = arrivals
        .iter()
        .filter(|a| !a.starts_with("GET /good/"))
        .collect();
    assert_eq!(not_good, ["POST /a", "POST /a"], "{arrivals:?}");
    assert_eq!(arrivals.len(), 302);
    // Counted as each connection ends in the agent, a moment after the
    // client saw it close.
    let counted = || refused(&agent, "malformed") == 7.0 && refused(&agent, "too_large") == 1.0;
    assert!(
        wait_until(Duration::from_secs(5), counted),
        "{} {}",
        refused(&agent, "malformed"),
        refused(&agent, "too_large")
    );
}

/// An h2c server (hyper's) answering every request `200 b1`, counting
/// them; on a runtime of its own.
fn h2c_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::{Arc, atomic::AtomicUsize, atomic::Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let counted = counted.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request| {
                        counted.fetch_add(1, Ordering::SeqCst);
                        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"b1\n"));
                        async move { Ok::<_, std::convert::Infallible>(http::Response::new(body)) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
                });
            }
        });
    });
    (addr, count)
}

/// Python's h2, plaintext (prior knowledge): each abuse on a connection
/// of its own while a good client keeps sending on another; prints how
/// each abusive connection ended.
const H2_ABUSE: &str = r#"
import socket, sys, threading
import h2.config, h2.connection, h2.events, h2.exceptions, h2.settings
host, port = sys.argv[1], int(sys.argv[2])
HEADERS = [(':method', 'GET'), (':scheme', 'http'), (':authority', 'pay'), (':path', '/')]

class Peer:
    def __init__(self):
        self.sock = socket.create_connection((host, port), timeout=10)
        config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.flush()
    def flush(self):
        self.sock.sendall(self.conn.data_to_send())
    def ending(self):
        # Reads until the agent ends the connection; what it said.
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return 'closed'
                for event in self.conn.receive_data(data):
                    if isinstance(event, h2.events.ConnectionTerminated):
                        return 'goaway %d' % event.error_code
                    if isinstance(event, h2.events.StreamReset):
                        return 'reset %d' % event.error_code
                    if isinstance(event, h2.events.ResponseReceived):
                        return 'answered ' + dict(event.headers)[b':status'].decode()
                self.flush()
        except (ConnectionResetError, BrokenPipeError):
            return 'reset by peer'

good = []
def keep_sending(n):
    p = Peer()
    ok = 0
    for i in range(n):
        stream = p.conn.get_next_available_stream_id()
        p.conn.send_headers(stream, HEADERS, end_stream=True)
        p.flush()
        done = False
        while not done:
            for event in p.conn.receive_data(p.sock.recv(65536)):
                if isinstance(event, h2.events.ResponseReceived):
                    ok += dict(event.headers)[b':status'] == b'200'
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    done = True
            p.flush()
    good.append(ok)

thread = threading.Thread(target=keep_sending, args=(300,))
thread.start()

# Rapid reset (CVE-2023-44487): streams opened and cancelled at once.
p = Peer()
for i in range(1000):
    stream = p.conn.get_next_available_stream_id()
    p.conn.send_headers(stream, HEADERS, end_stream=True)
    p.conn.reset_stream(stream)
try:
    p.flush()
except (ConnectionResetError, BrokenPipeError):
    pass
print('rapid reset:', p.ending())

# A header-list bomb: one request whose header block is 200 KB.
p = Peer()
bomb = HEADERS + [('x-pad-%d' % i, 'p' * 1000) for i in range(200)]
p.conn.max_outbound_frame_size = 16384
p.conn.send_headers(p.conn.get_next_available_stream_id(), bomb, end_stream=True)
try:
    p.flush()
except (ConnectionResetError, BrokenPipeError):
    pass
print('header bomb:', p.ending())

# A ping flood: 100,000 pings, never reading the acks.
p = Peer()
try:
    for i in range(100000):
        p.conn.ping(b'%08d' % i)
        if i % 1000 == 999:
            p.flush()
    p.flush()
    stream = p.conn.get_next_available_stream_id()
    p.conn.send_headers(stream, HEADERS, end_stream=True)
    p.flush()
    print('ping flood:', p.ending())
except (ConnectionResetError, BrokenPipeError, socket.timeout) as e:
    print('ping flood: cut')

# A settings flood: 100,000 SETTINGS frames.
p = Peer()
try:
    for i in range(100000):
        p.conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100 + i % 2})
        if i % 1000 == 999:
            p.flush()
    p.flush()
    stream = p.conn.get_next_available_stream_id()
    p.conn.send_headers(stream, HEADERS, end_stream=True)
    p.flush()
    print('settings flood:', p.ending())
except (ConnectionResetError, BrokenPipeError, socket.timeout, h2.exceptions.ProtocolError) as e:
    print('settings flood: cut')

thread.join()
print('good', good[0])
"#;

#[test]
fn an_http2_abuse_corpus_is_refused_and_a_good_stream_loses_nothing() {
    let vip: SocketAddr = "127.77.8.31:8080".parse().unwrap();
    let (backend, requests) = h2c_backend();
    let config = AgentConfig::new(&[backend_service(vip, "http2", backend)]);
    let agent = Agent::start(&config);
    let script = format!(
        "/usr/bin/python3 - {} {} <<'PY'\n{H2_ABUSE}\nPY",
        vip.ip(),
        vip.port()
    );
    let out = agent.client_command(&script).output().unwrap();
    // h2 refuses the reset flood (ENHANCE_YOUR_CALM) and the header block
    // over its 16 KiB limit (COMPRESSION_ERROR: the block is not read);
    // the agent's guard cuts the ping and settings floods.
    assert_eq!(
        lines(&out),
        [
            "rapid reset: goaway 11",
            "header bomb: goaway 9",
            "ping flood: cut",
            "settings flood: cut",
            "good 300",
        ],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // At most the reset flood's first streams reached the backend (h2
    // stops it after 20).
    let reached = requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!((300..=320).contains(&reached), "{reached}");
    let counted =
        || refused(&agent, "http2_protocol") == 2.0 && refused(&agent, "http2_flood") == 2.0;
    assert!(
        wait_until(Duration::from_secs(5), counted),
        "{} {}",
        refused(&agent, "http2_protocol"),
        refused(&agent, "http2_flood")
    );
}

/// Connections to request services the agent refused, by `reason`.
/// A workload's connection with no request for its service's idle limit
/// (`timeouts.idle`, 1 s here) ends gracefully between requests: HTTP/1.1
/// closed after its last answer, HTTP/2 with GOAWAY (NO_ERROR). Neither
/// is counted as a refusal.
#[test]
fn quiet_connections_end_gracefully_at_the_idle_limit() {
    let (h1, h2) = (
        "127.77.8.33:8080".parse::<SocketAddr>().unwrap(),
        "127.77.8.34:8080".parse::<SocketAddr>().unwrap(),
    );
    let backend = crate::l7::HttpBackend::start("b1", crate::l7::Answer::Status(200));
    let (h2_backend, _) = h2c_backend();
    let idle = Timeouts {
        idle: Some(Duration::from_secs(1)),
        ..Timeouts::default()
    };
    let config = AgentConfig::new(&[
        service("pay-h1", &h1.to_string(), &[backend.addr])
            .protocol("http")
            .timeouts(idle.clone()),
        service("pay-h2", &h2.to_string(), &[h2_backend])
            .protocol("http2")
            .timeouts(idle),
    ]);
    let agent = Agent::start(&config);
    let script = format!(
        "/usr/bin/python3 - <<'PY'
import socket, time
import h2.config, h2.connection, h2.events
s = socket.create_connection(('{h1_ip}', {h1_port}), timeout=10)
s.sendall(b'GET / HTTP/1.1\\r\\nHost: pay\\r\\n\\r\\n')
print('http/1.1', s.recv(100).split(b' ')[1].decode())
start = time.monotonic()
while s.recv(100):
    pass
print('http/1.1 closed', 0.9 < time.monotonic() - start < 9)
s = socket.create_connection(('{h2_ip}', {h2_port}), timeout=10)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
c.send_headers(1, [(':method', 'GET'), (':scheme', 'http'), (':authority', 'pay'), (':path', '/')], end_stream=True)
s.sendall(c.data_to_send())
# Frame by frame: hyper's graceful GOAWAY is followed by a PING that
# h2 refuses once the connection is terminated.
start, said, pending = None, None, b''
while said is None:
    data = s.recv(65536)
    if not data:
        said = 'closed without goaway'
    pending += data
    while said is None and len(pending) >= 9:
        size = int.from_bytes(pending[:3], 'big') + 9
        if len(pending) < size:
            break
        frame, pending = pending[:size], pending[size:]
        for event in c.receive_data(frame):
            if isinstance(event, h2.events.StreamEnded):
                start = time.monotonic()
                print('http/2 answered')
            if isinstance(event, h2.events.ConnectionTerminated):
                said = 'goaway %d' % event.error_code
    if said is None:
        s.sendall(c.data_to_send())
print('http/2', said, start is not None and 0.9 < time.monotonic() - start < 9)
PY",
        h1_ip = h1.ip(),
        h1_port = h1.port(),
        h2_ip = h2.ip(),
        h2_port = h2.port(),
    );
    let out = agent.client_command(&script).output().unwrap();
    assert_eq!(
        lines(&out),
        [
            "http/1.1 200",
            "http/1.1 closed True",
            "http/2 answered",
            "http/2 goaway 0 True"
        ],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for reason in [
        "malformed",
        "header_timeout",
        "http2_protocol",
        "http2_flood",
    ] {
        assert_eq!(refused(&agent, reason), 0.0, "{reason}");
    }
}

fn refused(agent: &Agent, reason: &str) -> f64 {
    agent.metrics().sum(
        "sluice_request_connection_refusals_total",
        &[("reason", reason)],
    )
}

/// A request body kept for a replay must arrive within the request's time
/// limit: a caller that stops sending mid-body gets 408 then, and holds
/// nothing longer.
#[test]
fn a_body_that_stalls_gets_408_at_the_time_limit() {
    let vip: SocketAddr = "127.77.8.32:8080".parse().unwrap();
    let backend = crate::l7::HttpBackend::start("b1", crate::l7::Answer::Status(200));
    let config =
        AgentConfig::new(&[
            backend_service(vip, "http", backend.addr).requests(Requests {
                timeout: Some(Duration::from_millis(300)),
                ..Default::default()
            }),
        ]);
    let agent = Agent::start(&config);
    let script = format!(
        "python3 - <<'PY'
import socket, time
s = socket.create_connection(('{}', {}), timeout=10)
s.sendall(b'POST /pay HTTP/1.1\\r\\nHost: pay\\r\\nIdempotency-Key: k1\\r\\nContent-Length: 100\\r\\n\\r\\n0123456789')
start = time.monotonic()
print(s.recv(200).split(b'\\r\\n')[0].decode())
print('in time' if time.monotonic() - start < 5 else 'late')
PY",
        vip.ip(),
        vip.port()
    );
    let out = agent.client_command(&script).output().unwrap();
    assert_eq!(
        lines(&out),
        ["HTTP/1.1 408 Request Timeout", "in time"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(backend.requests(), 0);
}
