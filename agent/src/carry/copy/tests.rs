//! The copy over in-memory and loopback streams: half-close, reset, idle
//! and lifetime limits, and a suspension that loses no byte.

use std::sync::atomic::AtomicBool;

use tokio::{
    io::DuplexStream,
    net::TcpListener,
    time::{Instant, sleep, sleep_until},
};

use super::*;

/// The proxy's end of an in-memory stream, remembering whether the
/// copy asked for a reset.
struct Recorded {
    stream: DuplexStream,
    reset: AtomicBool,
}

impl Duplex for Recorded {
    fn halves(&mut self) -> (impl ReadSide + '_, impl AsyncWrite + Unpin + Send + '_) {
        let (r, w) = tokio::io::split(&mut self.stream);
        (Buffered(r), w)
    }

    fn reset_on_close(&self) {
        self.reset.store(true, Ordering::Relaxed);
    }
}

/// An in-memory connection: the application's end and the proxy's.
fn duplex() -> (DuplexStream, Recorded) {
    let (app, proxy) = tokio::io::duplex(4096);
    let recorded = Recorded {
        stream: proxy,
        reset: AtomicBool::new(false),
    };
    (app, recorded)
}

/// A loopback TCP connection: (the connecting end, the accepted end).
async fn tcp() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

/// `len` bytes no window of which repeats within 251 bytes, so a
/// lost, doubled or reordered chunk shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

async fn read_all(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut all = Vec::new();
    r.read_to_end(&mut all).await?;
    Ok(all)
}

const IDLE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn bytes_both_ways_arrive_intact_and_are_counted() {
    let (mut client_app, mut client) = duplex();
    let (mut upstream_app, mut upstream) = duplex();
    // More than the largest buffer each way, so buffers grow and wrap.
    let request = pattern(100_000, 0x5a);
    let response = pattern(70_000, 0xa5);
    let bytes = ByteCounters::default();
    let client_side = async {
        client_app.write_all(&request).await.unwrap();
        client_app.shutdown().await.unwrap();
        read_all(&mut client_app).await.unwrap()
    };
    let upstream_side = async {
        let (mut r, mut w) = tokio::io::split(&mut upstream_app);
        let (got, ()) = tokio::join!(read_all(&mut r), async {
            w.write_all(&response).await.unwrap();
            w.shutdown().await.unwrap();
        });
        got.unwrap()
    };
    let (end, at_client, at_upstream) = tokio::join!(
        proxy(&mut client, &mut upstream, IDLE, None, &bytes),
        client_side,
        upstream_side
    );
    assert_eq!(end, CopyEnd::Closed);
    assert!(at_upstream == request, "the request arrives intact");
    assert!(at_client == response, "the response arrives intact");
    assert_eq!(bytes.sent.load(Ordering::Relaxed), 100_000);
    assert_eq!(bytes.received.load(Ordering::Relaxed), 70_000);
    assert!(!client.reset.load(Ordering::Relaxed), "a close is no reset");
    assert!(!upstream.reset.load(Ordering::Relaxed));
}

#[tokio::test]
async fn a_half_close_passes_on_and_the_other_way_goes_on_until_it_closes() {
    let (mut client_app, mut client) = tcp().await;
    let (mut upstream, mut upstream_app) = tcp().await;
    let bytes = ByteCounters::default();
    let apps = async {
        client_app.write_all(b"request").await.unwrap();
        client_app.shutdown().await.unwrap();
        // The upstream sees the request, then the client's FIN...
        assert_eq!(read_all(&mut upstream_app).await.unwrap(), b"request");
        // ...and still answers, in two writes, then closes.
        upstream_app.write_all(b"late ").await.unwrap();
        upstream_app.write_all(b"answer").await.unwrap();
        upstream_app.shutdown().await.unwrap();
        // A FIN, not a reset, after the whole answer.
        assert_eq!(read_all(&mut client_app).await.unwrap(), b"late answer");
    };
    let (end, ()) = tokio::join!(proxy(&mut client, &mut upstream, IDLE, None, &bytes), apps);
    assert_eq!(end, CopyEnd::Closed);
    assert_eq!(bytes.sent.load(Ordering::Relaxed), 7);
    assert_eq!(bytes.received.load(Ordering::Relaxed), 11);
}

