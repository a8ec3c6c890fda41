//! The pause of a moving stream (`control`): both ends stop a stream that
//! carries bytes both ways, and each ends up with every byte the other
//! sent, none twice, even when the peer acts on the pause late (an asking
//! end that sent END_STREAM at once would fail this: the peer would read
//! it as the application's half-close).

use std::{collections::HashMap, future::Future, sync::Mutex};

use tokio::sync::oneshot;

use super::*;
use crate::tunnel::control::{ControlStream, Message, Token};

/// Writes a counting pattern and reads whatever comes, both at once, until
/// `pause` resolves; then quiesces as `order` says. Returns what it sent
/// and everything it received.
async fn flow_until(
    stream: &mut TunnelStream,
    pause: impl Future<Output = ()>,
    order: Quiesce,
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
    received.extend(stream.quiesce(order).await.expect("quiesce"));
    (sent, received)
}

#[tokio::test]
async fn a_paused_stream_ends_with_every_byte_on_both_sides() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (report, mut reported) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        // Stream id -> its pause, as an agent keeps them per connection.
        let pauses: Arc<Mutex<HashMap<u32, oneshot::Sender<Token>>>> = Default::default();
        let on_stream = |incoming: Incoming| {
            let pauses = pauses.clone();
            if incoming.is_control() {
                let mut control = ControlStream::new(incoming.accept().unwrap());
                tokio::spawn(async move {
                    while let Ok(Some(Message::Pause { stream, token })) = control.next().await {
                        // A busy agent acts on the pause late: the asking
                        // end must not end its side first.
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        if let Some(pause) = pauses.lock().unwrap().remove(&stream) {
                            let _ = pause.send(token);
                        }
                    }
                });
                return;
            }
            let mut stream = incoming.accept().unwrap();
            let (pause, paused) = oneshot::channel();
            pauses.lock().unwrap().insert(stream.id(), pause);
            let report = report.clone();
            tokio::spawn(async move {
                let asked = async {
                    let _ = paused.await;
                };
                let seen = flow_until(&mut stream, asked, Quiesce::Answering, 100).await;
                report.send(seen).unwrap();
            });
        };
        serve(tcp, &config(), on_stream, |_| {}, std::future::pending())
            .await
            .unwrap();
    });

    let client = TunnelClient::handshake(TcpStream::connect(addr).await.unwrap(), &config())
        .await
        .unwrap();
    let mut control = client
        .open_control()
        .await
        .unwrap()
        .expect("the peer speaks moves");
    let mut stream = client.open(target(1, 1), HeaderMap::new()).await.unwrap();
    let id = stream.id();
    // Bytes flow both ways for a while; then this end asks for the pause
    // (its successor would take the stream up under the token).
    let token = Token([7; 16]);
    let ask = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        control
            .send(Message::Pause { stream: id, token })
            .await
            .unwrap();
    };
    let (sent, received) = flow_until(&mut stream, ask, Quiesce::Asking, 1).await;
    let (peer_sent, peer_received) = timeout(Duration::from_secs(10), reported.recv())
        .await
        .expect("the server's side ended")
        .unwrap();
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

/// A peer that does not speak moves (ztunnel: it answers a CONNECT to
/// 0.0.0.0:0 with a refusal) has no control stream; its streams stay.
#[tokio::test]
async fn a_peer_without_moves_has_no_control_stream() {
    let server = Server::start(config()).await;
    let client = client(&server, &config()).await;
    assert!(client.open_control().await.unwrap().is_none());
    let mut stream = client
        .open(target(1, ECHO), HeaderMap::new())
        .await
        .unwrap();
    round_trip(&mut stream, b"still here").await;
}
