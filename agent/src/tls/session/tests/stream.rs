//! The data phase against rustls: bytes both ways, half-closes, what comes
//! with the handshake, resumption, errors, and what an idle session holds.

use std::{
    io::{Read, Write},
    task::Waker,
};

use tokio::io::{AsyncWrite, ReadBuf};

use super::*;

const MIB: usize = 1024 * 1024;

/// Reads to EOF the way the copy loop does: `read_some` into a buffer that
/// starts at 1 KiB, doubles on full reads and is dropped after short ones.
async fn read_some_all(r: &mut TlsReadHalf<'_>) -> io::Result<Vec<u8>> {
    let (mut all, mut buf, mut size) = (Vec::new(), Vec::new(), 1024);
    loop {
        let n = r.read_some(&mut buf, size).await?;
        if n == 0 {
            return Ok(all);
        }
        if n == buf.len() && size < 16 * 1024 {
            size *= 2;
        }
        all.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            buf = Vec::new();
        } else if buf.len() < size {
            buf.resize(size, 0);
        }
    }
}

/// Both ends send `len` bytes at once, close, and read the other's to EOF;
/// ours reads with `read_some` or else as an `AsyncRead`.
async fn exchange(
    ours: &mut TlsSession,
    theirs: impl AsyncRead + AsyncWrite + Unpin,
    len: usize,
    with_read_some: bool,
) {
    let (ours_sent, theirs_sent) = (pattern(len, 0x11), pattern(len, 0x22));
    let (mut r, mut w) = ours.halves();
    let our_end = async {
        let reading = async {
            if with_read_some {
                read_some_all(&mut r).await
            } else {
                read_all(&mut r).await
            }
        };
        let writing = async {
            w.write_all(&ours_sent).await.unwrap();
            w.shutdown().await.unwrap();
        };
        tokio::join!(reading, writing).0.unwrap()
    };
    let their_end = async {
        let (mut r, mut w) = tokio::io::split(theirs);
        let writing = async {
            w.write_all(&theirs_sent).await.unwrap();
            w.shutdown().await.unwrap();
        };
        tokio::join!(read_all(&mut r), writing).0.unwrap()
    };
    let (at_ours, at_theirs) = tokio::join!(our_end, their_end);
    assert_same(&at_ours, &theirs_sent, "what we received");
    assert_same(&at_theirs, &ours_sent, "what the rustls peer received");
}

#[tokio::test]
async fn our_client_and_a_rustls_server_carry_a_mebibyte_each_way() {
    let pki = pki();
    let (mut ours, theirs) = our_client(&pki).await;
    assert_eq!(ours.role(), Role::Client);
    assert_eq!(ours.protocol_version(), ProtocolVersion::TLSv1_3);
    assert_eq!(
        ours.negotiated_cipher_suite().suite(),
        theirs
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .unwrap()
            .suite()
    );
    let chain = ours.peer_certificates().expect("the server's chain");
    assert_eq!(chain[0], certs().server.0, "the server's certificate");
    exchange(&mut ours, theirs, MIB, true).await;
}

#[tokio::test]
async fn our_server_and_a_rustls_client_carry_a_mebibyte_each_way() {
    let pki = pki();
    let (mut ours, theirs) = our_server(&pki).await;
    assert_eq!(ours.role(), Role::Server);
    let chain = ours.peer_certificates().expect("the caller's chain");
    assert_eq!(chain[0], certs().client.0, "the caller's certificate");
    exchange(&mut ours, theirs, MIB, false).await;
}