/// A proxied TCP connection whose `reset_by_upstream` (or else the
/// client's) application resets it after one exchange: how the copy
/// ended, and what the other application then reads.
async fn reset_by(upstream_resets: bool) -> (CopyEnd, std::io::Result<Vec<u8>>) {
    let (mut client_app, mut client) = tcp().await;
    let (mut upstream, mut upstream_app) = tcp().await;
    let bytes = ByteCounters::default();
    let apps = async {
        client_app.write_all(b"ping").await.unwrap();
        let mut ping = [0u8; 4];
        upstream_app.read_exact(&mut ping).await.unwrap();
        let (resetting, other) = if upstream_resets {
            (upstream_app, client_app)
        } else {
            (client_app, upstream_app)
        };
        resetting.set_zero_linger().unwrap();
        drop(resetting);
        other
    };
    let (end, mut other) =
        tokio::join!(proxy(&mut client, &mut upstream, IDLE, None, &bytes), apps);
    assert_eq!(bytes.sent.load(Ordering::Relaxed), 4);
    // The caller closes both of the proxy's sockets after the copy.
    drop((client, upstream));
    (end, read_all(&mut other).await)
}

#[tokio::test]
async fn a_reset_ends_the_copy_named_by_its_side_and_resets_the_other_side() {
    let (end, client_reads) = reset_by(true).await;
    assert_eq!(end, CopyEnd::UpstreamReset);
    let e = client_reads.expect_err("the client gets a reset, not a FIN");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);

    let (end, upstream_reads) = reset_by(false).await;
    assert_eq!(end, CopyEnd::ClientError);
    let e = upstream_reads.expect_err("the upstream gets a reset, not a FIN");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_cut_one_idle_period_after_its_last_byte() {
    let (mut client_app, mut client) = duplex();
    let (mut upstream_app, mut upstream) = duplex();
    let bytes = ByteCounters::default();
    let started = Instant::now();
    let last_byte_at = started + IDLE - Duration::from_secs(1);
    let apps = async {
        // Quiet for less than the idle time: not cut.
        sleep_until(last_byte_at).await;
        client_app.write_all(b"x").await.unwrap();
        let mut x = [0u8; 1];
        upstream_app.read_exact(&mut x).await.unwrap();
        // Both ends stay open: only the idle limit may end this.
        std::future::pending::<()>().await
    };
    let end = tokio::select! {
        end = proxy(&mut client, &mut upstream, IDLE, None, &bytes) => end,
        () = apps => unreachable!("the applications never finish"),
    };
    assert_eq!(end, CopyEnd::Idle);
    let quiet = last_byte_at.elapsed();
    assert!(
        quiet >= IDLE && quiet <= IDLE + IDLE / IDLE_CHECKS as u32,
        "cut after {quiet:?} of quiet"
    );
    assert_eq!(bytes.sent.load(Ordering::Relaxed), 1);
    assert!(client.reset.load(Ordering::Relaxed), "an idle cut resets");
    assert!(upstream.reset.load(Ordering::Relaxed));
}

#[tokio::test(start_paused = true)]
async fn a_busy_connection_is_cut_at_its_lifetime_limit() {
    let (mut client_app, mut client) = duplex();
    let (mut upstream_app, mut upstream) = duplex();
    let bytes = ByteCounters::default();
    let lifetime = Duration::from_secs(30);
    let started = Instant::now();
    let busy = async {
        // A byte each way every 2 s: never idle for IDLE.
        loop {
            client_app.write_all(b"q").await.unwrap();
            let mut b = [0u8; 1];
            upstream_app.read_exact(&mut b).await.unwrap();
            upstream_app.write_all(b"a").await.unwrap();
            client_app.read_exact(&mut b).await.unwrap();
            sleep(Duration::from_secs(2)).await;
        }
    };
    let end = tokio::select! {
        end = proxy(&mut client, &mut upstream, IDLE, Some(lifetime), &bytes) => end,
        () = busy => unreachable!("the applications never finish"),
    };
    assert_eq!(end, CopyEnd::MaxDuration);
    let lived = started.elapsed();
    assert!(
        lived >= lifetime && lived <= lifetime + Duration::from_millis(1),
        "cut after {lived:?}"
    );
    // One exchange at 0 s, 2 s, ... 28 s, the next due at the cut.
    let sent = bytes.sent.load(Ordering::Relaxed);
    assert!((15..=16).contains(&sent), "{sent} bytes sent");
    assert!(
        client.reset.load(Ordering::Relaxed),
        "a lifetime cut resets"
    );
    assert!(upstream.reset.load(Ordering::Relaxed));
}

