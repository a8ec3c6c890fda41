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
//! A connection carries at most the service's `max_requests_per_connection`
//! requests: an HTTP/1.1 one is then not kept, an HTTP/2 one takes no new
//! stream (its open ones finish); the next request opens another.
//!
//! A connection that rides a tunnel stream (an endpoint on another node)
//! takes no new request once its tunnel connection takes no new stream
//! (the peer agent sent GOAWAY: it is being upgraded, or stops): it is
//! let go when next looked at, its requests in flight answered where they
//! are, and the next request opens a connection over a new tunnel.
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
use crate::{tls::Identity, tunnel::TunnelClient};

/// Most idle HTTP/1.1 connections kept per endpoint, and HTTP/2
/// connections (one per caller identity); more are closed.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// Whose requests a connection carries: the caller's identity (None: a
/// caller the agent knows no identity for).
type Owner = Option<Identity>;

/// A connection that can take a request: HTTP/1.1 with the requests it
/// has carried (the one it is taken for included), or HTTP/2; each with
/// the tunnel connection it rides, if any.
pub enum Sender {
    Http1(http1::SendRequest<UpBody>, u32, Via),
    Http2(http2::SendRequest<UpBody>, Via),
}

/// The tunnel connection an HTTP connection rides (None: a TCP or TLS
/// connection of its own).
pub type Via = Option<TunnelClient>;

/// Whether a connection over `via` may take new requests: its tunnel
/// connection still takes new streams.
fn usable(via: &Via) -> bool {
    via.as_ref().is_none_or(TunnelClient::is_usable)
}

impl Sender {
    /// The same connection, known to ride `via`.
    pub fn via(self, via: Via) -> Sender {
        match self {
            Sender::Http1(s, carried, _) => Sender::Http1(s, carried, via),
            Sender::Http2(s, _) => Sender::Http2(s, via),
        }
    }

    /// Sends `request`; when the connection could not take it, the error
    /// gives it back (nothing reached the endpoint, so it may go
    /// elsewhere).
    pub async fn send(
        &mut self,
        request: Request<UpBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<UpBody>>> {
        match self {
            Sender::Http1(s, ..) => s.try_send_request(request).await,
            Sender::Http2(s, _) => s.try_send_request(request).await,
        }
    }
}

/// A pooled connection: whose it is, and the requests it has carried.
struct Pooled<S> {
    owner: Owner,
    sender: S,
    carried: u32,
    via: Via,
}

/// One endpoint's connections.
#[derive(Default)]
pub struct EndpointPool {
    idle: Mutex<Vec<Pooled<http1::SendRequest<UpBody>>>>,
    shared: Mutex<Vec<Pooled<http2::SendRequest<UpBody>>>>,
}

impl EndpointPool {
    /// A connection of `owner`'s ready for a request, if one is open: an
    /// idle HTTP/1.1 one, or the shared HTTP/2 one. `most` is the
    /// service's `max_requests_per_connection`.
    pub fn take(&self, http2: bool, owner: Option<&Identity>, most: Option<u32>) -> Option<Sender> {
        if http2 {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            shared.retain(|p| !p.sender.is_closed() && usable(&p.via));
            let at = shared
                .iter()
                .position(|p| p.owner.as_ref() == owner && p.sender.is_ready())?;
            let pooled = &mut shared[at];
            pooled.carried += 1;
            let sender = Sender::Http2(pooled.sender.clone(), pooled.via.clone());
            // Its last request: no other takes it (its streams finish,
            // and it closes when the last one has).
            if most.is_some_and(|most| pooled.carried >= most) {
                shared.swap_remove(at);
            }
            return Some(sender);
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // A connection still carrying a response body stays for later;
        // one the endpoint closed goes, and so does one whose tunnel
        // connection is going away.
        idle.retain(|p| !p.sender.is_closed() && usable(&p.via));
        let ready = idle
            .iter()
            .rposition(|p| p.owner.as_ref() == owner && p.sender.is_ready())?;
        let pooled = idle.swap_remove(ready);
        Some(Sender::Http1(pooled.sender, pooled.carried + 1, pooled.via))
    }

    /// Keeps `sender` for the next request: an HTTP/1.1 connection once
    /// its answer is in (it takes the next request when its body is
    /// read) unless it has carried `most` requests, a new HTTP/2
    /// connection in place of one that closed; neither when its tunnel
    /// connection is going away.
    pub fn keep(&self, sender: Sender, owner: Option<&Identity>, most: Option<u32>) {
        match sender {
            Sender::Http1(_, _, via) | Sender::Http2(_, via) if !usable(&via) => {}
            Sender::Http1(_, carried, _) if most.is_some_and(|most| carried >= most) => {}
            Sender::Http1(sender, carried, via) => {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < MAX_IDLE_PER_ENDPOINT {
                    let owner = owner.cloned();
                    idle.push(Pooled {
                        owner,
                        sender,
                        carried,
                        via,
                    });
                }
            }
            Sender::Http2(..) if most == Some(1) => {}
            Sender::Http2(sender, via) => {
                let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                shared.retain(|p| p.owner.as_ref() != owner);
                if shared.len() >= MAX_IDLE_PER_ENDPOINT {
                    shared.remove(0);
                }
                let owner = owner.cloned();
                shared.push(Pooled {
                    owner,
                    sender,
                    carried: 1,
                    via,
                });
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
        return Ok(Sender::Http2(sender, None));
    }
    let (sender, connection) = http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!("an HTTP/1.1 upstream connection ended: {e}");
        }
    });
    Ok(Sender::Http1(sender, 1, None))
}