#[tokio::test]
async fn our_close_notify_is_a_half_close_and_the_peer_still_answers() {
    let pki = pki();
    let (mut ours, mut theirs) = our_client(&pki).await;
    let request = pattern(100_000, 3);
    ours.write_all(&request).await.unwrap();
    ours.shutdown().await.unwrap();
    // The peer reads to EOF, which only our close_notify gives...
    assert_same(&read_all(&mut theirs).await.unwrap(), &request, "request");
    // ...and answers on the half still open.
    let answer = pattern(70_000, 4);
    theirs.write_all(&answer).await.unwrap();
    theirs.shutdown().await.unwrap();
    assert_same(&read_all(&mut ours).await.unwrap(), &answer, "answer");
    assert!(
        ours.write_all(b"late").await.is_err(),
        "no write after close"
    );
}

#[tokio::test]
async fn the_peers_close_notify_is_eof_and_we_still_answer() {
    let pki = pki();
    let (mut ours, mut theirs) = our_server(&pki).await;
    let request = pattern(100_000, 5);
    theirs.write_all(&request).await.unwrap();
    theirs.shutdown().await.unwrap();
    assert_same(&read_all(&mut ours).await.unwrap(), &request, "request");
    let mut more = [0u8; 8];
    assert_eq!(ours.read(&mut more).await.unwrap(), 0, "EOF stays EOF");
    let answer = pattern(70_000, 6);
    ours.write_all(&answer).await.unwrap();
    ours.shutdown().await.unwrap();
    assert_same(&read_all(&mut theirs).await.unwrap(), &answer, "answer");
}

/// A rustls client sends its Finished, a request and a close_notify in one
/// TCP write; our server reads them with the handshake and loses nothing.
#[tokio::test]
async fn bytes_sent_with_the_clients_finished_are_not_lost() {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let request = pattern(3000, 7);
    let (config, sent) = (pki.client.clone(), request.clone());
    let client = tokio::task::spawn_blocking(move || {
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        let mut conn = rustls::ClientConnection::new(config, name()).unwrap();
        while conn.is_handshaking() {
            while conn.wants_write() && conn.is_handshaking() {
                conn.write_tls(&mut sock).unwrap();
            }
            conn.read_tls(&mut sock).unwrap();
            conn.process_new_packets().unwrap();
        }
        // The server's Finished is in; ours is still queued.
        conn.writer().write_all(&sent).unwrap();
        conn.send_close_notify();
        let mut flight = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut flight).unwrap();
        }
        sock.write_all(&flight).unwrap();
        let mut answer = Vec::new();
        loop {
            match conn.reader().read_to_end(&mut answer) {
                Ok(_) => return answer,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("reading the answer: {e}"),
            }
            if conn.read_tls(&mut sock).unwrap() == 0 {
                return answer;
            }
            conn.process_new_packets().unwrap();
        }
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let mut ours = TlsSession::server(pki.server.clone(), tcp).await.unwrap();
    assert!(
        !ours.rx.plaintext().is_empty(),
        "the request came with the Finished and was decrypted by rustls"
    );
    assert!(ours.rx.closed, "the close_notify came with it too");
    assert_same(&read_all(&mut ours).await.unwrap(), &request, "request");
    ours.write_all(b"answer").await.unwrap();
    ours.shutdown().await.unwrap();
    assert_eq!(client.await.unwrap(), b"answer");
}

#[tokio::test]
async fn a_second_connection_of_our_client_resumes() {
    let pki = pki();
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let (mut ours, mut theirs) = our_client(&pki).await;
        // Reading takes the server's tickets in before its data.
        theirs.write_all(b"x").await.unwrap();
        theirs.shutdown().await.unwrap();
        assert_eq!(read_all(&mut ours).await.unwrap(), b"x");
        assert!(ours.rx.tickets.is_none(), "ticket store let go after data");
        kinds.push((ours.handshake_kind(), theirs.get_ref().1.handshake_kind()));
    }
    use rustls::HandshakeKind::{Full, Resumed};
    assert_eq!(kinds[0], (Some(Full), Some(Full)));
    assert_eq!(
        kinds[1],
        (Some(Resumed), Some(Resumed)),
        "the ticket was kept"
    );
}

