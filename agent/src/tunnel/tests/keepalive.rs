//! PINGs that find a peer gone silent.

use super::*;

/// A peer that goes silent (its host froze, a path dropped every packet)
/// is found by its missing PING answers: the connection ends, its stream
/// fails, and the client takes no new stream on it.
#[tokio::test]
async fn a_silent_peer_is_found_by_the_pings_it_does_not_answer() {
    let server = Server::start(config()).await;
    // A relay that forwards until told to stop, and then holds both
    // sockets open without a byte either way.
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let (freeze, frozen) = tokio::sync::watch::channel(false);
    let upstream = server.addr;
    tokio::spawn(async move {
        let (mut near, _) = relay.accept().await.unwrap();
        let mut far = TcpStream::connect(upstream).await.unwrap();
        let mut frozen = frozen;
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut near, &mut far) => {}
            _ = frozen.wait_for(|f| *f) => {}
        }
        std::future::pending::<()>().await;
        drop((near, far));
    });
    let alive = TunnelConfig {
        keepalive: Some(Keepalive {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
        }),
        ..config()
    };
    let tcp = TcpStream::connect(relay_addr).await.unwrap();
    let client = TunnelClient::handshake(tcp, &alive).await.unwrap();
    let mut stream = client
        .open(target(1, SILENT), HeaderMap::new())
        .await
        .unwrap();
    // PINGs answered: still usable after several intervals.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(client.is_usable());
    freeze.send(true).unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Err(_))),
        "the stream fails once the PING goes unanswered: {read:?}"
    );
    assert!(!client.is_usable());
}
