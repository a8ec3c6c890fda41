//! Requests from other nodes at the workload's own node: a peer agent
//! carries a workload's HTTP connection to an endpoint on this node as a
//! tunnel stream (or an mTLS connection of its own). When the endpoint's
//! workload decides single requests (a rate limit, request rules), this
//! agent serves that stream as HTTP and checks each request as the request
//! path checks a caller on this node ([`workload_refuses`]), the caller
//! being the peer connection's identity, before the request reaches the
//! workload. So a workload's rate limit counts every caller's requests, on
//! whatever node, and its request rules cannot be passed by calling from
//! elsewhere.
//!
//! Each stream gets one connection to the workload (the calling agent
//! pools its streams as it pools connections to endpoints); nothing is
//! retried here, the calling agent decides that. Such a stream does not
//! move in an upgrade: when this agent drains it ends gracefully, as the
//! request path's own connections do, and the calling agent's next
//! request opens a stream to the successor.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    service::service_fn,
};
use log::debug;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::Instant,
};

use super::{
    answers::{Asking, Reply, answer, workload_refuses},
    between::{Answered, Between, INBOUND_IDLE},
    serve_http,
};
use crate::{
    catalog::LocalTarget,
    config::Protocol,
    connect::connect_marked,
    drain::DrainWatch,
    proxy::ProxyInputs,
    request::{Sender, UpBody, pool::handshake, rules::keep_alive_for},
    tls::Identity,
};

/// A stream (or connection) from a peer agent to a workload on this node.
pub(in crate::proxy) struct Arrival {
    pub inputs: Arc<ProxyInputs>,
    pub target: Arc<LocalTarget>,
    /// The peer agent's connection's identity: its workload's.
    pub caller: Identity,
    /// The peer agent's address.
    pub peer: SocketAddr,
}

/// The workload's end of the stream: one connection at a time, one
/// request at a time on it (HTTP/1.1) or a stream per request (HTTP/2).
/// Servers close idle keep-alive connections (Node.js after 5 s): the
/// connection is made again for the next request when the workload has
/// closed the last one, or when the time its `Keep-Alive: timeout` gave
/// is nearly up, so that a request never goes out on a connection that
/// the workload is closing. (Before, every request after such a close
/// got 502 for the rest of the stream.)
struct ToWorkload {
    http2: bool,
    inputs: Arc<ProxyInputs>,
    target: Arc<LocalTarget>,
    kept: tokio::sync::Mutex<Kept>,
}

/// The connection to the workload, and until when it may take requests.
struct Kept {
    conn: Option<Conn>,
    until: Option<Instant>,
}

enum Conn {
    Http1(http1::SendRequest<UpBody>),
    Http2(http2::SendRequest<UpBody>),
}

impl Conn {
    fn is_closed(&self) -> bool {
        match self {
            Conn::Http1(s) => s.is_closed(),
            Conn::Http2(s) => s.is_closed(),
        }
    }
}

/// Why a request did not get the workload's answer.
#[derive(Debug)]
enum NotAnswered {
    /// No connection to the workload could be made.
    Connect(std::io::Error),
    Http(hyper::Error),
}

impl std::fmt::Display for NotAnswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotAnswered::Connect(e) => write!(f, "cannot connect to the workload: {e}"),
            NotAnswered::Http(e) => e.fmt(f),
        }
    }
}

impl ToWorkload {
    /// Over `upstream`, the connection made when the stream was admitted.
    async fn new(arrival: &Arrival, upstream: TcpStream) -> Result<ToWorkload, NotAnswered> {
        let http2 = arrival.target.protocol != Protocol::Http;
        let conn = Self::speak(upstream, http2).await?;
        Ok(ToWorkload {
            http2,
            inputs: arrival.inputs.clone(),
            target: arrival.target.clone(),
            kept: tokio::sync::Mutex::new(Kept {
                conn: Some(conn),
                until: None,
            }),
        })
    }

    async fn speak(upstream: TcpStream, http2: bool) -> Result<Conn, NotAnswered> {
        match handshake(upstream, http2)
            .await
            .map_err(NotAnswered::Http)?
        {
            Sender::Http1(sender, ..) => Ok(Conn::Http1(sender)),
            Sender::Http2(sender, ..) => Ok(Conn::Http2(sender)),
        }
    }

