//! Moving bytes between the client and the upstream until both sides have
//! closed, with idle and lifetime limits, telling a reset from a close.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    clock::now_ms,
    telemetry::{ByteCounters, CloseReason},
};

/// A direction's buffer starts at this size and doubles each time a read
/// fills it, up to [`MAX_BUFFER`]. On plain TCP it is only held while
/// bytes flow: an idle connection holds none.
const INITIAL_BUFFER: usize = 1024;
const MAX_BUFFER: usize = 16 * 1024;

/// How a proxied connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyEnd {
    /// Both sides closed (FIN each way).
    Closed,
    /// The upstream reset the connection (counts against the endpoint).
    UpstreamReset,
    /// The client reset or an I/O error on the client side.
    ClientError,
    /// No byte either way for the idle timeout.
    Idle,
    /// The connection outlived max_connection_duration.
    MaxDuration,
}

impl CopyEnd {
    /// Stable name for the audit trail.
    pub fn name(self) -> &'static str {
        match self {
            CopyEnd::Closed => "closed",
            CopyEnd::UpstreamReset => "upstream_reset",
            CopyEnd::ClientError => "client_error",
            CopyEnd::Idle => "idle_timeout",
            CopyEnd::MaxDuration => "max_duration",
        }
    }
}

impl From<CopyEnd> for CloseReason {
    fn from(end: CopyEnd) -> CloseReason {
        match end {
            CopyEnd::Closed => CloseReason::Closed,
            CopyEnd::UpstreamReset => CloseReason::UpstreamReset,
            CopyEnd::ClientError => CloseReason::ClientError,
            CopyEnd::Idle => CloseReason::IdleTimeout,
            CopyEnd::MaxDuration => CloseReason::MaxDuration,
        }
    }
}

/// The reading end of one direction: fills a buffer it may allocate
/// lazily and release while the connection is quiet.
pub trait ReadSide: Send {
    /// Whether [`one_way`] may drop the buffer after a short read (the
    /// reader waits for data without one).
    const RELEASE_WHEN_DRAINED: bool;

    /// Reads what is available into `buf` (resized to `size` if empty).
    /// An implementation may leave `buf` empty while it waits, so an idle
    /// connection holds no buffer.
    fn read_some<'a>(
        &'a mut self,
        buf: &'a mut Vec<u8>,
        size: usize,
    ) -> impl Future<Output = std::io::Result<usize>> + Send + 'a;
}

impl ReadSide for tokio::net::tcp::ReadHalf<'_> {
    const RELEASE_WHEN_DRAINED: bool = true;

    async fn read_some(&mut self, buf: &mut Vec<u8>, size: usize) -> std::io::Result<usize> {
        if !buf.is_empty() {
            // Kept after a full read: more may be waiting. Look once; if
            // not, give the buffer back before waiting.
            match self.try_read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => *buf = Vec::new(),
                Err(e) => return Err(e),
            }
        }
        // Wait for data without holding a buffer.
        self.readable().await?;
        buf.resize(size, 0);
        // tokio's read treats a short read as drained and then waits for
        // the next event without another syscall.
        self.read(buf).await
    }
}

/// Any other reader (TLS) keeps its buffer: rustls holds buffers of its
/// own anyway.
pub struct Buffered<R>(R);

impl<R: AsyncRead + Unpin + Send> ReadSide for Buffered<R> {
    const RELEASE_WHEN_DRAINED: bool = false;

    async fn read_some(&mut self, buf: &mut Vec<u8>, size: usize) -> std::io::Result<usize> {
        if buf.is_empty() {
            buf.resize(size, 0);
        }
        self.0.read(buf).await
    }
}

/// A byte stream the proxy can split into halves and reset.
pub trait Duplex {
    /// Read and write halves borrowed from the stream.
    fn halves(&mut self) -> (impl ReadSide + '_, impl AsyncWrite + Unpin + Send + '_);
    /// Makes the next close a reset (RST) rather than a FIN.
    fn reset_on_close(&self);
}

impl Duplex for TcpStream {
    fn halves(&mut self) -> (impl ReadSide + '_, impl AsyncWrite + Unpin + Send + '_) {
        // Borrowed halves: no lock between the two directions.
        self.split()
    }

    fn reset_on_close(&self) {
        let _ = self.set_zero_linger();
    }
}

impl Duplex for tokio_rustls::client::TlsStream<TcpStream> {
    fn halves(&mut self) -> (impl ReadSide + '_, impl AsyncWrite + Unpin + Send + '_) {
        let (r, w) = tokio::io::split(self);
        (Buffered(r), w)
    }

