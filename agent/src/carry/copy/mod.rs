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
    buffers,
    clock::now_ms,
    telemetry::{ByteCounters, CloseReason},
    tls::session::{TlsReadHalf, TlsSession},
};

/// A direction's buffer starts at this size and doubles each time a read
/// fills it, up to [`MAX_BUFFER`]. On plain TCP it is only held while
/// bytes flow: an idle connection holds none.
const INITIAL_BUFFER: usize = buffers::SMALLEST;
const MAX_BUFFER: usize = buffers::LARGEST;

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
                    *buf = buffers::take(size);
                }
                // A buffer kept after a full read looks once: more may be
                // waiting. If not, it is given back before waiting.
                match socket.try_read(buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => buffers::give_back(buf),
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
            *buf = buffers::take(size);
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
    /// How long no byte had moved, so the idle limit goes on counting
    /// where it stood (absent from an older agent's record: 0).
    #[serde(default)]
    pub quiet_ms: u64,
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
    let never = std::future::pending();
    match progress
        .carry(client, upstream, &limits, bytes, never)
        .await
    {
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
    /// Quiet time carried in from a suspension, for the copy to start from.
    carried_quiet_ms: u64,
    /// When a byte last moved, as the watchdog knows it; None until the
    /// copy starts.
    quiet: Option<Quiet>,
}

impl From<Suspended> for Progress {
    fn from(from: Suspended) -> Progress {
        Progress {
            up: Way::from(from.up),
            down: Way::from(from.down),
            carried_quiet_ms: from.quiet_ms,
            quiet: None,
        }
    }
}

impl Progress {
    /// [`proxy`], starting from where this progress stands, and
    /// suspending when `moving` resolves: both directions stop where
    /// nothing is half done (a read not started, or a write of which the
    /// bytes left stay here), so no byte is lost or sent twice.
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
        moving: impl Future<Output = ()> + Send + 'a,
    ) -> impl Future<Output = Carried> + 'a {
        async move {
            let stopped = {
                let (cr, cw) = client.halves();
                let (ur, uw) = upstream.halves();
                let (up, down) = (&mut self.up, &mut self.down);
                let carried = self.carried_quiet_ms;
                let quiet = self.quiet.get_or_insert_with(|| Quiet {
                    since: now_ms().saturating_sub(carried),
                    seen: bytes_moved(bytes),
                });
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
                let deadline = limits.lifetime.map(|d| now_ms() + d.as_millis() as u64);
                tokio::select! {
                    biased;
                    () = moving => None,
                    end = both => Some(end),
                    end = watchdog(bytes, limits.idle, deadline, quiet) => Some(end),
                }
            };
            let Some(end) = stopped else {
                // Bytes that moved since the watchdog's last look count.
                if let Some(quiet) = &mut self.quiet
                    && bytes_moved(bytes) != quiet.seen
                {
                    *quiet = Quiet {
                        since: now_ms(),
                        seen: bytes_moved(bytes),
                    };
                }
                return Carried::Suspended;
            };
            if end != CopyEnd::Closed {
                client.reset_on_close();
                upstream.reset_on_close();
            }
            Carried::Ended(end)
        }
    }

    /// Bytes a paused tunnel stream gave after the copy stopped, to be
    /// written first when it goes on: read from the client (`up`) or from
    /// the upstream.
    pub fn add_read(&mut self, up: bool, bytes: &[u8]) {
        let way = if up { &mut self.up } else { &mut self.down };
        way.buf.truncate(way.end);
        way.buf.extend_from_slice(bytes);
        way.end = way.buf.len();
    }

    /// Where a suspended copy stood, to carry it on from.
    pub fn into_suspended(self) -> Suspended {
        Suspended {
            up: self.up.into_state(),
            down: self.down.into_state(),
            quiet_ms: self.quiet.map_or(self.carried_quiet_ms, |quiet| {
                now_ms().saturating_sub(quiet.since)
            }),
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

impl Drop for Way {
    /// A connection's last buffers serve the next connections.
    fn drop(&mut self) {
        buffers::give_back(&mut self.buf);
    }
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
            let mut buf = std::mem::take(&mut self.buf);
            buf.truncate(self.end);
            buf.drain(..self.start);
            buf
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
                buffers::give_back(&mut way.buf);
            } else if way.buf.len() < size {
                // Nothing in it is pending: a bigger one replaces it.
                buffers::give_back(&mut way.buf);
                way.buf = buffers::take(size);
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

mod watchdog;

#[cfg(test)]
use watchdog::IDLE_CHECKS;
use watchdog::{Quiet, bytes_moved, watchdog};

#[cfg(test)]
mod tests;
