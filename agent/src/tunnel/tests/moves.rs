//! The pause of a moving stream (`control`, `moves`): one end asks on the
//! connection's control stream, both stop a stream that carries bytes
//! both ways, and each ends up with every byte the other sent, none
//! twice, even when the peer acts on the pause late (an asking end that
//! sent END_STREAM at once would fail this: the peer would read it as the
//! application's half-close).

use std::future::Future;

use super::*;

/// Writes a counting pattern and reads whatever comes, both at once, until
/// `pause` resolves; then pauses the stream itself (None: the asking
/// end) or answers the peer's pause. Returns what it sent and everything
/// it received.
async fn flow_until(
    stream: &mut TunnelStream,
    pause: impl Future<Output = ()>,
    order: Option<Quiesce>,
    seed: u8,
) -> (Vec<u8>, Vec<u8>) {
    let (mut sent, mut received) = (Vec::new(), Vec::new());
    let mut buf = vec![0; 8192];
    tokio::pin!(pause);
    let (mut reader, mut writer) = stream.split();
    loop {
        let chunk = pattern(1500, seed.wrapping_add(sent.len() as u8));
        // Both branches are cancel-safe: a stream takes bytes only when
        // its write is ready, and hands them out only when its read is.
        tokio::select! {
            biased;
            () = &mut pause => break,
            n = reader.read(&mut buf) => {
                let n = n.expect("read");
                assert!(n > 0, "END_STREAM before the pause");
                received.extend_from_slice(&buf[..n]);
            }
            n = writer.write(&chunk) => sent.extend_from_slice(&chunk[..n.expect("write")]),
        }
    }
    let rest = match order {
        Some(order) => stream.quiesce(order).await.expect("quiesce"),
        None => stream.pause().await.expect("pause").read,
    };
    received.extend(rest);
    (sent, received)
}

/// A client on one tunnel connection to a server that hands each stream
/// to `on_stream`.
async fn one_connection(on_stream: impl FnMut(Incoming) + Send + 'static) -> TunnelClient {
    one_connection_with(config(), on_stream).await
}

/// [`one_connection`], both ends with `config`.
async fn one_connection_with(
    config: TunnelConfig,
    on_stream: impl FnMut(Incoming) + Send + 'static,
) -> TunnelClient {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = config.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        serve(tcp, &served, on_stream, |_| {}, std::future::pending())
            .await
            .unwrap();
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    TunnelClient::handshake(tcp, &config).await.unwrap()
}

