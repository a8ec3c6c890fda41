//! The agent's own answers on the request path: why it answered instead
//! of an endpoint, as an HTTP status and body, or for gRPC as a
//! trailers-only answer whose status says the same; and what a destination
//! workload on this node says of a request before it is sent (its
//! authorization's request rules: 403; its rate limit: 429).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header::CONTENT_TYPE, request::Parts};
use http_body_util::{Either, Full};

use super::{call::Call, forward::Answer};
use crate::{
    audit::{Denial, Party},
    authz,
    catalog::Endpoint,
    request::rules::{GRPC_DEADLINE_EXCEEDED, GRPC_MESSAGE, GRPC_STATUS, GRPC_UNAVAILABLE},
    telemetry::requests::ResponseFlag,
};

/// The destination's answer instead of `endpoint`'s, when the endpoint is
/// a workload on this node whose policies' request rules deny the request
/// (audited as a denial) or whose rate limit refuses it; None: send it.
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
    let workload = &target.workload;
    let caller = call.source.map(|w| &w.identity);
    let (method, path) = (&parts.method, parts.uri.path());
    let verdict = authz::evaluate_request(&target.policies, caller, method, path);
    if let Some(denied) = verdict.filter(|v| !v.allowed) {
        call.note.flag(ResponseFlag::Unauthorized);
        let (source, service) = (
            call.source.map(|w| w.qualified_name()),
            call.service.qualified_name(),
        );
        let destination = workload.qualified_name();
        call.ctx.inputs.audit.deny(&Denial {
            reason: "denied",
            source: Party {
                identity: caller,
                address: Some(call.peer),
                workload: source.as_deref(),
            },
            destination: Party {
                identity: Some(&workload.identity),
                address: Some(endpoint.addr),
                workload: Some(&destination),
            },
            service: Some(&service),
            rule: Some(&denied.rule),
            detail: Some(&format!("request {method} {path}")),
        });
        let why = format!("authorization refused the request ({})", denied.rule);
        return Some(answer(grpc, StatusCode::FORBIDDEN, &why));
    }
    let limit = workload.rate_limit.as_ref()?;
    let wait = limit.limiter.admit(caller).err()?;
    limit
        .refused
        .get_or_init(|| {
            let metrics = &call.ctx.inputs.metrics.requests;
            metrics.rate_limited(&workload.namespace, &workload.name)
        })
        .inc();
    call.note.flag(ResponseFlag::RateLimited);
    Some(too_many(grpc, wait))
}

/// A rate limit's answer: 429 with `Retry-After` in whole seconds (at
/// least 1), or gRPC RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`.
fn too_many(grpc: bool, wait: Duration) -> Answer {
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
pub(super) fn fixed(grpc: bool, status: StatusCode, body: &Bytes) -> Answer {
    let mut response = answer(grpc, status, &String::from_utf8_lossy(body));
    if !grpc {
        *response.body_mut() = Either::Right(Full::new(body.clone()));
    }
    response
}

/// The agent's own answer, with why: an HTTP status and a body, or for
/// gRPC a trailers-only answer whose status says the same.
pub(super) fn answer(grpc: bool, status: StatusCode, why: &str) -> Answer {
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
