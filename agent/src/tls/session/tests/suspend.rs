//! Suspend and resume: the state through JSON and back on the same socket,
//! as the next agent process would get them, with the peer going on.

use std::task::Poll;

use super::*;

const MIB: usize = 1024 * 1024;
/// A full record from rustls: header, 16 KiB, content type, AEAD tag.
const RECORD: u64 = 5 + 16_384 + 1 + 16;

/// Our server and a rustls client stream 4 MiB at each other; ours is
/// suspended and resumed twice mid-stream while the peer keeps sending.
#[tokio::test]
async fn two_suspends_mid_stream_lose_and_double_nothing_either_way() {
    const TOTAL: usize = 4 * MIB;
    let pki = pki();
    let (mut ours, theirs) = our_server(&pki).await;
    let (ours_sent, theirs_sent) = (pattern(TOTAL, 0x31), pattern(TOTAL, 0x42));
    let peer_sends = theirs_sent.clone();
    let peer = tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(theirs);
        let writing = async {
            for chunk in peer_sends.chunks(10_007) {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        };
        tokio::join!(read_all(&mut r), writing).0.unwrap()
    });
    let (mut received, mut sent) = (Vec::with_capacity(TOTAL), 0);
    let mut carried = Vec::new();
    for stop in [TOTAL / 3, 2 * TOTAL / 3 + 12_345, TOTAL] {
        {
            let (mut r, mut w) = ours.halves();
            let reading = async {
                let mut buf = vec![0u8; 7_001];
                while received.len() < stop {
                    match r.read(&mut buf).await.unwrap() {
                        0 => break,
                        n => received.extend_from_slice(&buf[..n]),
                    }
                }
            };
            let writing = async {
                while sent < stop {
                    let end = (sent + 9_999).min(stop);
                    w.write_all(&ours_sent[sent..end]).await.unwrap();
                    sent = end;
                }
                w.flush().await.unwrap();
            };
            tokio::join!(reading, writing);
        }
        if stop < TOTAL {
            let (resumed, summary) = suspend_and_resume(ours).await;
            ours = resumed;
            carried.push(summary);
        }
    }
    ours.shutdown().await.unwrap();
    assert_eq!(
        read_all(&mut ours).await.unwrap(),
        b"",
        "EOF after the rest"
    );
    assert_same(&received, &theirs_sent, "what we received");
    assert_same(&peer.await.unwrap(), &ours_sent, "what the peer received");
    assert_eq!(carried.len(), 2, "{carried:?}");
}

