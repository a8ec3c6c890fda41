//! Requests, not just connections (issue 17): a workload's connection to
//! a service that declares `protocol: http`, `http2` or `grpc` is served
//! here as HTTP/1.1 or HTTP/2 (prior knowledge), and each request (each
//! stream, each gRPC call) goes to an endpoint chosen for it by the
//! service's balancer and outlier detection, on the caller's side with no
//! extra hop. A keep-alive client, or a gRPC client on one HTTP/2
//! connection, is so spread over the endpoints, and an endpoint that
//! answers 5xx (gRPC: UNAVAILABLE, INTERNAL) counts it as a failure.
//! [`forward`] is one request's way, with its timeout and retries;
//! [`watched`] tells the endpoint how its answer ended; the connections to
//! endpoints are shared per service and caller identity
//! ([`crate::request::pool`]).
//!
//! A workload's rate limit and request rules are checked by the agent of
//! its node: here for a caller on this node, in [`inbound`] for requests
//! from other nodes.
//!
//! An HTTP connection does not move in an upgrade: when the agent drains
//! it ends gracefully (HTTP/1.1 after the request in hand, HTTP/2 with
//! GOAWAY), and its client's next request goes to the successor.

mod answers;
mod between;
mod call;
mod connect;
mod counted;
mod flood;
mod forward;
pub(super) mod inbound;
mod watched;

use std::{convert::Infallible, net::SocketAddr, pin::Pin, sync::Arc};

use http::{Request, header::HOST};
use http_body_util::Either;
use hyper::{
    body::{Body, Incoming},
    rt::bounds::Http2ServerConnExec,
    service::{HttpService, service_fn},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use log::debug;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::Instant,
};

pub(super) use self::counted::Counted;
use self::{
    between::{Answered, Between, Expired, Heads},
    call::{Call, Note},
    flood::FloodGuard,
    forward::{Answer, forward},
};
use super::{
    connections::{Callee, Caller},
    lifecycle::{ConnectionLife, Opening},
    outbound::OutboundContext,
};
use crate::{
    audit::{Party, Served},
    catalog::{Service, Workload},
    config::Protocol,
    drain::DrainWatch,
    request::{rules::grpc_status, trace::Hop},
    telemetry::{
        CloseReason,
        requests::{ConnectionRefusal, RequestCounters, RequestMetrics},
    },
};

/// Serves `client` (a workload's connection to `service`) as HTTP/1.1 or
/// HTTP/2 until it closes.
pub(super) async fn serve(
    ctx: Arc<OutboundContext>,
    client: TcpStream,
    service: Arc<Service>,
    source: Option<Arc<Workload>>,
    peer: SocketAddr,
) {
    let name = service.qualified_name();
    let http1 = service.protocol == Protocol::Http;
    let drain = ctx.drain.clone();
    let metrics = ctx.clone();
    // Listed for `sluice conns` (its bytes, not its endpoints: each of its
    // requests has its own) and audited at its close.
    let life = ConnectionLife::open(
        &metrics.inputs.connections,
        &metrics.inputs.audit,
        Opening {
            caller: Caller::Workload(source.clone()),
            callee: Callee::Requests(service.clone()),
            client: peer,
            upstream: service.vip,
            security: "per_request",
            accepted: Instant::now(),
            movable: false,
        },
        None,
    );
    let client = Counted::new(client, life.bytes());
    let between = Between::new(service.policy.idle_timeout);
    let watch = between.clone();
    let requests = service_fn(move |mut request: Request<Incoming>| {
        let (ctx, service, source) = (ctx.clone(), service.clone(), source.clone());
        let in_flight = between.request();
        async move {
            let started = Instant::now();
            let note = Note::default();
            // What the access log says of the request, taken before it goes.
            let asked = ctx
                .inputs
                .audit
                .wants_requests()
                .then(|| Asked::of(&mut request));
            let call = Call {
                ctx: &ctx,
                service: &service,
                source: source.as_deref(),
                peer,
                note: &note,
            };
            // Boxed: hyper moves this future once or twice for every
            // request (HTTP/2 spawns it); the request's way is most of it.
            let response = Box::pin(forward(&call, request)).await;
            let grpc = service.protocol == Protocol::Grpc;
            let counters = counters(&ctx, &service);
            // The endpoint's body is measured as it passes (`Watched`).
            let by_endpoint = match response.body() {
                Either::Left(_) => true,
                Either::Right(own) => {
                    let size = own.size_hint().exact().unwrap_or(0);
                    counters.response_bytes.observe(size as f64);
                    false
                }
            };
            let took = started.elapsed();
            counters.answered(response.status().as_u16(), by_endpoint, took.as_secs_f64());
            // A trailers-only answer (the agent's gRPC answers are): its
            // status is in the head; otherwise the trailers bring it.
            if let Some(status) = grpc.then(|| grpc_status(response.headers())).flatten() {
                counters.grpc(status);
            }
            counters.flagged(note.flagged());
            if let Some(asked) = asked {
                log_request(&call, &asked, &response, took);
            }
            Ok::<_, Infallible>(response.map(|body| Answered::new(body, in_flight)))
        }
    });
    let served = serve_http(
        client,
        http1,
        requests,
        (drain, &watch),
        &metrics.inputs.metrics.requests,
    );
    let Err(e) = served.await else {
        return life.close(CloseReason::Closed);
    };
    debug!("{peer}: HTTP connection to {name}: {e}");
    life.close(CloseReason::ClientError);
}

