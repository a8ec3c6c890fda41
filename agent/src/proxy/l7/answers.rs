//! The agent's own answers on the request path: why it answered instead
//! of an endpoint, as an HTTP status and body, or for gRPC as a
//! trailers-only answer whose status says the same; and the rate limit of
//! a destination workload on this node, which answers 429.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::{Either, Full};

use super::forward::{Answer, Call};
use crate::{
    catalog::Endpoint,
    request::rules::{GRPC_DEADLINE_EXCEEDED, GRPC_MESSAGE, GRPC_STATUS, GRPC_UNAVAILABLE},
};

/// How long the caller should wait when `endpoint` is a workload on this
/// node whose rate limit refuses it; None when it may go on.
pub(super) fn rate_limited(call: &Call<'_>, endpoint: &Endpoint) -> Option<Duration> {
    if !endpoint.local {
        return None;
    }
    let catalog = call.ctx.inputs.catalog.load();
    let workload = &catalog.local_target(endpoint.addr)?.workload;
    let limit = workload.rate_limit.as_ref()?;
    let caller = call.source.map(|w| &w.identity);
    let wait = limit.limiter.admit(caller).err()?;
    limit
        .refused
        .get_or_init(|| {
            let metrics = &call.ctx.inputs.metrics.requests;
            metrics.rate_limited(&workload.namespace, &workload.name)
        })
        .inc();
    Some(wait)
}

/// A rate limit's answer: 429 with `Retry-After` in whole seconds (at
/// least 1), or gRPC RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`.
pub(super) fn too_many(grpc: bool, wait: Duration) -> Answer {
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