/// Shrinks a socket's buffer (the kernel keeps at least a few KiB).
fn small_buffers(stream: &TcpStream, which: libc::c_int) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 4096;
    // SAFETY: setsockopt on a valid socket with an int option.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            which,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// A copy suspended again and again (its state through JSON each time, as
/// it travels to the next agent) and resumed on the same sockets delivers
/// every byte once and in order, including bytes read but not yet written
/// at the suspension and a half-close that came before one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_copy_resumes_where_it_stopped_with_no_byte_lost_or_doubled() {
    let (mut client_app, mut client) = tcp().await;
    let (mut upstream, mut upstream_app) = tcp().await;
    // Up: small, then the client's FIN. Down: large, read slowly through
    // small socket buffers, so that writes back up and suspensions find
    // bytes not yet written.
    small_buffers(&client_app, libc::SO_RCVBUF);
    small_buffers(&client, libc::SO_SNDBUF);
    let request = pattern(50_000, 0x11);
    let response = pattern(128 << 10, 0x22);
    let (expected_request, expected_response) = (request.clone(), response.clone());
    let apps = tokio::spawn(async move {
        let client_side = async {
            client_app.write_all(&request).await.unwrap();
            client_app.shutdown().await.unwrap();
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 4 * 1024];
            loop {
                let n = client_app.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break got;
                }
                got.extend_from_slice(&chunk[..n]);
                sleep(Duration::from_millis(1)).await;
            }
        };
        let upstream_side = async {
            let (mut r, mut w) = upstream_app.split();
            let (got, ()) = tokio::join!(read_all(&mut r), async {
                w.write_all(&response).await.unwrap();
                w.shutdown().await.unwrap();
            });
            got.unwrap()
        };
        tokio::join!(client_side, upstream_side)
    });
    let bytes = ByteCounters::default();
    let limits = Limits {
        idle: IDLE,
        lifetime: None,
    };
    let mut state = Suspended::default();
    let (mut suspensions, mut with_pending, mut after_fin) = (0, 0, 0);
    let end = loop {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        // A thread of its own: the signal comes from outside the runtime,
        // as the next agent's request does.
        let trigger = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(2));
            let _ = tx.send(());
        });
        let mut progress = Progress::from(state);
        let carried = progress
            .carry(&mut client, &mut upstream, &limits, &bytes, told(&mut rx))
            .await;
        trigger.join().unwrap();
        match carried {
            Carried::Ended(end) => break end,
            Carried::Suspended => {
                let s = progress.into_suspended();
                suspensions += 1;
                with_pending += usize::from(!s.down.pending.is_empty() || !s.up.pending.is_empty());
                after_fin += usize::from(s.up.finished);
                let json = serde_json::to_string(&s).unwrap();
                state = serde_json::from_str(&json).unwrap();
            }
        }
    };
    let (at_client, at_upstream) = apps.await.unwrap();
    assert_eq!(end, CopyEnd::Closed);
    assert!(
        at_upstream == expected_request,
        "the request arrives whole, once, in order"
    );
    assert!(
        at_client == expected_response,
        "the response arrives whole, once, in order"
    );
    assert_eq!(bytes.sent.load(Ordering::Relaxed), 50_000);
    assert_eq!(bytes.received.load(Ordering::Relaxed), 128 << 10);
    assert!(suspensions >= 3, "{suspensions} suspensions");
    assert!(with_pending >= 1, "no suspension found bytes in hand");
    assert!(after_fin >= 1, "no suspension came after the client's FIN");
}

/// A move signal whose sender goes away without a word is no signal.
#[tokio::test]
async fn a_dropped_move_signal_does_not_suspend() {
    let (mut client_app, mut client) = duplex();
    let (mut upstream_app, mut upstream) = duplex();
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    drop(tx);
    let bytes = ByteCounters::default();
    let limits = Limits {
        idle: IDLE,
        lifetime: None,
    };
    let apps = async {
        client_app.write_all(b"ping").await.unwrap();
        client_app.shutdown().await.unwrap();
        let mut got = [0u8; 4];
        upstream_app.read_exact(&mut got).await.unwrap();
        upstream_app.shutdown().await.unwrap();
        got
    };
    let mut progress = Progress::default();
    let (carried, got) = tokio::join!(
        progress.carry(&mut client, &mut upstream, &limits, &bytes, told(&mut rx)),
        apps
    );
    assert_eq!(&got, b"ping");
    assert!(
        matches!(carried, Carried::Ended(CopyEnd::Closed)),
        "{carried:?}"
    );
}

