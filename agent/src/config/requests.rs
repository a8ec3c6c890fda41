//! A request service's `requests` block (issue 17): how long a request may
//! wait for its answer, and which requests may be sent again. Meaningful
//! only for `protocol: http`, `http2` or `grpc`; a service is one route
//! (every path and method of it shares these settings).

use serde::Deserialize;

use super::{HumanDuration, Problem, Spanned, unspanned};

/// Most attempts one request may make (its first included).
pub const MAX_REQUEST_ATTEMPTS: u32 = 5;
/// Largest request body kept for a replay.
pub const MAX_REPLAY_BYTES: u32 = 16 << 20;

/// `requests` block.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Requests {
    /// From the request to its answer's head, across every attempt. A
    /// gRPC caller's shorter `grpc-timeout` wins. None: no limit but the
    /// caller's.
    pub timeout: Option<Spanned<HumanDuration>>,
    /// Attempts per request, the first included. A retry goes to another
    /// endpoint and only when it cannot double an effect (see
    /// `idempotency_header`); every retry is within the service's retry
    /// budget (`retries.budget_percent`).
    pub max_attempts: Spanned<u32>,
    /// A request with this header may be retried whatever its method (the
    /// caller vouches that the server deduplicates it). Without it only
    /// GET, HEAD, OPTIONS, PUT and DELETE are.
    pub idempotency_header: Spanned<String>,
    /// A body longer than this (or of unknown length) is streamed through
    /// and its request is never retried.
    pub max_replay_bytes: Spanned<u32>,
    /// Requests one connection to an endpoint carries before it is closed
    /// (HTTP/1.1: after its last answer; HTTP/2: no new stream, the open
    /// ones finish) and the next request opens another. None: no limit.
    pub max_requests_per_connection: Option<Spanned<u32>>,
    /// gRPC statuses after which a call is retried (a gRPC call is a POST:
    /// it is retried only on the statuses declared here, or when it never
    /// left the agent).
    pub grpc_retry_on: Vec<GrpcCode>,
    /// What answers while no endpoint is eligible (all ejected or
    /// unhealthy): another service, or a fixed answer.
    pub fallback: Option<Spanned<Fallback>>,
}

/// `requests.fallback`: one of `service` or `status`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    /// Another request service of the same protocol: `namespace/name`, or
    /// `name` in the service's own namespace.
    pub service: Option<Spanned<String>>,
    /// A fixed answer's status (gRPC: mapped to a gRPC status).
    pub status: Option<Spanned<u16>>,
    /// Its body (HTTP only).
    #[serde(default)]
    pub body: String,
}

impl Default for Requests {
    fn default() -> Self {
        Requests {
            timeout: None,
            max_attempts: unspanned(2),
            idempotency_header: unspanned("Idempotency-Key".to_owned()),
            max_replay_bytes: unspanned(64 << 10),
            max_requests_per_connection: None,
            grpc_retry_on: Vec::new(),
            fallback: None,
        }
    }
}

/// A workload's `rate_limit`: requests to it on this node, through the
/// request path of `http`, `http2` and `grpc` services.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_second: Spanned<u32>,
    /// Requests that may pass at once (a full bucket); defaults to one
    /// second's worth.
    #[serde(default)]
    pub burst: Option<Spanned<u32>>,
    /// A bucket per caller identity rather than one for all callers.
    #[serde(default)]
    pub per_source: bool,
}

impl RateLimit {
    pub fn burst(&self) -> u32 {
        self.burst
            .as_ref()
            .map_or(*self.requests_per_second.get(), |b| *b.get())
    }
}

/// Checks a workload's `rate_limit`; `at` is the workload's field path.
pub(super) fn validate_rate_limit(problems: &mut Vec<Problem>, at: &str, r: &RateLimit) {
    for (field, value) in [
        ("requests_per_second", Some(&r.requests_per_second)),
        ("burst", r.burst.as_ref()),
    ] {
        if let Some(v) = value.filter(|v| v.value == 0) {
            problems.push(Problem {
                line: v.referenced.line(),
                field: format!("{at}.rate_limit.{field}"),
                message: "must be at least 1".into(),
            });
        }
    }
}

/// One of an `authorization`'s `requests` rules: which requests of which
/// callers it decides. Every field left out matches anything.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestRule {
    /// Caller patterns, as in `allow` and `deny`.
    #[serde(default)]
    pub from: Vec<Spanned<String>>,
    /// Methods, upper case (`GET`, `POST`).
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    /// Paths: exact (`/balance`), or a prefix ending in `*` (`/admin/*`).
    #[serde(default)]
    pub paths: Vec<Spanned<String>>,
    pub decision: super::Decision,
}