/// The request metrics of `service`, resolved on its first request.
fn counters<'a>(ctx: &OutboundContext, service: &'a Service) -> &'a RequestCounters {
    service.requests.get_or_init(|| {
        let metrics = &ctx.inputs.metrics.requests;
        let grpc = service.protocol == Protocol::Grpc;
        metrics.service(&service.namespace, &service.name, grpc)
    })
}

/// How an HTTP connection to the agent ended, when not by its client's
/// close or the agent's drain.
#[derive(Debug)]
enum Ended {
    Http(hyper::Error),
    /// A request head took over [`between::HEAD_TIMEOUT`].
    HeadTimeout,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Http(e) => e.fmt(f),
            Ended::HeadTimeout => write!(
                f,
                "no whole request head within {} s of its first byte",
                between::HEAD_TIMEOUT.as_secs()
            ),
        }
    }
}

/// Serves `client` as HTTP/1.1 or HTTP/2 (prior knowledge, its control
/// frames watched by a [`FloodGuard`]) with `requests` until it closes.
/// When the agent drains (an upgrade, a stop), the connection ends
/// gracefully: HTTP/1.1 after the request in hand, its answer saying
/// `Connection: close`; HTTP/2 with GOAWAY, its open streams answered. The
/// client opens its next connection to the successor. An HTTP/1.1
/// connection also ends gracefully after its idle limit without a request,
/// and is cut when a request head takes too long ([`Between`], whose
/// requests `requests` reports). A connection cut for what the client sent
/// (malformed, too large, too slow, a flood) is counted in `metrics` by
/// why. Returns how it ended.
async fn serve_http<I, S, B>(
    client: I,
    http1: bool,
    requests: S,
    (mut drain, between): (DrainWatch, &Arc<Between>),
    metrics: &RequestMetrics,
) -> Result<(), Ended>
where
    I: AsyncRead + AsyncWrite + Send + Unpin,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: Http2ServerConnExec<S::Future, B>,
{
    if http1 {
        // No timer: hyper's header read timeout would also be an idle
        // limit (see `between`).
        let client = Heads::new(client, between.clone());
        let connection = hyper::server::conn::http1::Builder::new()
            .header_read_timeout(None)
            .serve_connection(TokioIo::new(client), requests);
        let connection = std::pin::pin!(connection);
        let served =
            serve_between(connection, &mut drain, between, |c| c.graceful_shutdown()).await;
        if let Some(why) = served.as_ref().err().and_then(refusal) {
            metrics.refused(why);
        }
        return served;
    }
    let guard = FloodGuard::new(client);
    let flooded = guard.tripped();
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(guard), requests);
    let connection = std::pin::pin!(connection);
    // Only HTTP/1.1's reads are watched for heads: this one ends only
    // gracefully, at the idle limit (GOAWAY) or the drain.
    let served = serve_between(connection, &mut drain, between, |c| c.graceful_shutdown()).await;
    let why = match flooded.load(std::sync::atomic::Ordering::Relaxed) {
        true => Some(ConnectionRefusal::Http2Flood),
        false => served.as_ref().err().and_then(refusal),
    };
    if let Some(why) = why {
        metrics.refused(why);
    }
    served
}

