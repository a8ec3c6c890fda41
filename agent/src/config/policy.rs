//! Per-service traffic policy: load balancing, health checks, outlier
//! detection, circuit-breaker thresholds, retries and timeouts. The names
//! follow Envoy's and Linkerd's so operators recognise them.

use std::time::Duration;

use super::Spanned;
use serde::Deserialize;

use super::{HumanDuration, Problem, ServiceSpec, unspanned};

/// How a service chooses an endpoint for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Endpoints in turn; weights ignored.
    RoundRobin,
    /// Smooth weighted round robin: exact weights over each cycle.
    WeightedRoundRobin,
    /// Uniformly at random; weights ignored.
    Random,
    /// Power of two choices over in-flight connections (optionally times an
    /// EWMA of connect latency).
    LeastRequest,
    /// Maglev consistent hashing on `hash_key`.
    ConsistentHash,
}

/// What consistent hashing hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    /// The calling workload's name: each workload sticks to one endpoint.
    SourceWorkload,
    /// The client's IP address.
    SourceAddress,
}

/// `load_balancer` block of a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadBalancer {
    pub policy: Spanned<Policy>,
    /// least_request only: weigh in-flight connections by an EWMA of
    /// connect latency (Linkerd's cost).
    pub ewma: bool,
    /// consistent_hash only (and required there).
    pub hash_key: Option<HashKey>,
    /// Prefer endpoints on this node, then this zone; spill over only when
    /// none of them is eligible.
    pub locality: bool,
}

impl Default for LoadBalancer {
    fn default() -> Self {
        LoadBalancer {
            policy: unspanned(Policy::RoundRobin),
            ewma: false,
            hash_key: None,
            locality: false,
        }
    }
}

/// `health_check` block: active checks, off unless present.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default = "default_hc_interval")]
    pub interval: Spanned<HumanDuration>,
    #[serde(default = "default_hc_timeout")]
    pub timeout: Spanned<HumanDuration>,
    /// Successes in a row that make an unhealthy endpoint healthy.
    #[serde(default = "default_two")]
    pub healthy_threshold: Spanned<u32>,
    /// Failures in a row that make a healthy endpoint unhealthy.
    #[serde(default = "default_three")]
    pub unhealthy_threshold: Spanned<u32>,
    /// Each wait is `interval` plus a random part up to `jitter`, so checks
    /// from many nodes do not align.
    #[serde(default = "default_hc_jitter")]
    pub jitter: HumanDuration,
    /// Check with an HTTP GET instead of a bare TCP connect.
    #[serde(default)]
    pub http: Option<HttpCheck>,
}

/// HTTP GET health check.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub path: Spanned<String>,
    #[serde(default = "default_status")]
    pub expected_status: Spanned<u16>,
}

fn default_hc_interval() -> Spanned<HumanDuration> {
    unspanned(HumanDuration(Duration::from_secs(5)))
}
fn default_hc_timeout() -> Spanned<HumanDuration> {
    unspanned(HumanDuration(Duration::from_secs(1)))
}
fn default_hc_jitter() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_two() -> Spanned<u32> {
    unspanned(2)
}
fn default_three() -> Spanned<u32> {
    unspanned(3)
}
fn default_status() -> Spanned<u16> {
    unspanned(200)
}

/// `outlier_detection` block: passive ejection from observed failures.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierDetection {
    /// Consecutive connect failures or resets that eject an endpoint;
    /// 0 turns outlier detection off.
    pub consecutive_failures: u32,
    /// Ejection time is this times the number of ejections so far...
    pub base_ejection_time: Spanned<HumanDuration>,
    /// ...capped at this.
    pub max_ejection_time: Spanned<HumanDuration>,
    /// Never eject more than this share of a service's endpoints.
    pub max_ejection_percent: Spanned<u32>,
    /// After its ejection time, an endpoint takes at most this many
    /// connections at once (half-open) until one succeeds.
    pub half_open_max_connections: Spanned<u32>,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection_time: unspanned(HumanDuration(Duration::from_secs(30))),
            max_ejection_time: unspanned(HumanDuration(Duration::from_secs(300))),
            max_ejection_percent: unspanned(50),
            half_open_max_connections: unspanned(1),
        }
    }
}

/// `circuit_breakers` block: thresholds over which new connections fail
/// fast instead of queueing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakers {
    /// Open connections to the service.
    pub max_connections: Spanned<u32>,
    /// Upstream connects in progress.
    pub max_pending_connects: Spanned<u32>,
    /// Connect retries in progress.
    pub max_retries: Spanned<u32>,
    /// Requests of a request service (`protocol` http, http2, grpc)
    /// waiting for their answers' heads, every attempt included; more
    /// are answered 503 at once (response flag UO).
    pub max_pending_requests: Spanned<u32>,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        CircuitBreakers {
            max_connections: unspanned(1024),
            max_pending_connects: unspanned(1024),
            max_retries: unspanned(3),
            max_pending_requests: unspanned(1024),
        }
    }
}

