//! The agent's own answers on the request path: why it answered instead
//! of an endpoint, as an HTTP status and body, or for gRPC as a
//! trailers-only answer whose status says the same; and what a destination
//! workload on this node says of a request before it is sent (its
//! authorization's request rules: 403; its rate limit: 429).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header::CONTENT_TYPE, request::Parts};
use http_body_util::{Either, Full};

use super::{call::Call, forward::Answer};
use crate::{
    audit::{Denial, Party},
    authz,
    catalog::{Endpoint, LocalTarget, Service, Workload},
    proxy::ProxyInputs,
    request::rules::{GRPC_DEADLINE_EXCEEDED, GRPC_MESSAGE, GRPC_STATUS, GRPC_UNAVAILABLE},
    telemetry::requests::ResponseFlag,
    tls::Identity,
};

/// An answer of the agent's, or a body of type `B` from elsewhere.
pub(in crate::proxy) type Reply<B> = Response<Either<B, Full<Bytes>>>;

/// The destination's answer instead of `endpoint`'s, when the endpoint is
/// a workload on this node that refuses the request ([`workload_refuses`]);
/// None: send it. An endpoint on another node is that node agent's to
/// check, as the request arrives there.
pub(super) fn destination_refuses(
    call: &Call<'_>,
    endpoint: &Endpoint,
    parts: &Parts,
    grpc: bool,
) -> Option<Answer> {
    if !endpoint.local {
        return None;
    }
    let catalog = call.ctx.inputs.catalog.load();
    let target = catalog.local_target(endpoint.addr)?;
    let asking = Asking {
        identity: call.source.map(|w| &w.identity),
        address: call.peer,
        workload: call.source,
        service: Some(call.service),
    };
    let (flag, refused) = workload_refuses(&call.ctx.inputs, target, &asking, parts, grpc)?;
    call.note.flag(flag);
    Some(refused)
}

/// Who asks a workload on this node for a request.
pub(in crate::proxy) struct Asking<'a> {
    pub identity: Option<&'a Identity>,
    pub address: SocketAddr,
    /// The caller's workload, when it is on this node.
    pub workload: Option<&'a Workload>,
    /// The service it asked for, when known.
    pub service: Option<&'a Service>,
}

/// What a workload on this node (`target`) says of a request before it
/// reaches it: its policies' request rules deny it (403, audited as a
/// denial) or its rate limit refuses it (429, counted); None: it may have
/// it. Asked by the request path for an endpoint on this node, and by the
/// inbound side for each request from another node.
pub(in crate::proxy) fn workload_refuses<B>(
    inputs: &ProxyInputs,
    target: &LocalTarget,
    asking: &Asking<'_>,
    parts: &Parts,
    grpc: bool,
) -> Option<(ResponseFlag, Reply<B>)> {
    let workload = &target.workload;
    let caller = asking.identity;
    let (method, path) = (&parts.method, parts.uri.path());
    let verdict = authz::evaluate_request(&target.policies, caller, method, path);
    if let Some(denied) = verdict.filter(|v| !v.allowed) {
        let source = asking.workload.map(|w| w.qualified_name());
        let service = asking.service.map(|s| s.qualified_name());
        let destination = workload.qualified_name();
        inputs.audit.deny(&Denial {
            reason: "denied",
            source: Party {
                identity: caller,
                address: Some(asking.address),
                workload: source.as_deref(),
            },
            destination: Party {
                identity: Some(&workload.identity),
                address: Some(target.addr),
                workload: Some(&destination),
            },
            service: service.as_deref(),
            rule: Some(&denied.rule),
            detail: Some(&format!("request {method} {path}")),
        });
        let why = format!("authorization refused the request ({})", denied.rule);
        let refused = answer(grpc, StatusCode::FORBIDDEN, &why);
        return Some((ResponseFlag::Unauthorized, refused));
    }
    let limit = workload.rate_limit.as_ref()?;
    let wait = limit.limiter.admit(caller).err()?;
    limit
        .refused
        .get_or_init(|| {
            let metrics = &inputs.metrics.requests;
            metrics.rate_limited(&workload.namespace, &workload.name)
        })
        .inc();
    Some((ResponseFlag::RateLimited, too_many(grpc, wait)))
}

/// A rate limit's answer: 429 with `Retry-After` in whole seconds (at
/// least 1), or gRPC RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`.
fn too_many<B>(grpc: bool, wait: Duration) -> Reply<B> {
    let mut response = answer(
        grpc,
        StatusCode::TOO_MANY_REQUESTS,
        "the workload's rate limit is reached",
    );
    let (name, value) = match grpc {
        true => ("grpc-retry-pushback-ms", wait.as_millis().max(1) as u64),
        false => ("retry-after", wait.as_secs_f64().ceil().max(1.0) as u64),
    };
    response
        .headers_mut()
        .insert(name, HeaderValue::from(value));
    response
}

/// A fallback's fixed answer: `status` and `body` as configured, or for
/// gRPC a trailers-only answer whose status says the same and whose
/// message is the body.
pub(super) fn fixed<B>(grpc: bool, status: StatusCode, body: &Bytes) -> Reply<B> {
    let mut response = answer(grpc, status, &String::from_utf8_lossy(body));
    if !grpc {
        *response.body_mut() = Either::Right(Full::new(body.clone()));
    }
    response
}

/// The agent's own answer, with why: an HTTP status and a body, or for
/// gRPC a trailers-only answer whose status says the same.
pub(in crate::proxy) fn answer<B>(grpc: bool, status: StatusCode, why: &str) -> Reply<B> {
    let mut response = Response::new(Either::Right(Full::new(match grpc {
        true => Bytes::new(),
        false => Bytes::from(format!("sluice: {why}\n")),
    })));
    if !grpc {
        *response.status_mut() = status;
        return response;
    }
    let code = match status {
        StatusCode::GATEWAY_TIMEOUT => GRPC_DEADLINE_EXCEEDED,
        StatusCode::TOO_MANY_REQUESTS => 8,
        StatusCode::FORBIDDEN => 7,
        StatusCode::BAD_REQUEST => 13,
        _ => GRPC_UNAVAILABLE,
    };
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS, HeaderValue::from(code));
    if let Ok(message) = HeaderValue::from_str(&format!("sluice: {why}")) {
        headers.insert(GRPC_MESSAGE, message);
    }
    response
}
