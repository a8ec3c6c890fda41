//! Metrics of requests (services that declare `protocol: http`, `http2`
//! or `grpc`), in Istio's vocabulary: `sluice_requests_total` by
//! destination service, response code and its class, `sluice_grpc_requests_total`
//! by `grpc_response_status`, `sluice_request_flags_total`,
//! `sluice_request_duration_seconds` and the sizes of request and response
//! bodies (`sluice_request_bytes`, `sluice_response_bytes`). Each service resolves its handles
//! once ([`RequestCounters`]), a response code's on its first use; a
//! request then only adds to them, with no lock and no allocation.

use std::sync::OnceLock;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// The classes a response code is counted under; `error` is a request
/// that got no response from an endpoint (the agent answered it).
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    destination_service: String,
    destination_service_namespace: String,
    response_code_class: &'static str,
    /// The status the caller got (the agent's own when it answered).
    response_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    destination_service: String,
    destination_service_namespace: String,
    grpc_response_status: u16,
}

/// Response codes counted one by one; others count as 0.
const CODES: std::ops::RangeInclusive<u16> = 100..=599;
/// gRPC's status codes.
const GRPC_STATUSES: u16 = 17;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlagLabels {
    destination_service: String,
    destination_service_namespace: String,
    response_flags: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    destination_service: String,
    destination_service_namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadLabels {
    destination_workload: String,
    destination_workload_namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

/// Why a workload's connection to a request service was closed before its
/// requests were done (the agent's HTTP server refused it).
#[derive(Debug, Clone, Copy)]
pub enum ConnectionRefusal {
    /// Bytes that are no HTTP, or framing that could be read two ways
    /// (conflicting lengths, a bad chunk, a transfer coding not ending in
    /// chunked): 400 and a close.
    Malformed,
    /// A head over the limits: 431 and a close.
    TooLarge,
    /// No complete request head within 10 s.
    HeaderTimeout,
    /// An HTTP/2 peer that broke the protocol or abused it (a reset flood,
    /// a header block over the limit, frames out of place): GOAWAY.
    Http2Protocol,
    /// An HTTP/2 peer that sent PINGs or SETTINGS faster than any client
    /// needs: the connection is cut.
    Http2Flood,
}

impl ConnectionRefusal {
    fn label(self) -> &'static str {
        match self {
            ConnectionRefusal::Malformed => "malformed",
            ConnectionRefusal::TooLarge => "too_large",
            ConnectionRefusal::HeaderTimeout => "header_timeout",
            ConnectionRefusal::Http2Protocol => "http2_protocol",
            ConnectionRefusal::Http2Flood => "http2_flood",
        }
    }
}

/// The request families.
#[derive(Debug)]
pub struct RequestMetrics {
    refusals: Family<RefusalLabels, Counter>,
    flags: Family<FlagLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    grpc: Family<GrpcLabels, Counter>,
    duration: Family<ServiceLabels, Histogram>,
    request_bytes: Family<ServiceLabels, Histogram>,
    response_bytes: Family<ServiceLabels, Histogram>,
    rate_limited: Family<WorkloadLabels, Counter>,
}

/// What the agent did about a request that did not simply get its
/// endpoint's answer, in Envoy's and Istio's letters (`response_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ResponseFlag {
    /// The endpoint's answer, as it came.
    None,
    /// No healthy upstream: no endpoint was eligible.
    NoHealthyUpstream,
    /// Upstream connection failure: none could be made.
    UpstreamConnectionFailure,
    /// Upstream request timeout: no answer within the deadline.
    UpstreamTimeout,
    /// Upstream connection termination: it broke before an answer.
    UpstreamTermination,
    /// Rate limited by the destination workload's `rate_limit`.
    RateLimited,
    /// Unauthorized: the destination workload's authorization refused.
    Unauthorized,
    /// Answered by the service's fallback (Sluice's own letters).
    Fallback,
    /// Upstream overflow: a circuit breaker failed it fast
    /// (`max_pending_requests`).
    UpstreamOverflow,
}

