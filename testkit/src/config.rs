//! The agent's config file as typed builders (config/REFERENCE.md names
//! every field; only the ones the tests and the bench set are here). A
//! config is written as JSON, which is YAML too: the agent reads it as it
//! reads any config file, and nothing is indented by hand.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Serialize, Serializer};

/// The whole file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Config {
    pub node: Node,
    pub agent: Agent,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh: Option<Mesh>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<PeerNode>,
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<Kubernetes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<Audit>,
}

impl Config {
    /// A config for node `name` with its cgroup root, and nothing else.
    pub fn new(name: &str, cgroup_root: &str) -> Config {
        Config {
            node: Node {
                name: name.to_owned(),
                cgroup_root: cgroup_root.to_owned(),
                address: None,
            },
            ..Config::default()
        }
    }

    /// The file's text.
    pub fn text(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config serializes: its maps have string keys")
    }

    /// Writes the file in one rename, so that an agent watching it never
    /// reads half of it.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".new");
        std::fs::write(&tmp, self.text())?;
        std::fs::rename(&tmp, path)
    }
}

/// `node`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Node {
    pub name: String,
    pub cgroup_root: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
}

/// `agent`: unset fields take the agent's defaults.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Agent {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pin_dir: Option<PathBuf>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub connect_timeout: Option<Duration>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub drain_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sockmap: Option<bool>,
}

/// `mesh`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Mesh {
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub inbound_handshake_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificates: Option<Certificates>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnels: Option<Tunnels>,
}

/// `mesh.tunnels`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tunnels {
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_streams_per_connection: Option<usize>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub idle_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_window: Option<u32>,
}

/// `mesh.certificates`: the local CA's lifetime is all the tests change.
#[derive(Debug, Clone, Serialize)]
pub struct Certificates {
    pub local_ca: LocalCa,
}

/// `mesh.certificates.local_ca`.
#[derive(Debug, Clone, Serialize)]
pub struct LocalCa {
    #[serde(serialize_with = "duration")]
    pub lifetime: Duration,
}

/// An entry of `nodes`.
#[derive(Debug, Clone, Serialize)]
pub struct PeerNode {
    pub name: String,
    pub address: IpAddr,
}

/// An entry of `workloads`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Workload {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// A workload's `rate_limit`.
#[derive(Debug, Clone, Serialize)]
pub struct RateLimit {
    pub requests_per_second: u32,
    pub burst: u32,
    pub per_source: bool,
}

impl Workload {
    /// Workload `name` of `namespace`, running as `service_account`.
    pub fn new(name: &str, namespace: &str, service_account: &str) -> Workload {
        Workload {
            name: name.to_owned(),
            namespace: Some(namespace.to_owned()),
            service_account: Some(service_account.to_owned()),
            ..Workload::default()
        }
    }

    /// Its own network namespace (a pod).
    pub fn netns(mut self, path: PathBuf) -> Workload {
        self.netns = Some(path);
        self
    }

    /// Its cgroup, below the node's cgroup root.
    pub fn cgroup(mut self, cgroup: &str) -> Workload {
        self.cgroup = Some(cgroup.to_owned());
        self
    }

    /// Who may reach it.
    pub fn authorization(mut self, authorization: Authorization) -> Workload {
        self.authorization = Some(authorization);
        self
    }

    /// Requests it takes per second.
    pub fn rate_limit(mut self, rate_limit: RateLimit) -> Workload {
        self.rate_limit = Some(rate_limit);
        self
    }
}

/// `authorization` of a workload or service.
#[derive(Debug, Clone, Serialize)]
pub struct Authorization {
    pub default: Decision,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// Rules on requests (request services).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<RequestRule>,
}

/// One of an authorization's `requests` rules.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRule {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    pub decision: Decision,
}

/// What a policy decides.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
}

/// An entry of `services`.
#[derive(Debug, Clone, Serialize)]
pub struct Service {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub address: IpAddr,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// `tcp`, `http`, ...: what the service speaks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_agent_down: Option<OnAgentDown>,
    /// `route_to_all` or `fail_closed`: when no endpoint is eligible.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub panic: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub circuit_breakers: Option<CircuitBreakers>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<Requests>,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    /// Service `namespace/name` at `vip`, with these endpoints (on this
    /// node, weight 1).
    pub fn new(name: &str, namespace: &str, vip: SocketAddr, endpoints: &[SocketAddr]) -> Service {
        Service {
            name: name.to_owned(),
            namespace: Some(namespace.to_owned()),
            address: vip.ip(),
            port: vip.port(),
            mode: None,
            protocol: None,
            on_agent_down: None,
            panic: None,
            load_balancer: None,
            health_check: None,
            outlier_detection: None,
            circuit_breakers: None,
            timeouts: None,
            requests: None,
            endpoints: endpoints.iter().map(|&a| Endpoint::new(a)).collect(),
        }
    }

    /// The virtual address and port.
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    pub fn mode(mut self, mode: Mode) -> Service {
        self.mode = Some(mode);
        self
    }

    pub fn panic(mut self, panic: &str) -> Service {
        self.panic = Some(panic.to_owned());
        self
    }

