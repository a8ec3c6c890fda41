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
    tls::session::{TlsReadHalf, TlsSession},
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

    // A poll function rather than `readable().await`: it waits on the
    // socket's own read waker, so the future holds no waiter of its own
    // (every connection's copy has two of these).
    fn read_some<'a>(
        &'a mut self,
        buf: &'a mut Vec<u8>,
        size: usize,
    ) -> impl Future<Output = std::io::Result<usize>> + Send + 'a {
        let this: &'a Self = self;
        let socket: &'a TcpStream = this.as_ref();
        std::future::poll_fn(move |cx| {
            loop {
                if buf.is_empty() {
                    // Wait for data without holding a buffer.
                    std::task::ready!(socket.poll_read_ready(cx))?;
                    buf.resize(size, 0);
                }
                // A buffer kept after a full read looks once: more may be
                // waiting. If not, it is given back before waiting.
                match socket.try_read(buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => *buf = Vec::new(),
                    done => return std::task::Poll::Ready(done),
                }
            }
        })
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

impl ReadSide for TlsReadHalf<'_> {
    // The session holds no record buffer while it waits either.
    const RELEASE_WHEN_DRAINED: bool = true;

    async fn read_some(&mut self, buf: &mut Vec<u8>, size: usize) -> std::io::Result<usize> {
        TlsReadHalf::read_some(self, buf, size).await
    }
}

impl Duplex for TlsSession {
    fn halves(&mut self) -> (impl ReadSide + '_, impl AsyncWrite + Unpin + Send + '_) {
        TlsSession::halves(self)
    }

    fn reset_on_close(&self) {
        let _ = self.get_ref().set_zero_linger();
    }
}

/// Where one direction stood when its copy was suspended: bytes read from
/// one side and not yet written to the other, and whether the reading side
/// had closed (its FIN already passed on). A copy resumed from it, in this
/// process or the next agent's, writes the bytes first and goes on.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WayState {
    pub pending: Vec<u8>,
    pub finished: bool,
}

/// Both directions of a suspended copy: client to upstream, and back.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Suspended {
    pub up: WayState,
    pub down: WayState,
}

/// How a copy stopped: ended, or suspended where nothing was half done
/// (its [`Progress`] says where it stood).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    Ended(CopyEnd),
    Suspended,
}

/// The limits a copy runs under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// No byte either way for this long ends the connection.
    pub idle: Duration,
    /// The connection's remaining lifetime, if it has a limit.
    pub lifetime: Option<Duration>,
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
    let limits = Limits {
        idle,
        lifetime: max_duration,
    };
    let mut progress = Progress::default();
    match progress.carry(client, upstream, &limits, bytes, None).await {
        Carried::Ended(end) => end,
        Carried::Suspended => unreachable!("a copy without a move signal is never suspended"),
    }
}

/// Where a copy stands, both ways. It lives outside the copy's future: a
/// suspension drops the future, and every read or write that completed is
/// recorded here.
#[derive(Debug, Default)]
pub struct Progress {
    up: Way,
    down: Way,
}

impl From<Suspended> for Progress {
    fn from(from: Suspended) -> Progress {
        Progress {
            up: Way::from(from.up),
            down: Way::from(from.down),
        }
    }
}

impl Progress {
    /// [`proxy`], starting from where this progress stands, and
    /// suspending when `moving` fires: both directions stop where nothing
    /// is half done (a read not started, or a write of which the bytes
    /// left stay here), so no byte is lost or sent twice. A `moving` whose
    /// sender went away without a word never fires.
    // Not an `async fn`: that would keep a second copy of every argument
    // in the future (rustc does not share their space), and this future is
    // every connection's.
    #[expect(clippy::manual_async_fn, reason = "see above")]
    pub fn carry<'a, C: Duplex, U: Duplex>(
        &'a mut self,
        client: &'a mut C,
        upstream: &'a mut U,
        limits: &'a Limits,
        bytes: &'a ByteCounters,
        moving: Option<&'a mut tokio::sync::oneshot::Receiver<()>>,
    ) -> impl Future<Output = Carried> + 'a {
        async move {
            let stopped = {
                let (cr, cw) = client.halves();
                let (ur, uw) = upstream.halves();
                let (up, down) = (&mut self.up, &mut self.down);
                let both = async {
                    // The first error ends both directions.
                    let result = tokio::try_join!(
                        async {
                            one_way(cr, uw, &bytes.sent, up)
                                .await
                                .map_err(|e| (true, e))
                        },
                        async {
                            one_way(ur, cw, &bytes.received, down)
                                .await
                                .map_err(|e| (false, e))
                        },
                    );
                    match result {
                        Ok(_) => CopyEnd::Closed,
                        // Writing to or reading from the upstream failed:
                        // it reset.
                        Err((true, Side::Write)) | Err((false, Side::Read)) => {
                            CopyEnd::UpstreamReset
                        }
                        Err(_) => CopyEnd::ClientError,
                    }
                };
                let moved = async {
                    if let Some(rx) = moving
                        && rx.await.is_ok()
                    {
                        return;
                    }
                    std::future::pending::<()>().await
                };
                let deadline = limits.lifetime.map(|d| now_ms() + d.as_millis() as u64);
                tokio::select! {
                    biased;
                    () = moved => None,
                    end = both => Some(end),
                    end = watchdog(bytes, limits.idle, deadline) => Some(end),
                }
            };
            let Some(end) = stopped else {
                return Carried::Suspended;
            };
            if end != CopyEnd::Closed {
                client.reset_on_close();
                upstream.reset_on_close();
            }
            Carried::Ended(end)
        }
    }

    /// Where a suspended copy stood, to carry it on from.
    pub fn into_suspended(self) -> Suspended {
        Suspended {
            up: self.up.into_state(),
            down: self.down.into_state(),
        }
    }
}

