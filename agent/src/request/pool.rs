//! The connections a service's requests share, per endpoint: HTTP/1.1
//! keep-alive connections (one request at a time each, the idle ones kept
//! for the next request of any client) and one multiplexed HTTP/2
//! connection (every request a stream of it, until it closes or goes
//! away; then the next request opens another).
//!
//! A connection belongs to the caller identity it was made for: the
//! endpoint's node agent authorized that identity (a tunnel stream), or
//! this agent admitted it (an endpoint on this node), so another caller's
//! requests never ride it.
//!
//! Each endpoint has its own locks, held only to take or give back a
//! connection: requests to different endpoints never wait on each other.

use std::sync::Mutex;

use http::{Request, Response};
use hyper::{
    body::Incoming,
    client::conn::{TrySendError, http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use log::debug;
use tokio::io::{AsyncRead, AsyncWrite};

use super::UpBody;
use crate::tls::Identity;

/// Most idle HTTP/1.1 connections kept per endpoint, and HTTP/2
/// connections (one per caller identity); more are closed.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// Whose requests a connection carries: the caller's identity (None: a
/// caller the agent knows no identity for).
type Owner = Option<Identity>;

/// A connection that can take a request.
pub enum Sender {
    Http1(http1::SendRequest<UpBody>),
    Http2(http2::SendRequest<UpBody>),
}

impl Sender {
    /// Sends `request`; when the connection could not take it, the error
    /// gives it back (nothing reached the endpoint, so it may go
    /// elsewhere).
    pub async fn send(
        &mut self,
        request: Request<UpBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<UpBody>>> {
        match self {
            Sender::Http1(s) => s.try_send_request(request).await,
            Sender::Http2(s) => s.try_send_request(request).await,
        }
    }
}

/// One endpoint's connections.
#[derive(Default)]
pub struct EndpointPool {
    idle: Mutex<Vec<(Owner, http1::SendRequest<UpBody>)>>,
    shared: Mutex<Vec<(Owner, http2::SendRequest<UpBody>)>>,
}

impl EndpointPool {
    /// A connection of `owner`'s ready for a request, if one is open: an
    /// idle HTTP/1.1 one, or the shared HTTP/2 one.
    pub fn take(&self, http2: bool, owner: Option<&Identity>) -> Option<Sender> {
        if http2 {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            shared.retain(|(_, s)| !s.is_closed());
            return shared
                .iter()
                .find(|(o, s)| o.as_ref() == owner && s.is_ready())
                .map(|(_, s)| Sender::Http2(s.clone()));
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // A connection still carrying a response body stays for later;
        // one the endpoint closed goes.
        idle.retain(|(_, s)| !s.is_closed());
        let ready = idle
            .iter()
            .rposition(|(o, s)| o.as_ref() == owner && s.is_ready())?;
        Some(Sender::Http1(idle.swap_remove(ready).1))
    }

    /// Keeps `sender` for the next request: an HTTP/1.1 connection once
    /// its answer is in (it takes the next request when its body is
    /// read), a new HTTP/2 connection in place of one that closed.
    pub fn keep(&self, sender: Sender, owner: Option<&Identity>) {
        match sender {
            Sender::Http1(s) => {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < MAX_IDLE_PER_ENDPOINT {
                    idle.push((owner.cloned(), s));
                }
            }
            Sender::Http2(s) => {
                let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                shared.retain(|(o, _)| o.as_ref() != owner);
                if shared.len() >= MAX_IDLE_PER_ENDPOINT {
                    shared.remove(0);
                }
                shared.push((owner.cloned(), s));
            }
        }
    }
}

/// A service's pools, one per endpoint, by the endpoint's index.
#[derive(Default)]
pub struct Pools(Box<[EndpointPool]>);

impl Pools {
    pub fn new(endpoints: usize) -> Pools {
        Pools((0..endpoints).map(|_| EndpointPool::default()).collect())
    }

    pub fn endpoint(&self, index: usize) -> &EndpointPool {
        &self.0[index]
    }
}

impl std::fmt::Debug for Pools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pools({} endpoints)", self.0.len())
    }
}

/// Opens an HTTP/1.1 or HTTP/2 (prior knowledge) connection over `io` (a
/// TCP connection to the endpoint, or a stream to it through the mTLS
/// tunnel to its node's agent), driven on a task of its own until it
/// closes.
pub async fn handshake<T>(io: T, http2: bool) -> hyper::Result<Sender>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let io = TokioIo::new(io);
    if http2 {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!("an HTTP/2 upstream connection ended: {e}");
            }
        });
        return Ok(Sender::Http2(sender));
    }
    let (sender, connection) = http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!("an HTTP/1.1 upstream connection ended: {e}");
        }
    });
    Ok(Sender::Http1(sender))
}