/// Checks an `authorization.requests` list; `at` is the authorization's
/// field path.
pub(crate) fn validate_request_rules(
    problems: &mut Vec<Problem>,
    at: &str,
    rules: &[RequestRule],
    trust_domain: &str,
) {
    for (k, rule) in rules.iter().enumerate() {
        let at = format!("{at}.requests[{k}]");
        let mut push = |v: &Spanned<String>, field: &str, i: usize, message: String| {
            problems.push(Problem {
                line: v.referenced.line(),
                field: format!("{at}.{field}[{i}]"),
                message,
            })
        };
        for (i, from) in rule.from.iter().enumerate() {
            if let Err(message) = super::mesh::check_pattern(&from.value, trust_domain) {
                push(from, "from", i, message);
            }
        }
        for (i, method) in rule.methods.iter().enumerate() {
            let token =
                !method.value.is_empty() && method.value.bytes().all(|b| b.is_ascii_uppercase());
            if !token {
                push(
                    method,
                    "methods",
                    i,
                    format!("`{}` is not an upper-case method", method.value),
                );
            }
        }
        for (i, path) in rule.paths.iter().enumerate() {
            let star = path.value.find('*');
            if !path.value.starts_with('/') || star.is_some_and(|s| s + 1 != path.value.len()) {
                push(
                    path,
                    "paths",
                    i,
                    format!(
                        "`{}` is not a path (from /, with * only at its end)",
                        path.value
                    ),
                );
            }
        }
    }
}

/// gRPC status codes a route may declare retryable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpcCode {
    Cancelled = 1,
    Unknown = 2,
    DeadlineExceeded = 4,
    ResourceExhausted = 8,
    Aborted = 10,
    Internal = 13,
    Unavailable = 14,
}

/// Checks a service's `requests` block; `at` is the service's field path,
/// `is_http` whether its protocol has requests at all.
pub(super) fn validate(
    problems: &mut Vec<Problem>,
    at: &str,
    r: &Spanned<Requests>,
    is_http: bool,
) {
    let at = format!("{at}.requests");
    // On a TCP service the block would be silently ignored.
    if !is_http {
        problems.push(Problem {
            line: r.referenced.line(),
            field: at.clone(),
            message: "only requests have these settings: declare protocol http, http2 or grpc"
                .into(),
        });
    }
    let mut push = |line: u64, field: &str, message: String| {
        problems.push(Problem {
            line,
            field: format!("{at}.{field}"),
            message,
        })
    };
    let attempts = &r.max_attempts;
    if !(1..=MAX_REQUEST_ATTEMPTS).contains(&attempts.value) {
        push(
            attempts.referenced.line(),
            "max_attempts",
            format!(
                "{} is not between 1 and {MAX_REQUEST_ATTEMPTS}",
                attempts.value
            ),
        );
    }
    let header = &r.idempotency_header;
    if http::HeaderName::from_bytes(header.value.as_bytes()).is_err() {
        push(
            header.referenced.line(),
            "idempotency_header",
            format!("`{}` is not an HTTP header name", header.value),
        );
    }
    let replay = &r.max_replay_bytes;
    if replay.value > MAX_REPLAY_BYTES {
        push(
            replay.referenced.line(),
            "max_replay_bytes",
            format!("{} is over the limit of {MAX_REPLAY_BYTES}", replay.value),
        );
    }
    if let Some(per) = r
        .max_requests_per_connection
        .as_ref()
        .filter(|p| p.value == 0)
    {
        push(
            per.referenced.line(),
            "max_requests_per_connection",
            "must be at least 1".into(),
        );
    }
    if let Some(fallback) = &r.fallback {
        let line = fallback.referenced.line();
        match (&fallback.service, &fallback.status) {
            (Some(_), None) => {}
            (None, Some(status)) if (100..=599).contains(&status.value) => {}
            (None, Some(status)) => push(
                status.referenced.line(),
                "fallback.status",
                format!("{} is not an HTTP status", status.value),
            ),
            _ => push(
                line,
                "fallback",
                "give one of `service` (another service) or `status` (a fixed answer)".into(),
            ),
        }
    }
    if let Some(timeout) = r.timeout.as_ref().filter(|t| t.value.0.is_zero()) {
        push(
            timeout.referenced.line(),
            "timeout",
            "must be longer than 0".into(),
        );
    }
}
