//! Tunnels over loopback TCP (TLS is the caller's: it comes in with the
//! inbound listener): many streams on one connection with every byte
//! checked, half-closes either way, a reset that stays on its stream,
//! refusals, the peer's window, the pool's sizing, GOAWAY and idle
//! connections, the copy loop carrying a stream, and an HTTP/2 client
//! that is not ours (Python's h2).

mod interop;
mod keepalive;
mod moves;
mod pool;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use http::{HeaderMap, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    time::{Instant, timeout},
};

use super::*;
use crate::{
    carry::copy::{self, Duplex},
    telemetry::ByteCounters,
};

// What the test server does with a CONNECT, by the target's port; any
// other port is proxied to the target through the copy loop.
/// Echoes until EOF, then sends "end" and half-closes.
const ECHO: u16 = 7;
/// Sends "first" and half-closes, then reports what it reads.
const SPEAK_FIRST: u16 = 8;
/// Refused with 403.
const REFUSE: u16 = 9;
/// Accepted, then never read.
const SILENT: u16 = 11;
/// Sends "x", reads a byte, then resets the stream.
const RESET: u16 = 13;
/// Sends BULK_LEN bytes and half-closes.
const BULK: u16 = 19;
const BULK_LEN: usize = 16 * 1024 * 1024;

fn config() -> TunnelConfig {
    TunnelConfig {
        keepalive: None,
        ..TunnelConfig::default()
    }
}

/// `len` bytes no window of which repeats within 251 bytes.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// What the bulk stream sends, made once (making it on the runtime's one
/// thread while a timed exchange waits would be timed too).
fn bulk_data() -> &'static [u8] {
    static DATA: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DATA.get_or_init(|| pattern(BULK_LEN, 1))
}

fn target(host: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, host], port))
}

struct Server {
    addr: SocketAddr,
    /// TCP connections accepted.
    accepted: Arc<AtomicUsize>,
    /// What the handlers saw, one line each.
    events: mpsc::UnboundedReceiver<String>,
    /// Bumped to send GOAWAY on the connections accepted so far.
    generation: watch::Sender<usize>,
}

impl Server {
    async fn start(config: TunnelConfig) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (events_tx, events) = mpsc::unbounded_channel();
        let (generation, generations) = watch::channel(0);
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, SeqCst);
                let (config, events) = (config.clone(), events_tx.clone());
                let mut generations = generations.clone();
                let born = *generations.borrow_and_update();
                tokio::spawn(async move {
                    let handled = events.clone();
                    let handler = move |incoming| {
                        tokio::spawn(handle(incoming, handled.clone()));
                    };
                    let shutdown = async move {
                        let _ = generations.wait_for(|g| *g > born).await;
                    };
                    let refused = events.clone();
                    let malformed = move |what: String| {
                        let _ = refused.send(format!("malformed: {what}"));
                    };
                    let result = serve(tcp, &config, handler, malformed, shutdown).await;
                    let _ = events.send(format!("connection ended: {result:?}"));
                });
            }
        });
        Server {
            addr,
            accepted,
            events,
            generation,
        }
    }

    /// Waits for an event containing `what`, skipping others.
    async fn expect(&mut self, what: &str) -> String {
        let wait = async {
            loop {
                let event = self.events.recv().await.expect("the server runs");
                if event.contains(what) {
                    return event;
                }
            }
        };
        timeout(Duration::from_secs(10), wait)
            .await
            .unwrap_or_else(|_| panic!("no server event with {what:?}"))
    }
}

async fn handle(incoming: Incoming, events: mpsc::UnboundedSender<String>) {
    let target = incoming.target();
    if target.port() == REFUSE {
        return incoming.refuse(StatusCode::FORBIDDEN);
    }
    let upstream = match target.port() {
        ECHO | SPEAK_FIRST | SILENT | RESET | BULK => None,
        _ => match TcpStream::connect(target).await {
            Ok(tcp) => Some(tcp),
            Err(_) => return incoming.refuse(StatusCode::SERVICE_UNAVAILABLE),
        },
    };
    let Ok(mut stream) = incoming.accept() else {
        return;
    };
    let outcome: std::io::Result<String> = async {
        match (target.port(), upstream) {
            (_, Some(mut tcp)) => {
                let bytes = ByteCounters::default();
                let idle = Duration::from_secs(10);
                let end = copy::proxy(&mut stream, &mut tcp, idle, None, &bytes).await;
                Ok(format!("proxied {:?} {end:?}", bytes.totals()))
            }
            (ECHO, None) => {
                let mut buf = vec![0; 4096];
                let mut total = 0;
                loop {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    stream.write_all(&buf[..n]).await?;
                    total += n;
                }
                stream.write_all(b"end").await?;
                stream.shutdown().await?;
                Ok(format!("echoed {total}"))
            }
            (SPEAK_FIRST, None) => {
                stream.write_all(b"first").await?;
                stream.shutdown().await?;
                let mut heard = String::new();
                stream.read_to_string(&mut heard).await?;
                Ok(format!("heard {heard}"))
            }
            (SILENT, None) => std::future::pending().await,
            (RESET, None) => {
                stream.write_all(b"x").await?;
                stream.read_exact(&mut [0; 1]).await?;
                stream.reset_on_close();
                Ok("reset".to_owned())
            }
            (_, None) => {
                stream.write_all(bulk_data()).await?;
                stream.shutdown().await?;
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).await?;
                Ok("bulk sent".to_owned())
            }
        }
    }
    .await;
    let line = match outcome {
        Ok(done) => format!("{target}: {done}"),
        Err(e) => format!("{target}: error {:?}", e.kind()),
    };
    let _ = events.send(line);
}

