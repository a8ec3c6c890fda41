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

use http::{Request, StatusCode};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    service::service_fn,
};
use log::debug;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{
    answers::{Asking, Reply, answer, workload_refuses},
    between::{Answered, Between, INBOUND_IDLE},
    serve_http,
};
use crate::{
    catalog::LocalTarget,
    config::Protocol,
    drain::DrainWatch,
    proxy::ProxyInputs,
    request::{Sender, UpBody, pool::handshake},
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

/// The workload's end: one connection, one request at a time (HTTP/1.1)
/// or a stream per request (HTTP/2).
enum ToWorkload {
    Http1(tokio::sync::Mutex<http1::SendRequest<UpBody>>),
    Http2(http2::SendRequest<UpBody>),
}

impl ToWorkload {
    async fn send(&self, request: Request<UpBody>) -> hyper::Result<http::Response<Incoming>> {
        match self {
            ToWorkload::Http1(sender) => {
                let mut sender = sender.lock().await;
                sender.ready().await?;
                let sending = sender.send_request(request);
                drop(sender);
                sending.await
            }
            ToWorkload::Http2(sender) => sender.clone().send_request(request).await,
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
    let Arrival {
        inputs,
        target,
        caller,
        peer,
    } = arrival;
    let protocol = target.protocol;
    let (http2, grpc) = (protocol != Protocol::Http, protocol == Protocol::Grpc);
    let to_workload = match handshake(upstream, http2).await {
        Ok(Sender::Http1(sender, ..)) => ToWorkload::Http1(tokio::sync::Mutex::new(sender)),
        Ok(Sender::Http2(sender, ..)) => ToWorkload::Http2(sender),
        Err(e) => return debug!("inbound requests from {peer} to {}: {e}", target.addr),
    };
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
                            Ok(response) => response.map(http_body_util::Either::Left),
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
