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

use crate::{clock::now_ms, telemetry::ByteCounters};

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