#[tokio::test]
async fn a_second_connection_to_our_server_resumes() {
    let pki = pki();
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let (mut ours, mut theirs) = our_server(&pki).await;
        ours.write_all(b"x").await.unwrap();
        ours.shutdown().await.unwrap();
        assert_eq!(read_all(&mut theirs).await.unwrap(), b"x");
        kinds.push((ours.handshake_kind(), theirs.get_ref().1.handshake_kind()));
    }
    use rustls::HandshakeKind::{Full, Resumed};
    assert_eq!(kinds[0], (Some(Full), Some(Full)));
    assert_eq!(kinds[1], (Some(Resumed), Some(Resumed)));
}

#[tokio::test]
async fn a_corrupted_record_is_an_error_naming_it() {
    let pki = pki();
    let (ours_tcp, theirs_tcp, relay) = Relay::start().await;
    let (mut ours, mut theirs) = our_server_on(&pki, ours_tcp, theirs_tcp).await;
    // The client's stream after its Finished: its records of 16 KiB each
    // (5 + 16384 + 1 + 16 bytes). Spoil the second one's body.
    let second = relay.so_far() + 16_406 + 100;
    relay.corrupt(second);
    let data = pattern(40_000, 8);
    theirs.write_all(&data).await.unwrap();
    theirs.flush().await.unwrap();
    let mut got = vec![0u8; 16_384];
    ours.read_exact(&mut got).await.unwrap();
    assert_same(&got, &data[..16_384], "the first record");
    let e = ours.read(&mut got).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("did not decrypt"), "{e}");
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<SessionError>());
    assert!(
        matches!(inner, Some(SessionError::Undecryptable { seq: 1 })),
        "{inner:?}"
    );
}

#[tokio::test]
async fn an_alert_from_the_peer_is_an_error_naming_it() {
    let pki = pki();
    let (mut ours, mut theirs) = our_server(&pki).await;
    // A record the peer cannot decrypt: it answers with bad_record_mac.
    let mut bogus = vec![23, 3, 3, 0, 40];
    bogus.extend_from_slice(&[0x5a; 40]);
    ours.get_ref().writable().await.unwrap();
    assert_eq!(ours.get_ref().try_write(&bogus).unwrap(), bogus.len());
    assert!(read_all(&mut theirs).await.is_err(), "the peer failed");
    let e = read_all(&mut ours).await.unwrap_err();
    assert!(e.to_string().contains("BadRecordMac"), "{e}");
}

#[tokio::test]
async fn a_fin_without_close_notify_is_truncation() {
    let pki = pki();
    let (mut ours, mut theirs) = our_client(&pki).await;
    theirs.write_all(b"partial").await.unwrap();
    theirs.flush().await.unwrap();
    theirs.get_mut().0.shutdown().await.unwrap();
    let mut got = [0u8; 7];
    ours.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"partial");
    let e = ours.read(&mut got).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert!(e.to_string().contains("close_notify"), "{e}");
}

#[tokio::test]
async fn a_tls12_handshake_is_refused_naming_the_version() {
    let both = [&rustls::version::TLS13, &rustls::version::TLS12];
    let pki = pki_with(None, &[&rustls::version::TLS12], &both);
    let (c, s) = tcp().await;
    let acceptor = TlsAcceptor::from(pki.server.clone());
    let (ours, _theirs) = tokio::join!(
        TlsSession::client(pki.client.clone(), name(), c),
        acceptor.accept(s)
    );
    let e = ours.err().expect("no TLS 1.2 session");
    assert!(e.to_string().contains("TLSv1_2"), "{e}");
    assert!(e.to_string().contains("only TLS 1.3"), "{e}");
}

