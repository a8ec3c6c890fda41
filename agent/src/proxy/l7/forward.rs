//! One request's way to an endpoint and back: an endpoint chosen for it, a
//! pooled connection to it, the answer, and, when the answer (or its
//! absence) says the endpoint failed, perhaps another attempt elsewhere.
//!
//! A request is sent again only when that cannot double an effect: its
//! method is idempotent or it carries the idempotency header (HTTP), or
//! its gRPC status is one its route declared retryable; its body was read
//! whole (within `max_replay_bytes`); no byte of an answer went back to the
//! caller (an answer is held until it is passed through); the service's
//! retry budget allows it. A request that never left the agent (no
//! connection, or a pooled connection that had closed) is always retried.

use std::{sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, request::Parts};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use log::{info, warn};
use tokio::time::{Instant, sleep, timeout_at};

use super::{
    answers::{answer, destination_refuses, fixed},
    call::Call,
    connect::{NoConnection, connect},
    watched::{Verdict, Watched, grpc_failure},
};
use crate::{
    catalog::Service,
    clock::now_ms,
    config::Protocol,
    lb::PickContext,
    proxy::upstream::fail_fast,
    request::{
        FallbackTo, Pushback, Sender, UpBody,
        rules::{
            GRPC_TIMEOUT, GRPC_UNAVAILABLE, grpc_status, grpc_timeout, grpc_timeout_value,
            pushback, strip_hop_by_hop,
        },
    },
    resilience::{Outcome, Overflow},
    route::{self, Tried},
    telemetry::requests::ResponseFlag,
};

/// Longest wait a `Retry-After` or gRPC pushback may ask before a retry;
/// an answer asking more goes back to the caller as it is.
const MAX_PUSHBACK: Duration = Duration::from_secs(1);

/// How long a request body kept for replay (at most `max_replay_bytes`)
/// may take to arrive when the request has no time limit of its own.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a request may find a pooled connection closed under it
/// before it is refused (each time it never left the agent, or could be
/// sent again).
const MAX_STALE: u32 = 3;

/// A response: the endpoint's, streamed through, or one of the agent's.
pub(super) type Answer = Response<Either<Watched, Full<Bytes>>>;

/// A request on its way: what it is, and what it may still do.
struct Outgoing {
    parts: Parts,
    /// None once a streamed body has been sent.
    payload: Option<UpBody>,
    /// Whether it may be sent again after reaching an endpoint.
    resendable: bool,
    /// Its time limit (the route's or the caller's, the shorter) and when
    /// that is up.
    limit: Option<Duration>,
    deadline: Option<Instant>,
}

pub(super) async fn forward(call: &Call<'_>, request: Request<Incoming>) -> Answer {
    let service = call.service;
    let policy = &service.policy.requests;
    let grpc = service.protocol == Protocol::Grpc;
    // A request waits for its answer within `max_pending_requests`: when
    // endpoints stall, further requests fail fast instead of piling up.
    let Some(_pending) = service.state.start_request(&service.policy.thresholds) else {
        fail_fast(service, Overflow::MaxPendingRequests);
        call.note.flag(ResponseFlag::UpstreamOverflow);
        let why = "the service's max_pending_requests is reached";
        return answer(grpc, StatusCode::SERVICE_UNAVAILABLE, why);
    };
    if service.state.note_served() {
        info!(
            "service {}: below its thresholds again; serving new requests",
            service.qualified_name()
        );
    }
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let asked = grpc.then(|| grpc_timeout(&parts.headers)).flatten();
    let limit = match (policy.timeout, asked) {
        (Some(route), Some(caller)) => Some(route.min(caller)),
        (route, caller) => route.or(caller),
    };
    let resendable = policy.max_attempts > 1
        && match grpc {
            true => policy.grpc_retry_on != 0,
            false => policy.may_resend(&parts.method, &parts.headers),
        };
    // A body read for replay comes within the request's time limit (or
    // BODY_READ_TIMEOUT): a caller that stops sending mid-body does not
    // hold the request forever.
    let mut payload = match resendable {
        true => {
            let reading = UpBody::read(body, policy.max_replay_bytes);
            let within = limit.unwrap_or(BODY_READ_TIMEOUT);
            match tokio::time::timeout(within, reading).await {
                Ok(Ok(whole)) => whole,
                Ok(Err(_)) => {
                    return answer(grpc, StatusCode::BAD_REQUEST, "the request body broke off");
                }
                Err(_) => {
                    let why = "the request body did not arrive in time";
                    return answer(grpc, StatusCode::REQUEST_TIMEOUT, why);
                }
            }
        }
        false => UpBody::streamed(body),
    };
    payload.measure(&super::counters(call.ctx, service).request_bytes);
    let mut outgoing = Outgoing {
        parts,
        resendable: resendable && payload.is_whole(),
        payload: Some(payload),
        limit,
        deadline: limit.map(|limit| started + limit),
    };
    let answer = send(call, &mut outgoing, true).await;
    // A body that went nowhere (the agent answered): read it off, within
    // the replay bound, so that the caller's connection stays usable.
    if let Some(unsent) = outgoing.payload.take() {
        unsent.discard(policy.max_replay_bytes).await;
    }
    answer
}