    /// A new connection to the workload, as admission made the first.
    async fn connect(&self) -> Result<Conn, NotAnswered> {
        let (target, inputs) = (&self.target, &self.inputs);
        let netns = target.workload.netns.as_deref();
        let timeout = inputs.connect_timeout;
        let upstream = connect_marked(target.addr, inputs.mark, timeout, netns)
            .await
            .map_err(NotAnswered::Connect)?;
        Self::speak(upstream, self.http2).await
    }

    async fn send(&self, request: Request<UpBody>) -> Result<Response<Incoming>, NotAnswered> {
        let mut kept = self.kept.lock().await;
        let spent = kept.until.is_some_and(|until| Instant::now() >= until);
        if spent || kept.conn.as_ref().is_none_or(Conn::is_closed) {
            kept.until = None;
            kept.conn = Some(self.connect().await?);
        }
        // Ready: HTTP/1.1 once the last answer is read. One that closed
        // first took no byte of this request: a new connection takes it.
        let mut ready = Self::ready(kept.conn.as_mut()).await;
        if ready.is_err() {
            kept.conn = Some(self.connect().await?);
            ready = Self::ready(kept.conn.as_mut()).await;
        }
        ready.map_err(NotAnswered::Http)?;
        let sending = match kept.conn.as_mut() {
            Some(Conn::Http1(s)) => futures::future::Either::Left(s.send_request(request)),
            Some(Conn::Http2(s)) => futures::future::Either::Right(s.send_request(request)),
            None => unreachable!("a connection was made above"),
        };
        // HTTP/2 carries others' requests meanwhile; HTTP/1.1 waits in
        // `ready` for this answer.
        drop(kept);
        let response = sending.await.map_err(NotAnswered::Http)?;
        if let Some(left) = keep_alive_for(response.headers()) {
            self.kept.lock().await.until = Some(Instant::now() + left);
        }
        Ok(response)
    }

    async fn ready(conn: Option<&mut Conn>) -> hyper::Result<()> {
        match conn {
            Some(Conn::Http1(s)) => s.ready().await,
            Some(Conn::Http2(s)) => s.ready().await,
            None => unreachable!("a connection was made first"),
        }
    }
}

/// Serves `client` (the peer agent's stream) as the HTTP its target's
/// services declare, each request checked and then sent on `upstream`
/// (the connection to the workload), until either side closes or the
/// agent drains.
pub(in crate::proxy) async fn serve<C>(
    arrival: Arrival,
    client: C,
    upstream: TcpStream,
    drain: DrainWatch,
) where
    C: AsyncRead + AsyncWrite + Send + Unpin,
{
    let to_workload = match ToWorkload::new(&arrival, upstream).await {
        Ok(to_workload) => to_workload,
        Err(e) => {
            return debug!(
                "inbound requests from {} to {}: {e}",
                arrival.peer, arrival.target.addr
            );
        }
    };
    let Arrival {
        inputs,
        target,
        caller,
        peer,
    } = arrival;
    let protocol = target.protocol;
    let (http2, grpc) = (protocol != Protocol::Http, protocol == Protocol::Grpc);
    let shared = Arc::new((inputs, target, caller, to_workload));
    let metrics = shared.clone();
    let between = Between::new(INBOUND_IDLE);
    let watch = between.clone();
    let requests = service_fn(move |request: Request<Incoming>| {
        let shared = shared.clone();
        let in_flight = between.request();
        async move {
            let (inputs, target, caller, to_workload) = &*shared;
            let (parts, body) = request.into_parts();
            let asking = Asking {
                identity: Some(caller),
                address: peer,
                workload: None,
                service: None,
            };
            let reply: Reply<Incoming> =
                match workload_refuses(inputs, target, &asking, &parts, grpc) {
                    Some((_, refused)) => refused,
                    None => {
                        let request = Request::from_parts(parts, UpBody::streamed(body));
                        match to_workload.send(request).await {
                            Ok(response) => response.map(Either::Left),
                            Err(e) => {
                                debug!("inbound request from {peer} to {}: {e}", target.addr);
                                let why = "the workload failed the request";
                                answer(grpc, StatusCode::BAD_GATEWAY, why)
                            }
                        }
                    }
                };
            Ok::<_, Infallible>(reply.map(|body| Answered::new(body, in_flight)))
        }
    });
    let metrics = &metrics.0.metrics.requests;
    let watching = (drain, &watch);
    if let Err(e) = serve_http(client, !http2, requests, watching, metrics).await {
        debug!("inbound requests from {peer}: {e}");
    }
}