async fn client(server: &Server, config: &TunnelConfig) -> TunnelClient {
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    TunnelClient::handshake(tcp, config).await.unwrap()
}

async fn read_all(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut all = Vec::new();
    r.read_to_end(&mut all).await?;
    Ok(all)
}

/// Writes `msg` and reads its echo.
async fn round_trip(stream: &mut TunnelStream, msg: &[u8]) {
    round_trip_with(stream, msg, msg).await;
}

/// Writes `msg` and reads `answer`.
async fn round_trip_with(stream: &mut TunnelStream, msg: &[u8], answer: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut back = vec![0; answer.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, answer);
}

/// Sends `data`, half-closes, and reads everything back at once.
async fn exchange(stream: &mut TunnelStream, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = stream.split();
    let send = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let (sent, got) = tokio::join!(send, read_all(&mut r));
    sent.unwrap();
    got.unwrap()
}

fn echoed(data: &[u8]) -> Vec<u8> {
    [data, b"end"].concat()
}

/// A TCP echo server for one connection, half-closing after the
/// client's FIN.
async fn tcp_echo() -> SocketAddr {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut tcp, _) = echo.accept().await.unwrap();
        let (mut r, mut w) = tcp.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    echo_addr
}

#[tokio::test]
async fn many_streams_share_one_connection_byte_for_byte() {
    let server = Server::start(config()).await;
    let client = client(&server, &config()).await;
    let streams = (0..40u8).map(|i| {
        let client = client.clone();
        tokio::spawn(async move {
            let mut stream = client.open(target(i + 1, ECHO), HeaderMap::new()).await?;
            let data = pattern(20_000 + usize::from(i) * 997, i);
            // Each stream half-closes; its echo and "end" still come back.
            assert_eq!(
                exchange(&mut stream, &data).await,
                echoed(&data),
                "stream {i}"
            );
            Ok::<_, TunnelError>(())
        })
    });
    for stream in futures::future::join_all(streams).await {
        stream.unwrap().unwrap();
    }
    assert_eq!(
        server.accepted.load(SeqCst),
        1,
        "one connection, one handshake"
    );
}

/// The copy loop keeps its buffer after a full read and waits in
/// `read_some` with it: a quiet stream gives it back while waiting, and
/// reads into a new one when bytes come.
#[tokio::test]
async fn a_quiet_stream_holds_no_copy_buffer() {
    use crate::carry::copy::ReadSide;
    let server = Server::start(config()).await;
    let client = client(&server, &config()).await;
    let mut stream = client
        .open(target(1, ECHO), HeaderMap::new())
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.split();
    let mut kept = vec![0u8; 2048];
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    {
        let mut read = std::pin::pin!(reader.read_some(&mut kept, 2048));
        assert!(read.as_mut().poll(&mut cx).is_pending());
    }
    assert_eq!(kept.capacity(), 0, "the copy's buffer given back");
    writer.write_all(b"ping").await.unwrap();
    let n = reader.read_some(&mut kept, 2048).await.unwrap();
    assert_eq!(&kept[..n], b"ping");
}

#[tokio::test]
async fn a_half_close_from_the_server_leaves_the_client_sending() {
    let mut server = Server::start(config()).await;
    let client = client(&server, &config()).await;
    let mut stream = client
        .open(target(1, SPEAK_FIRST), HeaderMap::new())
        .await
        .unwrap();
    // EOF from the server's END_STREAM...
    assert_eq!(read_all(&mut stream).await.unwrap(), b"first");
    // ...and this direction still carries bytes.
    stream.write_all(b"after").await.unwrap();
    stream.shutdown().await.unwrap();
    server.expect("heard after").await;
}

