//! Tunnels between node agents: application connections carried as HTTP/2
//! CONNECT streams inside a few long-lived connections (Istio's HBONE), so
//! a TLS handshake is paid per pool connection, not per application
//! connection.
//!
//! - [`TunnelClient`]: one HTTP/2 connection over any byte stream (a
//!   `TlsSession` in production); [`TunnelClient::open`] sends
//!   `CONNECT ip:port` and gives back a [`TunnelStream`] once the peer
//!   answers 200.
//! - [`serve`]: the peer's side; every CONNECT goes to a handler as an
//!   [`Incoming`], which accepts it (200) or refuses it with a status.
//! - [`TunnelStream`]: one application connection; reads release flow
//!   control as bytes are consumed, writes wait for window, a shutdown is
//!   END_STREAM (a half-close), a reset is RST_STREAM. It is a
//!   [`crate::carry::copy::Duplex`], so the copy loop carries it as it
//!   carries a socket.
//! - [`Pool`]: connections per opaque key, at most so many streams on
//!   each (and never more than the peer's SETTINGS_MAX_CONCURRENT_STREAMS),
//!   a new connection when all are full, none that got GOAWAY or closed.
//!
//! TLS and identities are the caller's: the agent's dialler and inbound
//! handler are in `proxy::tunnels` and `proxy::inbound::tunnel`.

mod client;
mod coalesce;
pub mod control;
mod moves;
mod pool;
mod server;
mod stream;
#[cfg(test)]
mod tests;

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use h2::{Ping, PingPong, Reason};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use client::TunnelClient;
pub use moves::Moves;
pub use pool::{Dial, PeerUsage, Pool, PoolConfig};
pub use server::{Incoming, serve};
pub use stream::{Paused, Quiesce, TunnelReadHalf, TunnelStream, TunnelWriteHalf};

/// The port HBONE listens on (Sluice's inbound port by default).
pub const HBONE_PORT: u16 = 15008;

/// The HTTP/2 settings of one tunnel connection, either end.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// Bytes the peer may send on one stream before we read them
    /// (SETTINGS_INITIAL_WINDOW_SIZE): see [`STREAM_WINDOW`].
    pub stream_window: u32,
    /// Bytes the peer may send on the whole connection before we read
    /// them: a multiple of the stream window, so that a few streams whose
    /// readers stall cannot stop the others. It bounds what one peer
    /// connection can make us buffer.
    pub connection_window: u32,
    /// The largest DATA frame: small frames let a short message overtake
    /// a bulk transfer on the same connection.
    pub max_frame_size: u32,
    /// Bytes one stream may have queued in HTTP/2 and not yet written to
    /// the connection; a write waits beyond that.
    pub max_send_buffer: usize,
    /// Streams the peer may open to us at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// The largest header block we take (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_list_size: u32,
    /// PINGs that find a dead peer: its streams fail and the pool drops
    /// the connection. None sends none.
    pub keepalive: Option<Keepalive>,
}

pub use crate::config::tunnels::STREAM_WINDOW;

/// How often to PING a quiet peer, and how long to wait for the answer.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for TunnelConfig {
    fn default() -> TunnelConfig {
        TunnelConfig {
            stream_window: STREAM_WINDOW,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 16 * 1024,
            max_send_buffer: 256 * 1024,
            max_concurrent_streams: 100,
            max_header_list_size: 16 * 1024,
            keepalive: Some(Keepalive {
                interval: Duration::from_secs(10),
                timeout: Duration::from_secs(20),
            }),
        }
    }
}

/// The settings `mesh.tunnels` gives, the rest the defaults.
impl From<&crate::config::tunnels::TunnelsConfig> for TunnelConfig {
    fn from(settings: &crate::config::tunnels::TunnelsConfig) -> TunnelConfig {
        TunnelConfig {
            stream_window: settings.stream_window,
            ..TunnelConfig::default()
        }
    }
}

/// Why a tunnel or one of its streams could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("dialling the peer agent failed: {0}")]
    Dial(#[source] io::Error),
    #[error("HTTP/2 handshake with the peer agent failed: {0}")]
    Handshake(#[source] h2::Error),
    #[error("the tunnel connection takes no new stream (GOAWAY or closed): {0}")]
    Unavailable(#[source] h2::Error),
    #[error("the peer agent refused the CONNECT to {target} with status {status}")]
    Refused {
        target: SocketAddr,
        status: http::StatusCode,
    },
    #[error("the CONNECT to {target} failed: {source}")]
    Stream {
        target: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("the tunnel connection failed: {0}")]
    Connection(#[source] h2::Error),
    #[error("the peer agent did not answer a PING within {0:?}")]
    KeepaliveTimeout(Duration),
}

impl TunnelError {
    /// Whether the peer broke HTTP/2 (no connection preface, a frame out
    /// of place, a flood our side cut off), as opposed to going away.
    pub fn is_protocol_violation(&self) -> bool {
        match self {
            TunnelError::Handshake(e) | TunnelError::Connection(e) => {
                !e.is_io() && !e.is_remote() && (e.is_go_away() || e.reason().is_some())
            }
            _ => false,
        }
    }

    /// Whether the peer cannot have acted on the CONNECT, so another
    /// connection may try it: the connection was going away or closed
    /// before the stream was taken, or the peer refused the stream as
    /// over its limit (REFUSED_STREAM). No application byte is sent before
    /// the peer's 200, so a retry never repeats data.
    pub fn is_retryable(&self) -> bool {
        match self {
            TunnelError::Unavailable(_) => true,
            TunnelError::Stream { source, .. } => {
                source.is_go_away() || source.reason() == Some(Reason::REFUSED_STREAM)
            }
            _ => false,
        }
    }
}

/// A tunnel connection's transport with something that lives exactly as
/// long as it (in the agent: the count of open tunnel connections).
pub struct Guarded<T, G> {
    io: T,
    _guard: G,
}

impl<T, G> Guarded<T, G> {
    pub fn new(io: T, guard: G) -> Guarded<T, G> {
        Guarded { io, _guard: guard }
    }
}

impl<T: AsyncRead + Unpin, G: Unpin> AsyncRead for Guarded<T, G> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

write_through!(impl[T: AsyncWrite + Unpin, G: Unpin] Guarded<T, G>);

/// The I/O error a copy loop sees for an HTTP/2 error: a reset stream or
/// a connection that went away reads as a reset connection.
fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().expect("is_io() said it holds an io::Error");
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

/// PINGs the peer every `interval`; returns when one is not answered
/// within `timeout` (or the connection can no longer send one).
async fn keepalive(mut pings: PingPong, keepalive: Keepalive) {
    loop {
        tokio::time::sleep(keepalive.interval).await;
        match tokio::time::timeout(keepalive.timeout, pings.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}