/// One direction's progress.
#[derive(Debug, Default)]
struct Way {
    buf: Vec<u8>,
    /// `buf[start..end]` was read and not yet written.
    start: usize,
    end: usize,
    /// EOF was read and passed on.
    finished: bool,
}

impl From<WayState> for Way {
    fn from(state: WayState) -> Way {
        let end = state.pending.len();
        Way {
            buf: state.pending,
            start: 0,
            end,
            finished: state.finished,
        }
    }
}

impl Way {
    fn into_state(mut self) -> WayState {
        let pending = if self.start < self.end {
            self.buf.truncate(self.end);
            self.buf.drain(..self.start);
            self.buf
        } else {
            Vec::new()
        };
        WayState {
            pending,
            finished: self.finished,
        }
    }
}

/// Which end of a one-way copy failed.
enum Side {
    Read,
    Write,
}

// Not an `async fn`, as [`Progress::carry`].
#[expect(clippy::manual_async_fn, reason = "see above")]
fn one_way<'a, R: ReadSide + 'a>(
    mut from: R,
    mut to: impl AsyncWrite + Unpin + 'a,
    sent: &'a AtomicU64,
    way: &'a mut Way,
) -> impl Future<Output = Result<(), Side>> + 'a {
    async move {
        let mut size = INITIAL_BUFFER;
        // Whether the last read left the socket drained.
        let mut drained = false;
        while !way.finished {
            // Write by parts, each recorded: a suspension between two parts
            // leaves exactly the bytes not yet written.
            while way.start < way.end {
                let n = to
                    .write(&way.buf[way.start..way.end])
                    .await
                    .map_err(|_| Side::Write)?;
                if n == 0 {
                    return Err(Side::Write);
                }
                way.start += n;
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            // A TLS writer may hold a sealed record the socket had no room
            // for; on TCP this is nothing.
            to.flush().await.map_err(|_| Side::Write)?;
            // All written: nothing in hand, whatever becomes of the buffer.
            (way.start, way.end) = (0, 0);
            if R::RELEASE_WHEN_DRAINED && drained {
                // Let the buffer go while the connection is quiet.
                way.buf = Vec::new();
            } else if way.buf.len() < size {
                way.buf.resize(size, 0);
            }
            let n = from
                .read_some(&mut way.buf, size)
                .await
                .map_err(|_| Side::Read)?;
            if n == way.buf.len() && size < MAX_BUFFER {
                // A full read: more is probably waiting; read bigger next time.
                size *= 2;
            }
            drained = n < way.buf.len();
            (way.start, way.end) = (0, n);
            if n == 0 {
                // Pass the half-close on; the other direction goes on.
                let _ = to.shutdown().await;
                way.finished = true;
            }
        }
        Ok(())
    }
}

/// How many looks per idle period the watchdog takes: a connection idle
/// for `idle` is cut within `idle * (1 + 1/IDLE_CHECKS)`.
const IDLE_CHECKS: u64 = 4;

/// Resolves once no byte moved for the idle time, or at `deadline` (in
/// [`now_ms`] terms). It compares the byte counters the copy keeps anyway,
/// so the data path reads no clock; one timer serves both limits, to keep
/// idle connections small.
// Not an `async fn`, as [`Progress::carry`].
#[expect(clippy::manual_async_fn, reason = "see above")]
fn watchdog(
    bytes: &ByteCounters,
    idle: Duration,
    deadline: Option<u64>,
) -> impl Future<Output = CopyEnd> + '_ {
    async move {
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
}

#[cfg(test)]
mod tests;