impl ResponseFlag {
    const ALL: [ResponseFlag; 9] = [
        ResponseFlag::None,
        ResponseFlag::NoHealthyUpstream,
        ResponseFlag::UpstreamConnectionFailure,
        ResponseFlag::UpstreamTimeout,
        ResponseFlag::UpstreamTermination,
        ResponseFlag::RateLimited,
        ResponseFlag::Unauthorized,
        ResponseFlag::Fallback,
        ResponseFlag::UpstreamOverflow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamConnectionFailure => "UF",
            ResponseFlag::UpstreamTimeout => "UT",
            ResponseFlag::UpstreamTermination => "UC",
            ResponseFlag::RateLimited => "RL",
            ResponseFlag::Unauthorized => "UAEX",
            ResponseFlag::Fallback => "FB",
            ResponseFlag::UpstreamOverflow => "UO",
        }
    }

    pub fn from_u8(n: u8) -> ResponseFlag {
        ResponseFlag::ALL
            .get(usize::from(n))
            .copied()
            .unwrap_or(ResponseFlag::None)
    }
}

/// One service's handles.
#[derive(Debug)]
pub struct RequestCounters {
    family: Family<RequestLabels, Counter>,
    service: (String, String),
    /// By response code and whether an endpoint answered, resolved on
    /// first use.
    by_code: Box<[[OnceLock<Counter>; 2]]>,
    by_flag: [Counter; ResponseFlag::ALL.len()],
    /// gRPC services only.
    by_grpc: Vec<Counter>,
    duration: Histogram,
    /// Body sizes, in bytes.
    pub request_bytes: Histogram,
    pub response_bytes: Histogram,
}

impl RequestCounters {
    /// Counts a request answered `code` after `seconds`, by its endpoint
    /// or (`by_endpoint` false) by the agent itself (class `error`).
    pub fn answered(&self, code: u16, by_endpoint: bool, seconds: f64) {
        let code = if CODES.contains(&code) { code } else { 0 };
        let slot = usize::from(code.saturating_sub(*CODES.start()));
        let class = match (by_endpoint, code) {
            (true, 100..=599) => CLASSES[usize::from(code / 100 - 1)],
            _ => CLASSES[CLASSES.len() - 1],
        };
        let counter = self.by_code[slot][usize::from(by_endpoint)].get_or_init(|| {
            let (name, namespace) = &self.service;
            let labels = RequestLabels {
                destination_service: name.clone(),
                destination_service_namespace: namespace.clone(),
                response_code_class: class,
                response_code: code,
            };
            self.family.get_or_create(&labels).clone()
        });
        counter.inc();
        self.duration.observe(seconds);
    }

    /// Counts a gRPC call that ended with `status`.
    pub fn grpc(&self, status: u16) {
        if let Some(counter) = self.by_grpc.get(usize::from(status)) {
            counter.inc();
        }
    }

    /// Counts a request the agent did something about.
    pub fn flagged(&self, flag: ResponseFlag) {
        if flag != ResponseFlag::None {
            self.by_flag[flag as usize].inc();
        }
    }
}

/// 64 B to 16 MiB, by fours.
fn size_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        64.0, 4.0, 10,
    ))
}

fn latency_buckets() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ])
}

