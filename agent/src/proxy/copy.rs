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

use crate::resilience::clock::now_ms;

/// A direction's buffer starts small, so an idle connection stays cheap,
/// and doubles each time a read fills it, up to [`MAX_BUFFER`].
const INITIAL_BUFFER: usize = 512;
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

/// Bytes moved each way, readable while the connection lives.
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// Client to upstream.
    pub sent: AtomicU64,
    /// Upstream to client.
    pub received: AtomicU64,
}

/// A byte stream the proxy can split into halves and reset.
pub trait Duplex {
    /// Read and write halves borrowed from the stream.
    fn halves(
        &mut self,
    ) -> (
        impl AsyncRead + Unpin + Send + '_,
        impl AsyncWrite + Unpin + Send + '_,
    );
    /// Makes the next close a reset (RST) rather than a FIN.
    fn reset_on_close(&self);
}

impl Duplex for TcpStream {
    fn halves(
        &mut self,
    ) -> (
        impl AsyncRead + Unpin + Send + '_,
        impl AsyncWrite + Unpin + Send + '_,
    ) {
        // Borrowed halves: no lock between the two directions.
        self.split()
    }

    fn reset_on_close(&self) {
        let _ = self.set_zero_linger();
    }
}

impl Duplex for tokio_rustls::client::TlsStream<TcpStream> {
    fn halves(
        &mut self,
    ) -> (
        impl AsyncRead + Unpin + Send + '_,
        impl AsyncWrite + Unpin + Send + '_,
    ) {
        tokio::io::split(self)
    }

    fn reset_on_close(&self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

impl Duplex for tokio_rustls::server::TlsStream<TcpStream> {
    fn halves(
        &mut self,
    ) -> (
        impl AsyncRead + Unpin + Send + '_,
        impl AsyncWrite + Unpin + Send + '_,
    ) {
        tokio::io::split(self)
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
    let last_activity = AtomicU64::new(now_ms());
    let up_sent = &bytes.sent;
    let down_sent = &bytes.received;
    let (end, reset) = {
        let (cr, cw) = client.halves();
        let (ur, uw) = upstream.halves();
        let both = async {
            // The first error ends both directions.
            let result = tokio::try_join!(
                async {
                    one_way(cr, uw, &last_activity, up_sent)
                        .await
                        .map_err(|e| (true, e))
                },
                async {
                    one_way(ur, cw, &last_activity, down_sent)
                        .await
                        .map_err(|e| (false, e))
                },
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
            end = watchdog(&last_activity, idle, deadline) => end,
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

async fn one_way(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    activity: &AtomicU64,
    sent: &AtomicU64,
) -> Result<(), Side> {
    let mut buf = vec![0u8; INITIAL_BUFFER];
    loop {
        let n = from.read(&mut buf).await.map_err(|_| Side::Read)?;
        if n == buf.len() && buf.len() < MAX_BUFFER {
            // A full read: more is probably waiting; read bigger next time.
            let grown = buf.len() * 2;
            buf.resize(grown, 0);
        }
        if n == 0 {
            // Pass the half-close on; the other direction goes on.
            let _ = to.shutdown().await;
            return Ok(());
        }
        activity.store(now_ms(), Ordering::Relaxed);
        to.write_all(&buf[..n]).await.map_err(|_| Side::Write)?;
        sent.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Resolves once nothing moved for `idle`, or at `deadline` (in
/// [`now_ms`] terms). One timer serves both, to keep idle connections small.
async fn watchdog(activity: &AtomicU64, idle: Duration, deadline: Option<u64>) -> CopyEnd {
    let idle_ms = idle.as_millis() as u64;
    loop {
        let now = now_ms();
        if deadline.is_some_and(|d| now >= d) {
            return CopyEnd::MaxDuration;
        }
        let idle_due = activity.load(Ordering::Relaxed) + idle_ms;
        if now >= idle_due {
            return CopyEnd::Idle;
        }
        let next = deadline.map_or(idle_due, |d| d.min(idle_due));
        tokio::time::sleep(Duration::from_millis(next - now)).await;
    }
}