/// Serves `connection` to its end. When the agent drains, or the
/// connection has had no request for its idle limit, it is asked to end
/// gracefully (`shutdown`: between requests HTTP/1.1 closes at once,
/// HTTP/2 says GOAWAY) and served to that end; a request head that takes
/// too long ([`Between`]) cuts it.
async fn serve_between<F: Future<Output = hyper::Result<()>>>(
    mut connection: Pin<&mut F>,
    drain: &mut DrainWatch,
    between: &Between,
    shutdown: impl Fn(Pin<&mut F>),
) -> Result<(), Ended> {
    let mut ending = false;
    loop {
        tokio::select! {
            served = connection.as_mut() => return served.map_err(Ended::Http),
            () = drain.draining(), if !ending => {
                ending = true;
                shutdown(connection.as_mut());
            }
            expired = between.expired(), if !ending => match expired {
                Expired::Idle => {
                    ending = true;
                    shutdown(connection.as_mut());
                }
                Expired::Head => return Err(Ended::HeadTimeout),
            },
        }
    }
}

/// A request's line of the access log: what was asked, and its hop of
/// the trace.
struct Asked {
    method: http::Method,
    authority: String,
    path: String,
    hop: Hop,
}

impl Asked {
    /// What `request` asks; its `traceparent` is set to name the agent's
    /// span.
    fn of(request: &mut Request<Incoming>) -> Asked {
        let hop = Hop::start(request.headers_mut());
        let authority = request
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| request.headers().get(HOST).and_then(|h| h.to_str().ok()))
            .unwrap_or("");
        Asked {
            method: request.method().clone(),
            authority: authority.to_owned(),
            path: request.uri().path().to_owned(),
            hop,
        }
    }
}

/// One line of the access log (`audit.requests`), through the audit
/// trail's bounded writer.
fn log_request(call: &Call<'_>, asked: &Asked, response: &Answer, took: std::time::Duration) {
    let service = call.service;
    let endpoint = call.note.endpoint().map(|i| &service.endpoints[i]);
    let name = service.qualified_name();
    let source_workload = call.source.map(|w| w.qualified_name());
    let grpc_status = (service.protocol == Protocol::Grpc)
        .then(|| grpc_status(response.headers()))
        .flatten();
    call.ctx.inputs.audit.served(&Served {
        source: Party {
            identity: call.source.map(|w| &w.identity),
            address: Some(call.peer),
            workload: source_workload.as_deref(),
        },
        destination: Party {
            identity: endpoint.and_then(|e| e.identity.as_ref()),
            address: endpoint.map(|e| e.addr),
            workload: None,
        },
        service: &name,
        method: asked.method.as_str(),
        authority: &asked.authority,
        path: &asked.path,
        status: response.status().as_u16(),
        grpc_status,
        duration_ms: took.as_secs_f64() * 1e3,
        retries: call.note.retries(),
        response_flags: call.note.flagged().as_str(),
        trace_id: format!("{:032x}", asked.hop.trace_id),
        span_id: format!("{:016x}", asked.hop.span_id),
        parent_span_id: asked.hop.parent_span_id.map(|p| format!("{p:016x}")),
    });
}

/// Why the HTTP server closed a connection, when it refused it (rather
/// than the client going away).
fn refusal(e: &Ended) -> Option<ConnectionRefusal> {
    let Ended::Http(e) = e else {
        return Some(ConnectionRefusal::HeaderTimeout);
    };
    use std::error::Error as _;
    if e.is_parse_too_large() {
        return Some(ConnectionRefusal::TooLarge);
    }
    if e.is_parse() || e.is_parse_status() {
        return Some(ConnectionRefusal::Malformed);
    }
    let h2 = e.source()?.downcast_ref::<h2::Error>()?;
    // Sent by this side: the peer broke the protocol or abused it.
    (h2.is_go_away() && !h2.is_remote()).then_some(ConnectionRefusal::Http2Protocol)
}