    fn reset_on_close(&self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

impl Duplex for tokio_rustls::server::TlsStream<TcpStream> {
    fn halves(&mut self) -> (impl ReadSide + '_, impl AsyncWrite + Unpin + Send + '_) {
        let (r, w) = tokio::io::split(self);
        (Buffered(r), w)
    }

    fn reset_on_close(&self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

/// Copies both ways; a FIN from one side is passed on as a FIN
/// (half-close). Connections ended by a reset, an idle or lifetime limit
/// are reset on both sides.
pub async fn proxy<C: Duplex, U: Duplex>(
    client: &mut C,
    upstream: &mut U,
    idle: Duration,
    max_duration: Option<Duration>,
    bytes: &ByteCounters,
) -> CopyEnd {
    let up_sent = &bytes.sent;
    let down_sent = &bytes.received;
    let (end, reset) = {
        let (cr, cw) = client.halves();
        let (ur, uw) = upstream.halves();
        let both = async {
            // The first error ends both directions.
            let result = tokio::try_join!(
                async { one_way(cr, uw, up_sent).await.map_err(|e| (true, e)) },
                async { one_way(ur, cw, down_sent).await.map_err(|e| (false, e)) },
            );
            match result {
                Ok(_) => CopyEnd::Closed,
                // Writing to or reading from the upstream failed: it reset.
                Err((true, Side::Write)) | Err((false, Side::Read)) => CopyEnd::UpstreamReset,
                Err(_) => CopyEnd::ClientError,
            }
        };
        let deadline = max_duration.map(|d| now_ms() + d.as_millis() as u64);
        let end = tokio::select! {
            end = both => end,
            end = watchdog(bytes, idle, deadline) => end,
        };
        (end, end != CopyEnd::Closed)
    };
    if reset {
        client.reset_on_close();
        upstream.reset_on_close();
    }
    end
}

/// Which end of a one-way copy failed.
enum Side {
    Read,
    Write,
}

async fn one_way<R: ReadSide>(
    mut from: R,
    mut to: impl AsyncWrite + Unpin,
    sent: &AtomicU64,
) -> Result<(), Side> {
    let mut buf = Vec::new();
    let mut size = INITIAL_BUFFER;
    loop {
        let n = from
            .read_some(&mut buf, size)
            .await
            .map_err(|_| Side::Read)?;
        if n == buf.len() && size < MAX_BUFFER {
            // A full read: more is probably waiting; read bigger next time.
            size *= 2;
        }
        if n == 0 {
            // Pass the half-close on; the other direction goes on.
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(|_| Side::Write)?;
        sent.fetch_add(n as u64, Ordering::Relaxed);
        if R::RELEASE_WHEN_DRAINED && n < buf.len() {
            // Drained: let the buffer go while the connection is quiet.
            buf = Vec::new();
        } else if buf.len() < size {
            buf.resize(size, 0);
        }
    }
}

/// How many looks per idle period the watchdog takes: a connection idle
/// for `idle` is cut within `idle * (1 + 1/IDLE_CHECKS)`.
const IDLE_CHECKS: u64 = 4;

/// Resolves once no byte moved for the idle time, or at `deadline` (in
/// [`now_ms`] terms). It compares the byte counters the copy keeps anyway,
/// so the data path reads no clock; one timer serves both limits, to keep
/// idle connections small.
async fn watchdog(bytes: &ByteCounters, idle: Duration, deadline: Option<u64>) -> CopyEnd {
    let idle_ms = (idle.as_millis() as u64).max(1);
    let step = (idle_ms / IDLE_CHECKS).max(1);
    let moved = || bytes.sent.load(Ordering::Relaxed) + bytes.received.load(Ordering::Relaxed);
    let (mut last, mut quiet_since) = (moved(), now_ms());
    loop {
        let now = now_ms();
        if deadline.is_some_and(|d| now >= d) {
            return CopyEnd::MaxDuration;
        }
        let current = moved();
        if current != last {
            (last, quiet_since) = (current, now);
        } else if now.saturating_sub(quiet_since) >= idle_ms {
            return CopyEnd::Idle;
        }
        let next = deadline.map_or(now + step, |d| d.min(now + step));
        tokio::time::sleep(Duration::from_millis(next.saturating_sub(now).max(1))).await;
    }
}

#[cfg(test)]
mod tests {
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
}