#[tokio::test]
async fn a_reset_stays_on_its_stream() {
    let mut server = Server::start(config()).await;
    let client = client(&server, &config()).await;
    let mut a = client
        .open(target(2, ECHO), HeaderMap::new())
        .await
        .unwrap();
    let mut b = client
        .open(target(3, ECHO), HeaderMap::new())
        .await
        .unwrap();
    round_trip(&mut a, b"a").await;
    round_trip(&mut b, b"b").await;
    // Ours: the server's side of A sees a reset connection.
    a.reset_on_close();
    drop(a);
    server.expect("127.0.0.2:7: error ConnectionReset").await;
    // The peer's: reading C fails as a reset.
    let mut c = client
        .open(target(4, RESET), HeaderMap::new())
        .await
        .unwrap();
    round_trip_with(&mut c, b"y", b"x").await;
    let read = read_all(&mut c).await;
    assert_eq!(
        read.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset
    );
    // B and the connection carry on.
    assert_eq!(exchange(&mut b, b"more").await, echoed(b"more"));
    assert!(client.is_usable());
    let mut d = client
        .open(target(5, ECHO), HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(exchange(&mut d, b"d").await, echoed(b"d"));
    assert_eq!(server.accepted.load(SeqCst), 1);
}

#[tokio::test]
async fn refusals_reach_the_client_with_their_status() {
    let server = Server::start(config()).await;
    let client = client(&server, &config()).await;
    match client.open(target(1, REFUSE), HeaderMap::new()).await {
        Err(TunnelError::Refused { status, target: t }) => {
            assert_eq!((status, t), (StatusCode::FORBIDDEN, target(1, REFUSE)));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Malformed requests, from a plain HTTP/2 client: not CONNECT, and a
    // name where an address belongs.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (mut send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    for (method, uri, status) in [
        ("GET", "http://127.0.0.1:7/", StatusCode::METHOD_NOT_ALLOWED),
        ("CONNECT", "localhost:7", StatusCode::BAD_REQUEST),
    ] {
        let request = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap();
        let (response, _) = send.send_request(request, true).unwrap();
        assert_eq!(response.await.unwrap().status(), status, "{method} {uri}");
    }
    // The tunnel connection is untouched.
    let mut stream = client
        .open(target(1, ECHO), HeaderMap::new())
        .await
        .unwrap();
    assert_eq!(exchange(&mut stream, b"ok").await, echoed(b"ok"));
}

#[tokio::test]
async fn writes_wait_for_the_peers_window() {
    let window = 64 * 1024;
    let server_config = TunnelConfig {
        stream_window: window,
        ..config()
    };
    let server = Server::start(server_config).await;
    let client = client(&server, &config()).await;
    let mut stream = client
        .open(target(1, SILENT), HeaderMap::new())
        .await
        .unwrap();
    let chunk = vec![7u8; 16 * 1024];
    let mut taken = 0;
    // The peer never reads: writes stop where its window ends.
    for _ in 0..64 {
        match timeout(Duration::from_millis(200), stream.write(&chunk)).await {
            Ok(n) => taken += n.unwrap(),
            Err(_) => break,
        }
    }
    assert!(taken > 0 && taken <= window as usize, "took {taken} bytes");
}

#[tokio::test]
async fn the_copy_loop_carries_a_stream_with_half_closes() {
    let mut server = Server::start(config()).await;
    let echo_addr = tcp_echo().await;
    let client = client(&server, &config()).await;
    let mut stream = client.open(echo_addr, HeaderMap::new()).await.unwrap();
    let data = pattern(1024 * 1024, 3);
    assert_eq!(exchange(&mut stream, &data).await, data);
    let len = data.len();
    server
        .expect(&format!("proxied ({len}, {len}) Closed"))
        .await;
}

#[tokio::test]
async fn a_bulk_stream_beside_small_exchanges() {
    let server = Server::start(config()).await;
    let client = client(&server, &config()).await;
    let expected = bulk_data();
    let mut bulk = client
        .open(target(1, BULK), HeaderMap::new())
        .await
        .unwrap();
    let reading = tokio::spawn(async move {
        let started = Instant::now();
        let got = read_all(&mut bulk).await.unwrap();
        bulk.shutdown().await.unwrap();
        (got, started.elapsed())
    });
    let mut small = client
        .open(target(2, ECHO), HeaderMap::new())
        .await
        .unwrap();
    let mut rtts = Vec::new();
    for i in 0..50u8 {
        let started = Instant::now();
        round_trip(&mut small, &pattern(64, i)).await;
        rtts.push(started.elapsed());
    }
    let (got, took) = reading.await.unwrap();
    assert!(got == expected, "the bulk stream's bytes differ");
    rtts.sort();
    println!(
        "bulk {BULK_LEN} bytes in {took:?}; 64 B round trips beside it: median {:?}, max {:?}",
        rtts[rtts.len() / 2],
        rtts[rtts.len() - 1]
    );
}