/// Whether no endpoint of `service` could take a request now (all ejected
/// or unhealthy): then its fallback answers, if it has one, rather than
/// the panic policy.
fn nothing_eligible(service: &Service) -> bool {
    let (now, outlier) = (now_ms(), &service.policy.outlier);
    !service
        .endpoints
        .iter()
        .any(|e| e.state.is_eligible(now, outlier))
}

/// The service's fallback answers `outgoing`: another service (whose own
/// fallback is not followed), or a fixed answer. Counted; logged once per
/// episode.
async fn fall_back(call: &Call<'_>, fallback: &FallbackTo, outgoing: &mut Outgoing) -> Answer {
    let service = call.service;
    let grpc = service.protocol == Protocol::Grpc;
    if service.state.start_fallback() {
        warn!(
            "service {}: no endpoint is eligible; its fallback answers ({fallback})",
            service.qualified_name()
        );
    }
    match fallback {
        FallbackTo::Answer { status, body } => {
            call.note.flag(ResponseFlag::Fallback);
            fixed(grpc, *status, body)
        }
        FallbackTo::Service { namespace, name } => {
            let catalog = call.ctx.inputs.catalog.load();
            let found = catalog
                .services()
                .find(|s| s.namespace == *namespace && s.name == *name)
                .cloned();
            call.note.flag(ResponseFlag::Fallback);
            let Some(target) = found else {
                let why = "no endpoint is eligible, and the fallback service is gone";
                return answer(grpc, StatusCode::SERVICE_UNAVAILABLE, why);
            };
            let call = Call {
                service: &target,
                ..*call
            };
            Box::pin(send(&call, outgoing, false)).await
        }
    }
}