/// A quiet connection (its buffers given back after a drained read)
/// suspends with nothing in hand and goes on after a resume.
#[tokio::test]
async fn a_quiet_connection_suspends_with_nothing_in_hand_and_goes_on() {
    let (mut client_app, mut client) = tcp().await;
    let (mut upstream, mut upstream_app) = tcp().await;
    let bytes = ByteCounters::default();
    let limits = Limits {
        idle: IDLE,
        lifetime: None,
    };
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let first = async {
        client_app.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        upstream_app.read_exact(&mut got).await.unwrap();
        upstream_app.write_all(b"hi").await.unwrap();
        let mut back = [0u8; 2];
        client_app.read_exact(&mut back).await.unwrap();
        tx.send(()).unwrap();
        (got, back)
    };
    let mut progress = Progress::default();
    let (carried, (got, back)) = tokio::join!(
        progress.carry(&mut client, &mut upstream, &limits, &bytes, told(&mut rx)),
        first
    );
    assert_eq!((&got, &back), (b"hello", b"hi"));
    assert_eq!(carried, Carried::Suspended);
    let state = progress.into_suspended();
    let nothing = WayState::default();
    assert_eq!(
        (&state.up, &state.down),
        (&nothing, &nothing),
        "nothing in hand, nothing closed"
    );
    let second = async {
        client_app.write_all(b"again").await.unwrap();
        client_app.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream_app.read_to_end(&mut got).await.unwrap();
        upstream_app.shutdown().await.unwrap();
        got
    };
    let mut progress = Progress::from(state);
    let (carried, got) = tokio::join!(
        progress.carry(
            &mut client,
            &mut upstream,
            &limits,
            &bytes,
            std::future::pending()
        ),
        second
    );
    assert_eq!(got, b"again");
    assert!(
        matches!(carried, Carried::Ended(CopyEnd::Closed)),
        "{carried:?}"
    );
    assert_eq!(bytes.sent.load(Ordering::Relaxed), 10);
}

/// The idle limit counts the quiet before a suspension: a connection quiet
/// for 6 s of a 10 s limit when it moves is cut within the remaining 4 s
/// (give or take the watchdog's step, by which it may know the quiet late,
/// never early) after it goes on, not a whole idle period later.
#[tokio::test(start_paused = true)]
async fn the_idle_limit_counts_the_quiet_before_a_suspension() {
    let (mut client_app, mut client) = duplex();
    let (mut upstream_app, mut upstream) = duplex();
    let bytes = ByteCounters::default();
    let limits = Limits {
        idle: IDLE,
        lifetime: None,
    };
    let step = IDLE / IDLE_CHECKS as u32;
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let first = async {
        client_app.write_all(b"x").await.unwrap();
        let mut x = [0u8; 1];
        upstream_app.read_exact(&mut x).await.unwrap();
        sleep(Duration::from_secs(6)).await;
        tx.send(()).unwrap();
    };
    let mut progress = Progress::default();
    let (carried, ()) = tokio::join!(
        progress.carry(&mut client, &mut upstream, &limits, &bytes, told(&mut rx)),
        first
    );
    assert_eq!(carried, Carried::Suspended);
    let state = progress.into_suspended();
    let quiet = Duration::from_millis(state.quiet_ms);
    assert!(
        quiet <= Duration::from_secs(6) && quiet >= Duration::from_secs(6) - step,
        "quiet for {quiet:?}"
    );
    let resumed = Instant::now();
    let mut progress = Progress::from(state);
    let carried = progress
        .carry(
            &mut client,
            &mut upstream,
            &limits,
            &bytes,
            std::future::pending(),
        )
        .await;
    assert_eq!(carried, Carried::Ended(CopyEnd::Idle));
    let after = resumed.elapsed();
    assert!(
        after >= IDLE - quiet && after <= IDLE - quiet + step,
        "cut {after:?} after the resume, {quiet:?} quiet before it"
    );
    drop((client_app, upstream_app));
}

/// Resolves when `rx` is told to move; never if its sender goes away.
async fn told(rx: &mut tokio::sync::oneshot::Receiver<()>) {
    if rx.await.is_ok() {
        return;
    }
    std::future::pending().await
}