/// `retries` block: connect retries (no byte has been sent, so a retry is
/// always safe), to a different endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retries {
    /// Connect attempts per connection, the first included.
    pub max_connect_attempts: Spanned<u32>,
    /// Retries may add at most this percentage to recent (10 s) connects...
    pub budget_percent: Spanned<u32>,
    /// ...plus this many per second, so a quiet service can still retry.
    pub min_retries_per_second: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            max_connect_attempts: unspanned(2),
            budget_percent: unspanned(20),
            min_retries_per_second: 10,
        }
    }
}

/// `timeouts` block.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// One connect attempt; defaults to `agent.connect_timeout`.
    pub connect: Option<Spanned<HumanDuration>>,
    /// No byte either way for this long closes the connection.
    pub idle: Option<Spanned<HumanDuration>>,
    /// Close connections older than this, even when busy.
    pub max_connection_duration: Option<Spanned<HumanDuration>>,
}

/// What to do when no endpoint is eligible (all ejected or unhealthy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Panic {
    /// Route to every endpoint as if all were healthy (Envoy's panic mode).
    #[default]
    RouteToAll,
    /// Refuse new connections until an endpoint is eligible again.
    FailClosed,
}

/// What a proxy-mode service's connects do while the agent is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAgentDown {
    /// Refuse: nothing bypasses the agent's encryption and policy.
    FailClosed,
    /// Connect around the agent, unencrypted: to an endpoint of the last
    /// eligible set, balanced by the kernel.
    FailOpen,
}

impl OnAgentDown {
    /// The default: encrypted modes fail closed, plaintext fails open.
    pub fn default_for(mode: super::Mode) -> OnAgentDown {
        match mode {
            super::Mode::Mtls | super::Mode::Permissive => OnAgentDown::FailClosed,
            super::Mode::Plaintext | super::Mode::Kernel => OnAgentDown::FailOpen,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OnAgentDown::FailClosed => "fail_closed",
            OnAgentDown::FailOpen => "fail_open",
        }
    }
}

/// Most connect attempts one connection may make.
pub const MAX_CONNECT_ATTEMPTS: u32 = 10;

/// Default idle timeout when a service sets none.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Adds a problem when `value` is zero.
fn nonzero_duration(problems: &mut Vec<Problem>, at: &str, d: &Spanned<HumanDuration>) {
    if d.value.0.is_zero() {
        problems.push(Problem {
            line: d.referenced.line(),
            field: at.to_owned(),
            message: "must be longer than 0".into(),
        });
    }
}

fn at_least_one(problems: &mut Vec<Problem>, at: &str, v: &Spanned<u32>) {
    if v.value == 0 {
        problems.push(Problem {
            line: v.referenced.line(),
            field: at.to_owned(),
            message: "must be at least 1".into(),
        });
    }
}

/// Checks a `health_check` block; `at` is its field path.
pub(super) fn validate_health_check(problems: &mut Vec<Problem>, at: &str, hc: &HealthCheck) {
    nonzero_duration(problems, &format!("{at}.interval"), &hc.interval);
    nonzero_duration(problems, &format!("{at}.timeout"), &hc.timeout);
    at_least_one(
        problems,
        &format!("{at}.healthy_threshold"),
        &hc.healthy_threshold,
    );
    at_least_one(
        problems,
        &format!("{at}.unhealthy_threshold"),
        &hc.unhealthy_threshold,
    );
    if let Some(http) = &hc.http {
        if !http.path.value.starts_with('/') || http.path.value.contains(char::is_whitespace) {
            problems.push(Problem {
                line: http.path.referenced.line(),
                field: format!("{at}.http.path"),
                message: format!(
                    "`{}` must start with / and contain no spaces",
                    http.path.value
                ),
            });
        }
        if !(100..=599).contains(&http.expected_status.value) {
            problems.push(Problem {
                line: http.expected_status.referenced.line(),
                field: format!("{at}.http.expected_status"),
                message: format!("{} is not an HTTP status", http.expected_status.value),
            });
        }
    }
}