/// `outgoing` to an endpoint of the call's service, attempt after attempt;
/// or, when `may_fall_back` and no endpoint is eligible, to its fallback.
async fn send(call: &Call<'_>, outgoing: &mut Outgoing, may_fall_back: bool) -> Answer {
    let service = call.service;
    let policy = &service.policy.requests;
    let grpc = service.protocol == Protocol::Grpc;
    let http2 = service.protocol != Protocol::Http;
    if let Some(fallback) = policy.fallback.as_ref().filter(|_| may_fall_back) {
        if nothing_eligible(service) {
            return fall_back(call, fallback, outgoing).await;
        }
        if service.state.end_fallback() {
            info!(
                "service {}: endpoints eligible again; its fallback no longer answers",
                service.qualified_name()
            );
        }
    }
    let (parts, payload) = (&mut outgoing.parts, &mut outgoing.payload);
    let (resendable, limit, deadline) = (outgoing.resendable, outgoing.limit, outgoing.deadline);
    // A connection that broke after the request went out may have carried
    // it to the application: HTTP sends it again only when that cannot
    // double an effect (`resendable`); a gRPC call takes the break as the
    // UNAVAILABLE its client would see, and goes again only where that
    // status is declared retryable.
    let resend_unanswered = resendable && (!grpc || policy.grpc_retryable(GRPC_UNAVAILABLE));
    let timed_out = || {
        let limit = limit.unwrap_or_default();
        answer(
            grpc,
            StatusCode::GATEWAY_TIMEOUT,
            &format!("no answer within {} ms", limit.as_millis()),
        )
    };
    let pick = PickContext {
        source_workload: call.source.map(|w| w.name.as_str()),
        source_addr: call.peer.ip(),
    };
    service.state.note_request(now_ms());
    // Endpoints a request reached (or failed to connect to): a retry goes
    // elsewhere. One whose pooled connection had closed is not among them.
    let mut tried = Tried::default();
    let (mut attempts, mut stale) = (0, 0);
    let mut retry_slot = None;
    // A retry needs an endpoint not yet tried, or it would drop an answer
    // for nothing.
    let mut may_retry = |attempts: u32, tried: &Tried| {
        let (state, p) = (&service.state, &service.policy);
        attempts < policy.max_attempts
            && (0..service.endpoints.len()).any(|i| !tried.contains(i))
            && match state.start_retry(&p.thresholds, &p.budget, now_ms()) {
                Ok(slot) => {
                    retry_slot = Some(slot);
                    call.note.retries.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(_) => false,
            }
    };
    loop {
        attempts += 1;
        let Ok(chosen) = route::choose(service, &pick, &tried, now_ms()) else {
            call.note.flag(ResponseFlag::NoHealthyUpstream);
            let why = "no endpoint of the service is eligible";
            return answer(grpc, StatusCode::SERVICE_UNAVAILABLE, why);
        };
        let endpoint = &service.endpoints[chosen.index];
        call.note
            .endpoint
            .store(chosen.index + 1, Ordering::Relaxed);
        if let Some(refused) = destination_refuses(call, endpoint, parts, grpc) {
            endpoint.state.cancel(chosen.admission);
            return refused;
        }
        let pool = service.pools.endpoint(chosen.index);
        let owner = call.source.map(|w| &w.identity);
        let most = policy.max_requests_per_connection;
        let (mut sender, fresh) = match pool.take_or_wait(http2, owner, most, deadline).await {
            Ok(sender) => (sender, false),
            // Boxed: a new connection is the rare case and its future the
            // largest part of a request's, which hyper moves (HTTP/2 spawns
            // it) for every request.
            Err(opening) => match Box::pin(connect(call, endpoint, http2, deadline)).await {
                Ok(sender) => {
                    opening.share(&sender, most);
                    (sender, true)
                }
                Err(no) => {
                    // The caller's requests waiting for it go on now.
                    drop(opening);
                    let why = match no {
                        NoConnection::Endpoint(why) => why,
                        NoConnection::TimedOut => {
                            call.note.flag(ResponseFlag::UpstreamTimeout);
                            route::report(service, chosen, Outcome::ConnectFailed, now_ms());
                            return timed_out();
                        }
                        NoConnection::Denied => {
                            call.note.flag(ResponseFlag::Unauthorized);
                            endpoint.state.cancel(chosen.admission);
                            let why = "authorization refused the caller";
                            return answer(grpc, StatusCode::FORBIDDEN, why);
                        }
                        NoConnection::NoPath => {
                            call.note.flag(ResponseFlag::UpstreamConnectionFailure);
                            endpoint.state.cancel(chosen.admission);
                            let why = "no plain path to the endpoint";
                            return answer(grpc, StatusCode::BAD_GATEWAY, why);
                        }
                    };
                    // Nothing was sent: another endpoint may have it.
                    route::report(service, chosen, Outcome::ConnectFailed, now_ms());
                    tried.add(chosen.index);
                    if may_retry(attempts, &tried) {
                        continue;
                    }
                    call.note.flag(ResponseFlag::UpstreamConnectionFailure);
                    return answer(grpc, StatusCode::BAD_GATEWAY, why);
                }
            },
        };
        let body = match payload.as_ref().and_then(UpBody::replay) {
            Some(copy) => copy,
            None => payload
                .take()
                .expect("a streamed body is sent at most once"),
        };
        let in_flight = endpoint.state.open_connection();
        let sent = Instant::now();
        let sending = sender.send(attempt(parts, body, grpc.then_some(deadline).flatten()));
        let result = match deadline {
            Some(deadline) => match timeout_at(deadline, sending).await {
                Ok(result) => result,
                Err(_) => {
                    call.note.flag(ResponseFlag::UpstreamTimeout);
                    route::report(service, chosen, Outcome::Reset, now_ms());
                    return timed_out();
                }
            },
            None => sending.await,
        };
        let mut response = match result {
            Ok(response) => response,
            Err(mut e) => {
                if let Some(unsent) = e.take_message() {
                    // A pooled connection that had closed: not the
                    // endpoint's failure, and the request is whole.
                    endpoint.state.cancel(chosen.admission);
                    let (back, body) = unsent.into_parts();
                    *parts = back;
                    payload.get_or_insert(body);
                    stale += 1;
                    if stale <= MAX_STALE {
                        attempts -= 1;
                        continue;
                    }
                } else if !fresh
                    && resend_unanswered
                    && stale < MAX_STALE
                    && e.error().is_incomplete_message()
                {
                    // A kept connection the endpoint closed as the request
                    // went out (an idle keep-alive ending): no answer came,
                    // and the request may be sent again, so it goes again
                    // on a new connection, to the same endpoint if chosen.
                    endpoint.state.cancel(chosen.admission);
                    stale += 1;
                    attempts -= 1;
                    continue;
                }
                route::report(service, chosen, Outcome::Reset, now_ms());
                tried.add(chosen.index);
                if resend_unanswered && payload.is_some() && may_retry(attempts, &tried) {
                    continue;
                }
                call.note.flag(ResponseFlag::UpstreamTermination);
                let why = "the endpoint failed the request";
                return answer(grpc, StatusCode::BAD_GATEWAY, why);
            }
        };
        tried.add(chosen.index);
        let fresh_for = strip_hop_by_hop(response.headers_mut());
        let stream = match fresh || matches!(sender, Sender::Http1(..)) {
            true => pool.keep(sender, owner, most, fresh_for),
            false => sender.stream_slot(),
        };
        let status = response.status();
        let grpc_head = grpc.then(|| grpc_status(response.headers())).flatten();
        let failed = status.is_server_error() || grpc_head.is_some_and(grpc_failure);
        let retry_on = match grpc {
            true => grpc_head.is_some_and(|s| policy.grpc_retryable(s)),
            false => matches!(status.as_u16(), 502..=504),
        };
        let wait = match pushback(response.headers(), grpc) {
            Pushback::None => Some(Duration::ZERO),
            Pushback::After(wait) if wait <= MAX_PUSHBACK => Some(wait),
            _ => None,
        };
        let in_time = |wait: Duration| deadline.is_none_or(|d| Instant::now() + wait < d);
        if let Some(wait) = wait.filter(|&w| in_time(w))
            && retry_on
            && resendable
            && may_retry(attempts, &tried)
        {
            let outcome = match failed {
                true => Outcome::Reset,
                false => Outcome::Answered {
                    micros: sent.elapsed().as_micros() as u64,
                },
            };
            route::report(service, chosen, outcome, now_ms());
            drop((response, in_flight, stream));
            sleep(wait).await;
            continue;
        }
        let verdict = Verdict {
            service: service.clone(),
            chosen,
            micros: sent.elapsed().as_micros() as u64,
            failed,
            grpc,
            _in_flight: in_flight,
            _stream: stream,
        };
        return response.map(|body| Either::Left(Watched::new(body, verdict)));
    }
}

/// One attempt's request: `parts` (kept for another attempt) with `body`,
/// and for gRPC what is left of the `deadline` as its `grpc-timeout`. Not
/// built in `send`: a local there would keep its space in every request's
/// future.
fn attempt(parts: &Parts, body: UpBody, deadline: Option<Instant>) -> Request<UpBody> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    if let Some(deadline) = deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        request
            .headers_mut()
            .insert(GRPC_TIMEOUT, grpc_timeout_value(left));
    }
    request
}