/// A stream on `client` once the connection's control stream is open
/// (naming node-a), so that it can be paused.
async fn pausable_stream(client: &TunnelClient) -> TunnelStream {
    tokio::spawn(
        client
            .clone()
            .control("node-a".into(), std::future::pending()),
    );
    let stream = client.open(target(1, 1), HeaderMap::new()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stream.can_pause() {
        assert!(Instant::now() < deadline, "the control stream opened");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stream
}

#[tokio::test]
async fn a_paused_stream_ends_with_every_byte_on_both_sides() {
    let (report, mut reported) = mpsc::unbounded_channel();
    let on_stream = move |incoming: Incoming| {
        let mut stream = incoming.accept().unwrap();
        let paused = stream.take_pause().expect("a stream can be paused");
        let report = report.clone();
        tokio::spawn(async move {
            let asked = async {
                paused.await.expect("the peer's pause");
                // A busy agent acts on the pause late: the asking end
                // must not end its side first.
                tokio::time::sleep(Duration::from_millis(30)).await;
            };
            let node = stream.peer_node();
            let seen = flow_until(&mut stream, asked, Some(Quiesce::Answering), 100).await;
            report.send((seen, node)).unwrap();
        });
    };
    let client = one_connection(on_stream).await;
    let mut stream = pausable_stream(&client).await;
    // Bytes flow both ways for a while; then this end pauses the stream
    // (its successor would take it up under the token).
    let ask = tokio::time::sleep(Duration::from_millis(100));
    let (sent, received) = flow_until(&mut stream, ask, None, 1).await;
    let ((peer_sent, peer_received), node) = timeout(Duration::from_secs(10), reported.recv())
        .await
        .expect("the server's side ended")
        .unwrap();
    assert_eq!(
        node.as_deref(),
        Some("node-a"),
        "the control stream named its node"
    );
    assert!(
        sent.len() > 50_000 && peer_sent.len() > 50_000,
        "bytes flowed both ways: {} and {}",
        sent.len(),
        peer_sent.len()
    );
    assert!(
        peer_received == sent,
        "the server got every byte sent, once: {} of {}",
        peer_received.len(),
        sent.len()
    );
    assert!(
        received == peer_sent,
        "the client got every byte sent, once: {} of {}",
        received.len(),
        peer_sent.len()
    );
}

/// Without a control stream (a peer that does not speak moves, as
/// ztunnel), a stream cannot be paused: the agent lets it finish where it
/// is.
#[tokio::test]
async fn without_a_control_stream_a_stream_cannot_pause() {
    let server = Server::start(config()).await;
    let client = client(&server, &config()).await;
    let mut stream = client
        .open(target(1, ECHO), HeaderMap::new())
        .await
        .unwrap();
    assert!(!stream.can_pause());
    let e = stream.pause().await.unwrap_err();
    assert!(e.to_string().contains("control stream is not open"), "{e}");
    round_trip(&mut stream, b"still here").await;
}

/// A paused stream gives no window back: a peer that sends on and on
/// after the pause stalls at one window, and what it sent arrives whole.
#[tokio::test]
async fn a_paused_stream_takes_no_more_than_a_window() {
    paused_stream_takes_one_window(config()).await;
}

/// The same with a configured window four times the default
/// (`mesh.tunnels.stream_window`): the pause takes all of it, where a
/// bound fixed at the default would refuse the peer's bytes.
#[tokio::test]
async fn a_paused_stream_takes_a_configured_window_whole() {
    paused_stream_takes_one_window(TunnelConfig {
        stream_window: 4 * STREAM_WINDOW,
        ..config()
    })
    .await;
}

async fn paused_stream_takes_one_window(config: TunnelConfig) {
    let window = config.stream_window as usize;
    let (report, mut reported) = mpsc::unbounded_channel();
    let on_stream = move |incoming: Incoming| {
        let mut stream = incoming.accept().unwrap();
        let report = report.clone();
        tokio::spawn(async move {
            let answered = stream.quiesce(Quiesce::Answering).await;
            report.send(answered.unwrap()).unwrap();
        });
    };
    let client = one_connection_with(config, on_stream).await;
    let mut stream = client.open(target(1, 1), HeaderMap::new()).await.unwrap();
    let chunk = pattern(16 * 1024, 3);
    let mut sent = Vec::new();
    // Bounded: four windows' worth, or until the writes stall.
    for _ in 0..(4 * window / chunk.len()) {
        let write = timeout(Duration::from_millis(300), stream.write(&chunk)).await;
        match write {
            Ok(n) => sent.extend_from_slice(&chunk[..n.unwrap()]),
            Err(_) => break,
        }
    }
    assert_eq!(sent.len(), window, "the writes stalled at one window");
    stream.shutdown().await.unwrap();
    let received = timeout(Duration::from_secs(10), reported.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(received == sent, "{} of {}", received.len(), sent.len());
}

/// Both ends pause the same stream at once (both agents upgraded at the
/// same moment): the calling end's pause stands, the called end answers
/// it, and its side is to be kept under the calling end's token (for the
/// calling agent's successor to take up).
#[tokio::test]
async fn when_both_ends_pause_one_stream_the_calling_ends_pause_stands() {
    let (report, mut reported) = mpsc::unbounded_channel();
    let on_stream = move |incoming: Incoming| {
        let mut stream = incoming.accept().unwrap();
        let report = report.clone();
        tokio::spawn(async move {
            let paused = stream.pause_within(Duration::from_secs(5)).await;
            report.send(paused).unwrap();
        });
    };
    let client = one_connection(on_stream).await;
    let mut stream = pausable_stream(&client).await;
    let ours = stream
        .pause_within(Duration::from_secs(5))
        .await
        .expect("the calling end's pause stands");
    let theirs = timeout(Duration::from_secs(5), reported.recv())
        .await
        .expect("the server's pause ended")
        .unwrap()
        .expect("the called end answered instead");
    assert!(!ours.park, "the calling end's side goes with its token");
    assert!(theirs.park, "the called end's side is kept");
    assert_eq!(theirs.token, ours.token, "under the calling end's token");
}
