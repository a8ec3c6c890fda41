//! Requests, not just connections (`protocol: http`, issue 17's first
//! part): a workload's connection to an HTTP/1.1 service is served here as
//! HTTP, and each request goes to an endpoint chosen for it, by the
//! service's balancer and outlier detection, on the caller's side with no
//! extra hop. A keep-alive client that sends every request on one
//! connection is so spread over the endpoints, and an endpoint that
//! answers 5xx counts it as a failure (its consecutive failures eject it),
//! where at L4 it was "healthy" because its connects succeed.
//!
//! What is not built yet: retries, request timeouts, rate limits,
//! fallbacks, HTTP/2 and gRPC, and requests over the mTLS tunnels between
//! nodes (config check refuses those services). An HTTP connection is not
//! listed in `sluice conns` and does not move in an upgrade: it finishes
//! in the old agent within `agent.drain_timeout`.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::debug;
use tokio::{net::TcpStream, time::Instant};

use super::{
    outbound::OutboundContext,
    upstream::{DialError, Upstream, dial},
};
use crate::{
    catalog::{Service, Workload},
    clock::now_ms,
    lb::PickContext,
    resilience::Outcome,
    route::{self, Tried},
};

/// A request's head must arrive within this, or its connection is closed
/// (a client that sends nothing, or bytes that never make a request).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A response: the endpoint's, streamed through, or one of the agent's.
type Body = Either<Incoming, Full<Bytes>>;

/// The upstream connections of one client connection, by endpoint: an
/// HTTP/1.1 connection carries one request at a time, so a request takes
/// one out and gives it back once answered.
#[derive(Default)]
struct Upstreams(Mutex<HashMap<usize, Vec<SendRequest<Incoming>>>>);

impl Upstreams {
    fn take(&self, endpoint: usize) -> Option<SendRequest<Incoming>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get_mut(&endpoint)?.pop()
    }

    fn give_back(&self, endpoint: usize, sender: SendRequest<Incoming>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(endpoint).or_default().push(sender);
    }
}

/// Serves `client` (a workload's connection to `service`) as HTTP/1.1
/// until it closes.
pub(super) async fn serve(
    ctx: Arc<OutboundContext>,
    client: TcpStream,
    service: Arc<Service>,
    source: Option<Arc<Workload>>,
    peer: SocketAddr,
) {
    let upstreams = Arc::new(Upstreams::default());
    let name = service.qualified_name();
    let requests = service_fn(move |request| {
        let (ctx, service) = (ctx.clone(), service.clone());
        let (source, upstreams) = (source.clone(), upstreams.clone());
        async move {
            let started = Instant::now();
            let answer = forward(&ctx, &service, source.as_deref(), peer, &upstreams, request);
            let response = answer.await;
            let counters = service.requests.get_or_init(|| {
                let metrics = &ctx.inputs.metrics.requests;
                metrics.service(&service.namespace, &service.name)
            });
            let status = match response.body() {
                Either::Left(_) => Some(response.status().as_u16()),
                Either::Right(_) => None,
            };
            counters.answered(status, started.elapsed().as_secs_f64());
            Ok::<_, Infallible>(response)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(client), requests)
        .await;
    if let Err(e) = served {
        debug!("{peer}: HTTP connection to {name}: {e}");
    }
}

/// One request: an endpoint chosen for it, a connection to it (kept for
/// the next request), the answer streamed back and fed to the endpoint's
/// outlier detection (a 5xx is a failure).
async fn forward(
    ctx: &OutboundContext,
    service: &Service,
    source: Option<&Workload>,
    peer: SocketAddr,
    upstreams: &Upstreams,
    request: Request<Incoming>,
) -> Response<Body> {
    let pick = PickContext {
        source_workload: source.map(|w| w.name.as_str()),
        source_addr: peer.ip(),
    };
    let Ok(chosen) = route::choose(service, &pick, &Tried::default(), now_ms()) else {
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "no endpoint of the service is eligible",
        );
    };
    let endpoint = &service.endpoints[chosen.index];
    // A kept connection that closed meanwhile is replaced.
    let kept = match upstreams.take(chosen.index) {
        Some(mut sender) => sender.ready().await.is_ok().then_some(sender),
        None => None,
    };
    let mut sender = match kept {
        Some(sender) => sender,
        None => match Box::pin(dial(ctx, service, endpoint, source, peer.ip())).await {
            Ok(Upstream::Plain(tcp)) => match handshake(tcp).await {
                Ok(sender) => sender,
                Err(e) => {
                    route::report(service, chosen, Outcome::ConnectFailed, now_ms());
                    debug!("{}: {}: {e}", service.qualified_name(), endpoint.addr);
                    return answer(StatusCode::BAD_GATEWAY, "the endpoint spoke no HTTP/1.1");
                }
            },
            Ok(_) => {
                endpoint.state.cancel(chosen.admission);
                return answer(StatusCode::BAD_GATEWAY, "no plain path to the endpoint");
            }
            Err(DialError::Denied) => {
                endpoint.state.cancel(chosen.admission);
                return answer(StatusCode::FORBIDDEN, "authorization refused the caller");
            }
            Err(_) => {
                route::report(service, chosen, Outcome::ConnectFailed, now_ms());
                return answer(StatusCode::BAD_GATEWAY, "cannot connect to the endpoint");
            }
        },
    };
    let started = Instant::now();
    match sender.send_request(request).await {
        Ok(response) => {
            let outcome = match response.status().is_server_error() {
                true => Outcome::Reset,
                false => Outcome::Connected {
                    micros: started.elapsed().as_micros() as u64,
                },
            };
            route::report(service, chosen, outcome, now_ms());
            upstreams.give_back(chosen.index, sender);
            response.map(Either::Left)
        }
        Err(e) => {
            route::report(service, chosen, Outcome::Reset, now_ms());
            debug!("{}: {}: {e}", service.qualified_name(), endpoint.addr);
            answer(StatusCode::BAD_GATEWAY, "the endpoint failed the request")
        }
    }
}

/// An HTTP/1.1 client connection over `tcp`, driven on a task of its own.
async fn handshake(tcp: TcpStream) -> hyper::Result<SendRequest<Incoming>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!("an HTTP upstream connection ended: {e}");
        }
    });
    Ok(sender)
}

/// The agent's own answer, with why in the body.
fn answer(status: StatusCode, why: &str) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "sluice: {why}\n"
    )))));
    *response.status_mut() = status;
    response
}
