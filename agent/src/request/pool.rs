//! The connections a service's requests share, per endpoint: HTTP/1.1
//! keep-alive connections (one request at a time each, the idle ones kept
//! for the next request of any client) and multiplexed HTTP/2
//! connections (every request a stream of one, shared from the moment it
//! opens until it closes or goes away; then the next request opens
//! another).
//!
//! A connection belongs to the caller identity it was made for: the
//! endpoint's node agent authorized that identity (a tunnel stream), or
//! this agent admitted it (an endpoint on this node), so another caller's
//! requests never ride it.
//!
//! An HTTP/2 connection carries at most [`MAX_STREAMS_PER_CONNECTION`]
//! requests at once, or fewer if the endpoint's SETTINGS say so: with that many in flight on each connection of the
//! caller's, the next request opens another connection (rather than wait
//! in line for a stream), one at a time: the requests that come while it
//! opens go over the least loaded one meanwhile. A connection left without
//! a stream goes once another has room to spare. The requests that come
//! while the caller's first connection to the endpoint opens wait for it
//! (at most [`OPENING`]) instead of each opening its own.
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

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use http::{Request, Response};
use hyper::{
    body::Incoming,
    client::conn::{TrySendError, http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use log::debug;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{Notify, futures::Notified},
};

use super::{UpBody, peer_settings::PeerSettings};
use crate::{tls::Identity, tunnel::TunnelClient};

/// Most idle HTTP/1.1 connections kept per endpoint, and HTTP/2
/// connections; more are closed.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// Requests an HTTP/2 connection carries at once before the next one
/// opens another connection: the least a server should allow (RFC 9113,
/// 6.5.2, SETTINGS_MAX_CONCURRENT_STREAMS), so that no request waits in
/// line for a stream of a server that allows that many.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 100;

/// Whose requests a connection carries: the caller's identity (None: a
/// caller the agent knows no identity for).
type Owner = Option<Identity>;

/// A connection that can take a request: HTTP/1.1 with the requests it
/// has carried (the one it is taken for included), or HTTP/2; each with
/// the tunnel connection it rides, if any.
pub enum Sender {
    Http1(http1::SendRequest<UpBody>, u32, Via),
    Http2(http2::SendRequest<UpBody>, Via, Option<StreamSlot>),
}

/// An HTTP/2 connection's requests in flight, and how many it may carry
/// at once: [`MAX_STREAMS_PER_CONNECTION`], or fewer when the endpoint's
/// SETTINGS_MAX_CONCURRENT_STREAMS says so ([`PeerSettings`]).
#[derive(Debug)]
pub struct Streams {
    open: AtomicU32,
    limit: AtomicU32,
}

impl Default for Streams {
    fn default() -> Streams {
        Streams {
            open: AtomicU32::new(0),
            limit: AtomicU32::new(MAX_STREAMS_PER_CONNECTION),
        }
    }
}

impl Streams {
    /// The endpoint allows at most `most` at once, from now on (at least
    /// one is kept: a connection that takes none would be opened for
    /// nothing; at most [`MAX_STREAMS_PER_CONNECTION`]).
    pub fn set_limit(&self, most: u32) {
        let most = most.clamp(1, MAX_STREAMS_PER_CONNECTION);
        self.limit.store(most, Ordering::Release);
    }

    fn open(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }

    pub(super) fn limit(&self) -> u32 {
        self.limit.load(Ordering::Acquire)
    }
}

/// A request's place among the requests an HTTP/2 connection carries at
/// once: taken with the connection, given back when dropped (with the
/// request's response, see [`Sender::stream_slot`]).
pub struct StreamSlot(Arc<Streams>);

impl StreamSlot {
    fn take(streams: &Arc<Streams>) -> StreamSlot {
        streams.open.fetch_add(1, Ordering::AcqRel);
        StreamSlot(streams.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The tunnel connection an HTTP connection rides (None: a TCP or TLS
/// connection of its own). Behind an `Arc`: each request taken from the
/// pool carries it, and cloning the client itself takes h2's lock.
pub type Via = Option<Arc<TunnelClient>>;

/// Whether a connection over `via` may take new requests: its tunnel
/// connection still takes new streams.
fn usable(via: &Via) -> bool {
    via.as_deref().is_none_or(TunnelClient::is_usable)
}

impl Sender {
    /// The same connection, known to ride `via`.
    pub fn via(self, via: Via) -> Sender {
        match self {
            Sender::Http1(s, carried, _) => Sender::Http1(s, carried, via),
            Sender::Http2(s, _, slot) => Sender::Http2(s, via, slot),
        }
    }

    /// The request's stream slot (HTTP/2), to keep until its response
    /// has ended.
    pub fn stream_slot(&mut self) -> Option<StreamSlot> {
        match self {
            Sender::Http1(..) => None,
            Sender::Http2(_, _, slot) => slot.take(),
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
            Sender::Http2(s, ..) => s.try_send_request(request).await,
        }
    }
}

/// A pooled connection: whose it is, the requests it has carried, and
/// (HTTP/2) those it carries now.
struct Pooled<S> {
    owner: Owner,
    sender: S,
    carried: u32,
    via: Via,
    streams: Arc<Streams>,
    /// When the endpoint's `Keep-Alive: timeout` is nearly up: past it,
    /// the connection takes no request (HTTP/1.1).
    until: Option<tokio::time::Instant>,
}

/// One endpoint's connections.
#[derive(Default)]
pub struct EndpointPool {
    idle: Mutex<Vec<Pooled<http1::SendRequest<UpBody>>>>,
    shared: Mutex<Shared>,
    /// An HTTP/2 connection being opened was shared, or failed.
    opened: Notify,
}

/// Why no open connection was taken: what the request does instead.
enum NotTaken<'a> {
    /// It opens one (see [`Opening`]).
    Open,
    /// Another request of the caller's opens the caller's first HTTP/2
    /// connection to the endpoint: it waits for that one (at most
    /// [`OPENING`]), then asks again.
    Wait(Pin<Box<Notified<'a>>>),
}

/// An endpoint's HTTP/2 connections, and the callers one is being opened
/// for (since when: one that failed is forgotten after [`OPENING`]).
#[derive(Default)]
struct Shared {
    conns: Vec<Pooled<http2::SendRequest<UpBody>>>,
    opening: Vec<(Owner, Instant)>,
}

impl Shared {
    /// `owner`'s connection being opened is open, or failed: whether one
    /// was being opened.
    fn done_opening(&mut self, owner: Option<&Identity>) -> bool {
        let at = self.opening.iter().position(|(o, _)| o.as_ref() == owner);
        at.map(|at| self.opening.swap_remove(at)).is_some()
    }
}

/// How long a new HTTP/2 connection waits for the endpoint's SETTINGS
/// (its stream limit) before it takes requests regardless.
const SETTINGS_WAIT: Duration = Duration::from_millis(500);

/// How long a connection being opened keeps other requests off opening
/// their own.
const OPENING: Duration = Duration::from_secs(1);

impl EndpointPool {
    /// A connection of `owner`'s ready for a request, if one is open: an
    /// idle HTTP/1.1 one, or a shared HTTP/2 one with a stream to spare.
    /// `most` is the service's `max_requests_per_connection`.
    fn take(
        &self,
        http2: bool,
        owner: Option<&Identity>,
        most: Option<u32>,
    ) -> Result<Sender, NotTaken<'_>> {
        if http2 {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            let Shared { conns, opening } = &mut *shared;
            // Only the caller's own are asked about their tunnel
            // connection: the question takes h2's locks.
            conns
                .retain(|p| !p.sender.is_closed() && (p.owner.as_ref() != owner || usable(&p.via)));
            type Conn = Pooled<http2::SendRequest<UpBody>>;
            let mine = |p: &Conn| p.owner.as_ref() == owner && p.sender.is_ready();
            let streams = |p: &Conn| p.streams.open();
            let room = |p: &Conn| mine(p) && streams(p) < p.streams.limit();
            let at = match conns.iter().position(room) {
                Some(at) => at,
                None => {
                    let now = Instant::now();
                    opening.retain(|(_, since)| now.duration_since(*since) < OPENING);
                    let least = (0..conns.len())
                        .filter(|&i| mine(&conns[i]))
                        .min_by_key(|&i| streams(&conns[i]));
                    let being_opened = opening.iter().any(|(o, _)| o.as_ref() == owner);
                    match (least, being_opened) {
                        // One is being opened: this request waits in
                        // line on a full one rather than open another,
                        (Some(at), true) => at,
                        // or, with none open, for that one.
                        (None, true) => {
                            // Enabled under the lock: the share that
                            // wakes it takes the lock first.
                            let mut opened = Box::pin(self.opened.notified());
                            opened.as_mut().enable();
                            return Err(NotTaken::Wait(opened));
                        }
                        // The caller opens one (`share` says it is open).
                        _ => {
                            opening.push((owner.cloned(), now));
                            return Err(NotTaken::Open);
                        }
                    }
                }
            };
            // Load gone down: another of the caller's connections with no
            // stream goes (its peer would keep it open for nothing).
            if streams(&conns[at]) < conns[at].streams.limit() / 2 {
                let first = Arc::as_ptr(&conns[at].streams);
                conns.retain(|p| {
                    Arc::as_ptr(&p.streams) == first || p.owner.as_ref() != owner || streams(p) > 0
                });
            }
            let at = conns
                .iter()
                .position(|p| Arc::ptr_eq(&p.streams, &conns[at].streams))
                .expect("the chosen connection stays");
            let pooled = &mut conns[at];
            pooled.carried += 1;
            let slot = StreamSlot::take(&pooled.streams);
            let sender = Sender::Http2(pooled.sender.clone(), pooled.via.clone(), Some(slot));
            // Its last request: no other takes it (its streams finish,
            // and it closes when the last one has).
            if most.is_some_and(|most| pooled.carried >= most) {
                conns.swap_remove(at);
            }
            return Ok(sender);
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // A connection still carrying a response body stays for later;
        // one the endpoint closed, or is about to close, goes.
        idle.retain(|p| {
            !p.sender.is_closed()
                && p.until
                    .is_none_or(|until| tokio::time::Instant::now() < until)
        });
        loop {
            let ready = idle
                .iter()
                .rposition(|p| p.owner.as_ref() == owner && p.sender.is_ready())
                .ok_or(NotTaken::Open)?;
            let pooled = idle.swap_remove(ready);
            // So does one whose tunnel connection is going away; asked of
            // the one taken only, as the question takes h2's locks.
            if usable(&pooled.via) {
                return Ok(Sender::Http1(pooled.sender, pooled.carried + 1, pooled.via));
            }
        }
    }

    /// Keeps `sender` for the next request: an HTTP/1.1 connection once
    /// its answer is in (it takes the next request when its body is
    /// read, for at most `fresh_for` from now when the answer said how
    /// long the endpoint keeps it: [`keep_alive_for`]) unless it has
    /// carried `most` requests or its tunnel connection is going away.
    /// Gives back the request's stream slot (HTTP/2), to keep until its
    /// response has ended.
    ///
    /// [`keep_alive_for`]: super::rules::keep_alive_for
    pub fn keep(
        &self,
        sender: Sender,
        owner: Option<&Identity>,
        most: Option<u32>,
        fresh_for: Option<Duration>,
    ) -> Option<StreamSlot> {
        match sender {
            Sender::Http1(_, _, via) if !usable(&via) => None,
            Sender::Http1(_, carried, _) if most.is_some_and(|most| carried >= most) => None,
            Sender::Http1(sender, carried, via) => {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < MAX_IDLE_PER_ENDPOINT {
                    let owner = owner.cloned();
                    idle.push(Pooled {
                        owner,
                        sender,
                        carried,
                        via,
                        streams: Arc::default(),
                        until: fresh_for.map(|f| tokio::time::Instant::now() + f),
                    });
                }
                None
            }
            // Shared as soon as it opened (`share`).
            Sender::Http2(_, _, slot) => slot,
        }
    }

    /// Shares a new HTTP/2 connection of `owner`'s with the requests that
    /// come after (before its first request is answered: it takes streams
    /// at once), beside the caller's others; not one for a single request
    /// (`most`) or whose tunnel connection is going away.
    fn share(&self, sender: &Sender, owner: Option<&Identity>, most: Option<u32>) {
        let Sender::Http2(sender, via, slot) = sender else {
            return;
        };
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.done_opening(owner);
        // Those waiting for it take it, or open their own.
        self.opened.notify_waiters();
        let conns = &mut shared.conns;
        if most == Some(1) || !usable(via) {
            return;
        }
        conns.retain(|p| !p.sender.is_closed());
        if conns.len() >= MAX_IDLE_PER_ENDPOINT {
            conns.remove(0);
        }
        conns.push(Pooled {
            owner: owner.cloned(),
            sender: sender.clone(),
            carried: 1,
            via: via.clone(),
            // Counts the request it was opened for while that one still
            // holds its slot.
            streams: slot.as_ref().map_or_else(Arc::default, |s| s.0.clone()),
            until: None,
        });
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
    if http2 {
        let streams = Arc::new(Streams::default());
        let (io, first_read) = PeerSettings::new(io, streams.clone());
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!("an HTTP/2 upstream connection ended: {e}");
            }
        });
        // The endpoint's stream limit, before the connection is shared:
        // its SETTINGS come one round trip after the connect.
        let _ = tokio::time::timeout(SETTINGS_WAIT, first_read).await;
        let slot = StreamSlot::take(&streams);
        return Ok(Sender::Http2(sender, None, Some(slot)));
    }
    let (sender, connection) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!("an HTTP/1.1 upstream connection ended: {e}");
        }
    });
    Ok(Sender::Http1(sender, 1, None))
}

mod opening;
#[cfg(test)]
mod tests;

pub use opening::Opening;