/// Our reading half polled until `ours` holds `want` bytes of a record it
/// cannot open yet (no whole record may come out meanwhile).
async fn hold_partial(ours: &mut TlsSession, want: usize) {
    std::future::poll_fn(|cx| {
        let mut scratch = [0u8; 1];
        let mut buf = ReadBuf::new(&mut scratch);
        if let Poll::Ready(r) = Pin::new(&mut *ours).poll_read(cx, &mut buf) {
            panic!("a record opened while only part of one was let through: {r:?}");
        }
        if ours.rx.received().len() >= want {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

#[tokio::test]
async fn a_suspend_mid_record_carries_the_partial_record() {
    let pki = pki();
    let (ours_tcp, theirs_tcp, mut relay) = Relay::start().await;
    let (mut ours, theirs) = our_server_on(&pki, ours_tcp, theirs_tcp).await;
    // The client's stream from here on is records of application data.
    let base = relay.so_far();
    relay.allow(base);
    let data = pattern(10 * 16_384, 0x51);
    let peer_sends = data.clone();
    let peer = tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(theirs);
        // One write and flush per record: rustls seals each whole.
        for record in peer_sends.chunks(16_384) {
            w.write_all(record).await.unwrap();
            w.flush().await.unwrap();
        }
        w.shutdown().await.unwrap();
        read_all(&mut r).await.unwrap()
    });
    // Two whole records and 7000 bytes of the third reach us.
    relay.allow(base + 2 * RECORD + 7_000);
    let mut got = vec![0u8; 2 * 16_384];
    ours.read_exact(&mut got).await.unwrap();
    relay.passed(base + 2 * RECORD + 7_000).await;
    hold_partial(&mut ours, 7_000).await;
    let (mut ours, carried) = suspend_and_resume(ours).await;
    assert_eq!(carried.received, 7_000, "the partial record");
    assert_eq!(carried.plaintext, 0);
    relay.allow(u64::MAX);
    got.extend(read_all(&mut ours).await.unwrap());
    assert_same(&got, &data, "what we received across the suspend");
    ours.write_all(b"after").await.unwrap();
    ours.shutdown().await.unwrap();
    assert_eq!(peer.await.unwrap(), b"after");
}

#[tokio::test]
async fn a_suspend_with_decrypted_bytes_unread_carries_them() {
    let pki = pki();
    let (mut ours, mut theirs) = our_client(&pki).await;
    let data = pattern(100_000, 0x61);
    theirs.write_all(&data).await.unwrap();
    theirs.shutdown().await.unwrap();
    let mut got = vec![0u8; 1_000];
    ours.read_exact(&mut got).await.unwrap();
    let (mut ours, carried) = suspend_and_resume(ours).await;
    assert_eq!(
        carried.plaintext,
        16_384 - 1_000,
        "the rest of the first record"
    );
    got.extend(read_all(&mut ours).await.unwrap());
    assert_same(&got, &data, "what we received across the suspend");
}

#[tokio::test]
async fn every_tls13_suite_carries_data_across_a_suspend() {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    for suite in [
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        let pki = pki_with(
            Some(suite),
            &[&rustls::version::TLS13],
            &[&rustls::version::TLS13],
        );
        let (mut ours, mut theirs) = our_client(&pki).await;
        assert_eq!(ours.negotiated_cipher_suite().suite(), suite.suite());
        let (down, up) = (pattern(50_000, 0x71), pattern(50_000, 0x72));
        theirs.write_all(&down).await.unwrap();
        theirs.shutdown().await.unwrap();
        ours.write_all(&up[..20_000]).await.unwrap();
        let mut got = vec![0u8; 20_000];
        ours.read_exact(&mut got).await.unwrap();
        let (mut ours, _) = suspend_and_resume(ours).await;
        ours.write_all(&up[20_000..]).await.unwrap();
        ours.shutdown().await.unwrap();
        got.extend(read_all(&mut ours).await.unwrap());
        assert_same(&got, &down, &format!("{:?} down", suite.suite()));
        let at_peer = read_all(&mut theirs).await.unwrap();
        assert_same(&at_peer, &up, &format!("{:?} up", suite.suite()));
    }
}

#[tokio::test]
async fn closed_directions_stay_closed_after_a_resume() {
    let pki = pki();
    let (mut ours, mut theirs) = our_client(&pki).await;
    ours.write_all(b"request").await.unwrap();
    ours.shutdown().await.unwrap();
    assert_eq!(read_all(&mut theirs).await.unwrap(), b"request");
    let (mut ours, _) = suspend_and_resume(ours).await;
    let e = ours.write_all(b"more").await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    theirs.write_all(b"answer").await.unwrap();
    theirs.shutdown().await.unwrap();
    let mut got = [0u8; 6];
    ours.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"answer");
    // The peer's close_notify may or may not be in yet: either way a
    // resumed session reads EOF, not an error.
    let (mut ours, _) = suspend_and_resume(ours).await;
    assert_eq!(read_all(&mut ours).await.unwrap(), b"");
    let (mut ours, _) = suspend_and_resume(ours).await;
    assert_eq!(read_all(&mut ours).await.unwrap(), b"", "EOF is carried");
}

#[tokio::test]
async fn the_state_shows_no_secret_and_a_damaged_one_is_refused() {
    let pki = pki();
    let (ours, _theirs) = our_client(&pki).await;
    let (sock, state) = ours.suspend().await.unwrap();
    let secret = state::Bytes(state.tx.secret.0.as_ref().to_vec());
    let secret_hex = serde_json::to_value(&secret).unwrap();
    let secret_hex = secret_hex.as_str().unwrap();
    let shown = format!("{state:?}");
    assert!(!shown.contains(secret_hex), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
    let json = serde_json::to_string(&state).unwrap();
    assert!(json.contains(secret_hex), "the state carries the secret");

    let mut other_format: serde_json::Value = serde_json::from_str(&json).unwrap();
    other_format["format"] = 2.into();
    let state: SessionState = serde_json::from_value(other_format).unwrap();
    let e = TlsSession::resume(sock, state).err().expect("refused");
    assert!(e.to_string().contains("format 2"), "{e}");

    let short = json.replace(secret_hex, &secret_hex[..32]);
    let state: SessionState = serde_json::from_str(&short).unwrap();
    let (sock, _) = tcp().await;
    let e = TlsSession::resume(sock, state).err().expect("refused");
    assert!(e.to_string().contains("secret of 16 bytes"), "{e}");
}

/// Both ends ours (two agents, both upgraded): each suspended and resumed
/// while the other streams, and every byte arrives once, in order.
#[tokio::test]
async fn two_sessions_of_ours_talk_across_suspends_of_both() {
    let pki = pki();
    let (c, s) = tcp().await;
    let (client, server) = tokio::join!(
        TlsSession::client(pki.client.clone(), name(), c),
        TlsSession::server(pki.server.clone(), s)
    );
    let (mut client, mut server) = (client.unwrap(), server.unwrap());
    let (up, down) = (pattern(300_000, 0x81), pattern(300_000, 0x82));
    let (mut at_server, mut at_client) = (Vec::new(), Vec::new());
    for part in 0..3 {
        let range = part * 100_000..(part + 1) * 100_000;
        let client_side = async {
            let mut got = vec![0u8; 100_000];
            client.write_all(&up[range.clone()]).await.unwrap();
            client.flush().await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            got
        };
        let server_side = async {
            let mut got = vec![0u8; 100_000];
            server.write_all(&down[range.clone()]).await.unwrap();
            server.flush().await.unwrap();
            server.read_exact(&mut got).await.unwrap();
            got
        };
        let (c, s) = tokio::join!(client_side, server_side);
        at_client.extend(c);
        at_server.extend(s);
        client = suspend_and_resume(client).await.0;
        server = suspend_and_resume(server).await.0;
        // The next part also crosses a KeyUpdate each way.
        client.refresh_traffic_keys();
    }
    assert_same(&at_server, &up, "client to server");
    assert_same(&at_client, &down, "server to client");
    client.shutdown().await.unwrap();
    assert_eq!(read_all(&mut server).await.unwrap(), b"");
}