impl RequestMetrics {
    pub(super) fn new(registry: &mut Registry) -> RequestMetrics {
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<ServiceLabels, Histogram>::new_with_constructor(
            latency_buckets as fn() -> Histogram,
        );
        registry.register(
            "sluice_requests",
            "Requests to services that declare protocol http, http2 or grpc, by destination service, response code and its class (error: no endpoint answered; the agent did, with response_code the status it sent)",
            requests.clone(),
        );
        registry.register(
            "sluice_request_duration_seconds",
            "Time from a request's head to its response's head, by destination service",
            duration.clone(),
        );
        let sizes = || {
            Family::<ServiceLabels, Histogram>::new_with_constructor(
                size_buckets as fn() -> Histogram,
            )
        };
        let (request_bytes, response_bytes) = (sizes(), sizes());
        registry.register(
            "sluice_request_bytes",
            "Sizes of request bodies as they came from the caller, in bytes, by destination service",
            request_bytes.clone(),
        );
        registry.register(
            "sluice_response_bytes",
            "Sizes of response bodies as they went back to the caller (the endpoint's or the agent's own), in bytes, by destination service",
            response_bytes.clone(),
        );
        let rate_limited = Family::<WorkloadLabels, Counter>::default();
        registry.register(
            "sluice_rate_limited_requests",
            "Requests refused by a workload's rate_limit (429, or gRPC RESOURCE_EXHAUSTED), by destination workload",
            rate_limited.clone(),
        );
        let grpc = Family::<GrpcLabels, Counter>::default();
        registry.register(
            "sluice_grpc_requests",
            "gRPC calls by destination service and grpc_response_status (from a trailers-only answer, or the trailers)",
            grpc.clone(),
        );
        let flags = Family::<FlagLabels, Counter>::default();
        registry.register(
            "sluice_request_flags",
            "Requests the agent answered or handled itself, by destination service and response_flags (UH no eligible endpoint, UF connect failure, UT timeout, UC connection broke, RL rate limited, UAEX unauthorized, FB fallback, UO a circuit breaker's max_pending_requests)",
            flags.clone(),
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "sluice_request_connection_refusals",
            "Workload connections to request services the agent's HTTP server closed, by reason (malformed, too_large, header_timeout, http2_protocol, http2_flood)",
            refusals.clone(),
        );
        RequestMetrics {
            refusals,
            flags,
            grpc,
            requests,
            duration,
            request_bytes,
            response_bytes,
            rate_limited,
        }
    }

    /// Counts a connection the HTTP server refused.
    pub fn refused(&self, why: ConnectionRefusal) {
        let labels = RefusalLabels {
            reason: why.label(),
        };
        self.refusals.get_or_create(&labels).inc();
    }

    /// The count of requests workload `namespace/name`'s rate limit refused.
    pub fn rate_limited(&self, namespace: &str, name: &str) -> Counter {
        let labels = WorkloadLabels {
            destination_workload: name.to_owned(),
            destination_workload_namespace: namespace.to_owned(),
        };
        self.rate_limited.get_or_create(&labels).clone()
    }

    /// The handles of service `namespace/name` (of a gRPC service when
    /// `grpc`).
    pub fn service(&self, namespace: &str, name: &str, grpc: bool) -> RequestCounters {
        let service = ServiceLabels {
            destination_service: name.to_owned(),
            destination_service_namespace: namespace.to_owned(),
        };
        let flag = |f: ResponseFlag| FlagLabels {
            destination_service: name.to_owned(),
            destination_service_namespace: namespace.to_owned(),
            response_flags: f.as_str(),
        };
        let status = |s: u16| GrpcLabels {
            destination_service: name.to_owned(),
            destination_service_namespace: namespace.to_owned(),
            grpc_response_status: s,
        };
        let codes = usize::from(CODES.end() - CODES.start()) + 1;
        RequestCounters {
            family: self.requests.clone(),
            service: (name.to_owned(), namespace.to_owned()),
            by_code: (0..codes).map(|_| Default::default()).collect(),
            by_flag: ResponseFlag::ALL.map(|f| self.flags.get_or_create(&flag(f)).clone()),
            by_grpc: match grpc {
                true => (0..GRPC_STATUSES)
                    .map(|s| self.grpc.get_or_create(&status(s)).clone())
                    .collect(),
                false => Vec::new(),
            },
            duration: self.duration.get_or_create(&service).clone(),
            request_bytes: self.request_bytes.get_or_create(&service).clone(),
            response_bytes: self.response_bytes.get_or_create(&service).clone(),
        }
    }
}