/// Once everything was read and the reader waits, the session holds no
/// record buffer in either direction.
#[tokio::test]
async fn an_idle_session_holds_no_record_buffer() {
    let pki = pki();
    let (mut ours, mut theirs) = our_client(&pki).await;
    let data = pattern(200_000, 9);
    theirs.write_all(&data).await.unwrap();
    ours.write_all(&data).await.unwrap();
    let mut got = vec![0u8; data.len()];
    ours.read_exact(&mut got).await.unwrap();
    theirs.read_exact(&mut got).await.unwrap();
    // Nothing more comes: one look at the socket, then the reader waits.
    let mut cx = Context::from_waker(Waker::noop());
    let mut scratch = [0u8; 16];
    let mut buf = ReadBuf::new(&mut scratch);
    assert!(
        Pin::new(&mut ours)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    );
    assert_eq!(ours.rx.capacity(), 0, "receive buffer given back");
    assert_eq!(ours.tx.out.capacity(), 0, "send buffer given back");
    // The copy loop keeps its buffer after a full read and calls
    // `read_some` with it: that buffer is given back while waiting too.
    let mut kept = vec![0u8; 2048];
    let (mut reader, _writer) = ours.halves();
    {
        let mut read = std::pin::pin!(reader.read_some(&mut kept, 2048));
        assert!(read.as_mut().poll(&mut cx).is_pending());
    }
    assert_eq!(kept.capacity(), 0, "the copy's buffer given back");
}

/// What the copy loop's `Duplex` and `ReadSide` need of the halves: both at
/// once, `Send`, and a `read_some` whose future is `Send`.
#[tokio::test]
async fn the_halves_fit_the_copy_loop() {
    fn send<T: Send>(_: &T) {}
    fn unpin<T: Unpin>(_: &T) {}
    let pki = pki();
    let (mut ours, mut theirs) = our_client(&pki).await;
    send(&ours);
    let (mut r, mut w) = ours.halves();
    send(&r);
    send(&w);
    unpin(&w);
    theirs.write_all(b"ping").await.unwrap();
    theirs.flush().await.unwrap();
    let mut buf = Vec::new();
    let read = r.read_some(&mut buf, 1024);
    send(&read);
    assert_eq!(read.await.unwrap(), 4);
    assert_eq!(&buf[..4], b"ping");
    assert_eq!(buf.len(), 1024, "sized as asked");
    w.write_all(b"pong").await.unwrap();
    w.flush().await.unwrap();
    let mut got = [0u8; 4];
    theirs.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"pong");
}

/// Vectored writes seal their parts into one record (HTTP/2 writes a
/// frame's header and payload as two parts): a tokio-rustls peer reads the
/// parts in order, and a write larger than a record takes a record's
/// worth and leaves the rest to the next.
#[tokio::test]
async fn vectored_writes_seal_their_parts_into_one_record() {
    let pki = pki();
    let (mut ours, mut theirs) = our_client(&pki).await;
    let (head, body, big) = (pattern(9, 1), pattern(1000, 2), pattern(40_000, 3));
    let mut want = Vec::new();
    let written = {
        let (_, mut w) = ours.halves();
        assert!(w.is_write_vectored());
        let n = w
            .write_vectored(&[io::IoSlice::new(&head), io::IoSlice::new(&body)])
            .await
            .unwrap();
        want.extend_from_slice(&head);
        want.extend_from_slice(&body);
        let mut total = 0;
        while total < big.len() {
            let parts = [io::IoSlice::new(&head), io::IoSlice::new(&big[total..])];
            let m = w.write_vectored(&parts).await.unwrap();
            assert!(m <= 16 * 1024, "one record at most: {m}");
            // The head goes first in each record; count what of `big` went.
            want.extend_from_slice(&head[..m.min(head.len())]);
            let from_big = m.saturating_sub(head.len());
            want.extend_from_slice(&big[total..total + from_big]);
            total += from_big;
        }
        w.shutdown().await.unwrap();
        n
    };
    assert_eq!(written, head.len() + body.len());
    let got = read_all(&mut theirs).await.unwrap();
    assert_same(&got, &want, "what the peer read");
}