/// Checks one service's policy blocks; `at` is the service's field path.
pub(super) fn validate(problems: &mut Vec<Problem>, at: &str, service: &ServiceSpec) {
    let line = service.name.referenced.line();
    let lb = &service.load_balancer;
    let hc = service.health_check.as_ref();
    let od = &service.outlier_detection;
    let cb = &service.circuit_breakers;
    let retries = &service.retries;
    let timeouts = &service.timeouts;
    let weights_sum: u64 = service
        .endpoints
        .iter()
        .map(|e| u64::from(e.weight.value))
        .sum();
    let policy = lb.policy.value;
    let policy_line = if lb.policy.referenced.line() > 0 {
        lb.policy.referenced.line()
    } else {
        line
    };
    if policy == Policy::ConsistentHash && lb.hash_key.is_none() {
        problems.push(Problem {
            line: policy_line,
            field: format!("{at}.load_balancer.hash_key"),
            message: "consistent_hash needs a hash_key: source_workload or source_address".into(),
        });
    }
    if policy != Policy::ConsistentHash && lb.hash_key.is_some() {
        problems.push(Problem {
            line: policy_line,
            field: format!("{at}.load_balancer.hash_key"),
            message: format!("only consistent_hash uses a hash_key, not {policy:?}"),
        });
    }
    if lb.ewma && policy != Policy::LeastRequest {
        problems.push(Problem {
            line: policy_line,
            field: format!("{at}.load_balancer.ewma"),
            message: "only least_request uses ewma".into(),
        });
    }
    if policy == Policy::WeightedRoundRobin && weights_sum > super::MAX_WEIGHT_SUM {
        problems.push(Problem {
            line: policy_line,
            field: format!("{at}.endpoints"),
            message: format!(
                "weights add up to {weights_sum}; weighted_round_robin allows at most {}",
                super::MAX_WEIGHT_SUM
            ),
        });
    }

    if let Some(hc) = hc {
        validate_health_check(problems, &format!("{at}.health_check"), hc);
    }

    let od_at = format!("{at}.outlier_detection");
    nonzero_duration(
        problems,
        &format!("{od_at}.base_ejection_time"),
        &od.base_ejection_time,
    );
    if od.max_ejection_time.value.0 < od.base_ejection_time.value.0 {
        problems.push(Problem {
            line: od.max_ejection_time.referenced.line(),
            field: format!("{od_at}.max_ejection_time"),
            message: format!(
                "{} is shorter than base_ejection_time ({})",
                od.max_ejection_time.value, od.base_ejection_time.value
            ),
        });
    }
    if od.max_ejection_percent.value > 100 {
        problems.push(Problem {
            line: od.max_ejection_percent.referenced.line(),
            field: format!("{od_at}.max_ejection_percent"),
            message: format!("{} is over 100", od.max_ejection_percent.value),
        });
    }
    at_least_one(
        problems,
        &format!("{od_at}.half_open_max_connections"),
        &od.half_open_max_connections,
    );

    let cb_at = format!("{at}.circuit_breakers");
    at_least_one(
        problems,
        &format!("{cb_at}.max_connections"),
        &cb.max_connections,
    );
    at_least_one(
        problems,
        &format!("{cb_at}.max_pending_connects"),
        &cb.max_pending_connects,
    );
    at_least_one(
        problems,
        &format!("{cb_at}.max_pending_requests"),
        &cb.max_pending_requests,
    );

    at_least_one(
        problems,
        &format!("{at}.retries.max_connect_attempts"),
        &retries.max_connect_attempts,
    );
    if retries.max_connect_attempts.value > MAX_CONNECT_ATTEMPTS {
        problems.push(Problem {
            line: retries.max_connect_attempts.referenced.line(),
            field: format!("{at}.retries.max_connect_attempts"),
            message: format!(
                "{} is over the limit of {MAX_CONNECT_ATTEMPTS}",
                retries.max_connect_attempts.value
            ),
        });
    }
    if retries.budget_percent.value > 100 {
        problems.push(Problem {
            line: retries.budget_percent.referenced.line(),
            field: format!("{at}.retries.budget_percent"),
            message: format!("{} is over 100", retries.budget_percent.value),
        });
    }

    for (name, d) in [
        ("connect", &timeouts.connect),
        ("idle", &timeouts.idle),
        ("max_connection_duration", &timeouts.max_connection_duration),
    ] {
        if let Some(d) = d {
            nonzero_duration(problems, &format!("{at}.timeouts.{name}"), d);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{GOOD, problems};

    #[test]
    fn nonsense_thresholds_are_refused_with_their_lines() {
        let text = GOOD.replace(
            "    port: 8080\n",
            "    port: 8080\n    load_balancer:\n      policy: consistent_hash\n    health_check:\n      \
             interval: 0s\n    outlier_detection:\n      max_ejection_percent: 150\n    retries:\n      \
             budget_percent: 101\n",
        );
        let found = problems(&text);
        let got: Vec<(u64, &str)> = found.iter().map(|p| (p.line, p.field.as_str())).collect();
        assert_eq!(
            got,
            [
                (12, "services[0].load_balancer.hash_key"),
                (14, "services[0].health_check.interval"),
                (16, "services[0].outlier_detection.max_ejection_percent"),
                (18, "services[0].retries.budget_percent"),
            ],
            "{found:?}"
        );
    }
}