    pub fn protocol(mut self, protocol: &str) -> Service {
        self.protocol = Some(protocol.to_owned());
        self
    }

    pub fn on_agent_down(mut self, on_agent_down: OnAgentDown) -> Service {
        self.on_agent_down = Some(on_agent_down);
        self
    }

    pub fn load_balancer(mut self, policy: LbPolicy) -> Service {
        self.load_balancer = Some(LoadBalancer { policy });
        self
    }

    pub fn health_check(mut self, health_check: HealthCheck) -> Service {
        self.health_check = Some(health_check);
        self
    }

    pub fn outlier_detection(mut self, outlier_detection: OutlierDetection) -> Service {
        self.outlier_detection = Some(outlier_detection);
        self
    }

    pub fn circuit_breakers(mut self, circuit_breakers: CircuitBreakers) -> Service {
        self.circuit_breakers = Some(circuit_breakers);
        self
    }

    pub fn timeouts(mut self, timeouts: Timeouts) -> Service {
        self.timeouts = Some(timeouts);
        self
    }

    pub fn requests(mut self, requests: Requests) -> Service {
        self.requests = Some(requests);
        self
    }

    /// Gives the endpoints these weights, in order.
    pub fn weights(mut self, weights: &[u32]) -> Service {
        for (endpoint, &w) in self.endpoints.iter_mut().zip(weights) {
            endpoint.weight = Some(w);
        }
        self
    }

    /// Replaces the endpoints.
    pub fn endpoints(mut self, endpoints: Vec<Endpoint>) -> Service {
        self.endpoints = endpoints;
        self
    }
}

/// `mode` of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Mtls,
    Permissive,
    Plaintext,
    Kernel,
}

/// `on_agent_down` of a service.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAgentDown {
    FailOpen,
    FailClosed,
}

/// `load_balancer`.
#[derive(Debug, Clone, Serialize)]
pub struct LoadBalancer {
    pub policy: LbPolicy,
}

/// `load_balancer.policy`.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    RoundRobin,
    WeightedRoundRobin,
    Random,
    LeastRequest,
}

/// `health_check` of a service, or `kubernetes.health_check`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HealthCheck {
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub interval: Option<Duration>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub jitter: Option<Duration>,
}

/// `outlier_detection`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OutlierDetection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub base_ejection_time: Option<Duration>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub max_ejection_time: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

/// `circuit_breakers`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CircuitBreakers {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_connects: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
}

/// `timeouts`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timeouts {
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub connect: Option<Duration>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub idle: Option<Duration>,
}

/// `requests` (request services: http, http2, grpc).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Requests {
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "optional_duration"
    )]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_replay_bytes: Option<u32>,
    /// gRPC status names (`unavailable`, ...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grpc_retry_on: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Fallback>,
}

/// `requests.fallback`: another service, or a fixed answer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fallback {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// An entry of a service's `endpoints`.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

impl Endpoint {
    /// An endpoint at `addr` on this node.
    pub fn new(addr: SocketAddr) -> Endpoint {
        Endpoint {
            address: addr.ip(),
            port: addr.port(),
            weight: None,
            node: None,
            workload: None,
            service_account: None,
        }
    }

    /// The local workload that serves it.
    pub fn workload(mut self, workload: &str) -> Endpoint {
        self.workload = Some(workload.to_owned());
        self
    }

    /// On node `node`, reached over mutual TLS as `service_account`.
    pub fn remote(mut self, node: &str, service_account: Option<&str>) -> Endpoint {
        self.node = Some(node.to_owned());
        self.service_account = service_account.map(str::to_owned);
        self
    }
}

/// `kubernetes`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Kubernetes {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_cgroups: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// `audit`.
#[derive(Debug, Clone, Serialize)]
pub struct Audit {
    pub output: PathBuf,
    /// An access-log line per request (`audit.requests`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub requests: bool,
}

/// A duration as the config writes it: whole milliseconds with their unit.
fn duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}ms", d.as_millis()))
}

fn optional_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => duration(d, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_fields_stay_out_and_durations_carry_their_unit() {
        let vip: SocketAddr = "127.77.0.10:8080".parse().unwrap();
        let backend: SocketAddr = "127.0.0.1:9001".parse().unwrap();
        let mut config = Config::new("test", "sluice-test-x");
        config.services.push(
            Service::new("payments", "payments", vip, &[backend])
                .mode(Mode::Kernel)
                .weights(&[3])
                .timeouts(Timeouts {
                    idle: Some(Duration::from_millis(500)),
                    ..Timeouts::default()
                }),
        );
        let text: serde_json::Value = serde_json::from_str(&config.text()).unwrap();
        assert_eq!(
            text,
            serde_json::json!({
                "node": { "name": "test", "cgroup_root": "sluice-test-x" },
                "agent": {},
                "workloads": [],
                "services": [{
                    "name": "payments", "namespace": "payments",
                    "address": "127.77.0.10", "port": 8080, "mode": "kernel",
                    "timeouts": { "idle": "500ms" },
                    "endpoints": [{ "address": "127.0.0.1", "port": 9001, "weight": 3 }]
                }]
            })
        );
    }
}
