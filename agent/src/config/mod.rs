//! The agent's configuration file, modelled with serde.
//!
//! One [`Config`] is read and validated once ([`Config::load`]) and then
//! passed down. Unknown fields are rejected, defaults live in the `Default`
//! impls below, and [`Config::validate`] reports every problem at once, each
//! with the file, line and field it is about. `config/REFERENCE.md` is the
//! reference; a test checks that it names every field.

mod duration;
pub mod mesh;
pub mod policy;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_saphyr::Spanned;

pub use duration::HumanDuration;
pub use mesh::{Authorization, CertificateSource, Decision, MeshConfig, Mode, PeerNode};
pub use policy::{
    CircuitBreakers, HashKey, HealthCheck, HttpCheck, LoadBalancer, OnAgentDown, OutlierDetection,
    Panic, Policy, Retries, Timeouts,
};

/// What the kernel cannot do for a `mode: kernel` service: it balances by
/// weight or at random at connect time, knows nothing of in-flight counts
/// or the caller's identity.
fn check_kernel_mode(problems: &mut Vec<Problem>, at: &str, s: &ServiceSpec) {
    let policy = &s.load_balancer.policy;
    if matches!(policy.value, Policy::LeastRequest | Policy::ConsistentHash) {
        push(
            problems,
            policy.referenced.line(),
            format!("{at}.load_balancer.policy"),
            "mode: kernel balances with round_robin, weighted_round_robin or random; \
             least_request and consistent_hash need the proxy (use another mode)"
                .into(),
        );
    }
    if let Some(o) = &s.on_agent_down {
        push(
            problems,
            o.referenced.line(),
            format!("{at}.on_agent_down"),
            "mode: kernel keeps working while the agent is down; on_agent_down does not apply"
                .into(),
        );
    }
    if s.authorization.is_some() {
        push(
            problems,
            s.name.referenced.line(),
            format!("{at}.authorization"),
            "mode: kernel connects the caller straight to an endpoint, with no identity, so \
             nothing can be authorized; use mode: mtls (or permissive) for a service with a \
             policy"
                .into(),
        );
    }
}

/// Largest config file accepted; a catalog bigger than this belongs in a
/// discovery source, not a file.
const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

/// Largest sum of endpoint weights weighted_round_robin accepts: its cycle
/// is precomputed, one slot per unit of weight.
pub const MAX_WEIGHT_SUM: u64 = 1 << 20;

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This machine.
    pub node: NodeConfig,
    /// How the agent itself runs.
    #[serde(default)]
    pub agent: AgentConfig,
    /// Processes the agent meshes, each in its own cgroup.
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    /// Services reached through their virtual address.
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Mutual TLS between agents.
    #[serde(default)]
    pub mesh: MeshConfig,
    /// Other nodes whose agents serve endpoints of these services.
    #[serde(default)]
    pub nodes: Vec<PeerNode>,
    /// Discover services, endpoints and this node's pods from the
    /// Kubernetes API server, in addition to the ones listed here.
    #[serde(default)]
    pub kubernetes: Option<KubernetesConfig>,
    /// The audit trail: denials, and optionally every closed connection.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Where this config was read from; used in messages.
    #[serde(skip)]
    pub source: PathBuf,
}

/// The audit trail (one JSON line per event).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// `stdout`, or the path of a file to append to.
    pub output: AuditOutput,
    /// Also one line per closed connection (identities, bytes, duration,
    /// close reason), not only per denial.
    pub connections: bool,
    /// Lines waiting for the writer; beyond it lines are dropped and
    /// counted rather than slowing the data path.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            output: AuditOutput::Stdout,
            connections: false,
            queue: 8192,
        }
    }
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    Stdout,
    File(PathBuf),
}

impl<'de> Deserialize<'de> for AuditOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "stdout" => Ok(AuditOutput::Stdout),
            "" => Err(serde::de::Error::custom(
                "expected `stdout` or the path of a file",
            )),
            path => Ok(AuditOutput::File(PathBuf::from(path))),
        }
    }
}

/// Service discovery from the Kubernetes API server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// A kubeconfig file; none: the in-cluster service account (or
    /// $KUBECONFIG, as kubectl finds it).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The mode of services whose namespace and Service carry no
    /// `sluice.io/mode` annotation; `off` leaves them unmeshed.
    #[serde(default)]
    pub default_mode: KubeMode,
    /// Where pods' cgroups are searched (by pod uid), relative to
    /// `node.cgroup_root`; empty: the root itself.
    #[serde(default)]
    pub pod_cgroups: String,
    /// `namespace/name` of the headless Service over the agents' pods:
    /// its EndpointSlices say on which node each agent runs and at what
    /// address, so one config serves every node.
    #[serde(default = "default_agent_service")]
    pub agent_service: String,
    /// Active health checks for every discovered service (the pods on this
    /// node are probed from inside their namespace; endpoints on other
    /// nodes are their agents' to check). None: no active checks, outlier
    /// detection only.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

fn default_agent_service() -> String {
    "sluice-system/sluice-agents".to_owned()
}

/// A service's mode as annotations and the cluster default give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KubeMode {
    /// Not meshed: the agent leaves the service's traffic alone.
    #[default]
    Off,
    Mtls,
    Permissive,
    Plaintext,
    Kernel,
}

impl KubeMode {
    /// The annotation value as the agent reads it.
    pub fn parse(value: &str) -> Option<KubeMode> {
        Some(match value {
            "off" => KubeMode::Off,
            "mtls" => KubeMode::Mtls,
            "permissive" => KubeMode::Permissive,
            "plaintext" => KubeMode::Plaintext,
            "kernel" => KubeMode::Kernel,
            _ => return None,
        })
    }

    /// The service mode, or none when not meshed.
    pub fn mode(self) -> Option<Mode> {
        match self {
            KubeMode::Off => None,
            KubeMode::Mtls => Some(Mode::Mtls),
            KubeMode::Permissive => Some(Mode::Permissive),
            KubeMode::Plaintext => Some(Mode::Plaintext),
            KubeMode::Kernel => Some(Mode::Kernel),
        }
    }
}

/// This node and where its workloads live.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node name; endpoints name the node they run on.
    pub name: Spanned<String>,
    /// The cgroup the redirect hooks attach to, relative to the cgroup v2
    /// mount. Every workload cgroup lives below it.
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: Spanned<String>,
    /// Zone of this node, for locality-aware load balancing.
    #[serde(default)]
    pub zone: Option<String>,
    /// This node's address: the inbound mTLS listener binds it, and other
    /// nodes dial it.
    #[serde(default = "default_node_address")]
    pub address: IpAddr,
}

fn default_node_address() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

fn default_cgroup_root() -> Spanned<String> {
    unspanned("sluice".to_owned())
}

/// How the agent runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Outbound listener that redirected connections land on (IPv4).
    pub outbound: SocketAddrV4,
    /// Capture listener, opened in each network namespace that holds a
    /// captured workload: inbound connects from outside the namespace are
    /// steered here by the sk_lookup hook (IPv4, a loopback address).
    pub capture: SocketAddrV4,
    /// SO_MARK on the agent's own sockets; the hooks never redirect them.
    pub mark: u32,
    /// bpffs directory where maps and links are pinned.
    pub pin_dir: PathBuf,
    /// Upper bound on one upstream connect.
    pub connect_timeout: HumanDuration,
    /// After SIGTERM, how long open connections may finish before the agent
    /// exits anyway.
    pub drain_timeout: HumanDuration,
    /// Data-plane worker threads.
    pub worker_threads: usize,
    /// Start with the eBPF programs' log events on (switchable at run time).
    pub ebpf_log: bool,
    /// Port of the inbound mTLS listener on `node.address`.
    pub inbound_port: u16,
    /// Where the agent keeps state: the local CA lives in `ca/` below it.
    pub state_dir: PathBuf,
    /// The admin API (health, readiness, metrics, debug views). Loopback
    /// only: its views name workloads and connections, and its traces are
    /// long-lived streams.
    pub admin: Spanned<SocketAddr>,
    /// A listener that serves `/metrics`, `/healthz` and `/readyz` and
    /// nothing else, for Prometheus and kubelet's probes; may be on the
    /// node's address. None: no such listener.
    pub metrics: Option<Spanned<SocketAddr>>,
    /// Removed: kept only so that a config still setting it gets an error
    /// that says what replaced it, rather than "unknown field".
    pub admin_on_node_address: Option<Spanned<bool>>,
    /// Let bytes between a workload and the agent skip the loopback TCP
    /// stack (sockmap + sk_msg).
    pub sockmap: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            outbound: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001),
            capture: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15006),
            mark: 0x51ce,
            pin_dir: PathBuf::from("/sys/fs/bpf/sluice"),
            connect_timeout: HumanDuration(Duration::from_secs(1)),
            drain_timeout: HumanDuration(Duration::from_secs(10)),
            worker_threads: 2,
            ebpf_log: false,
            inbound_port: 15008,
            state_dir: PathBuf::from("/var/lib/sluice"),
            admin: unspanned(SocketAddr::from((Ipv4Addr::LOCALHOST, 15020))),
            metrics: None,
            admin_on_node_address: None,
            sockmap: false,
        }
    }
}

/// Equal when the values are: where in the file a value was written does
/// not matter, so a reload that only moves lines changes nothing.
impl PartialEq for AgentConfig {
    fn eq(&self, other: &Self) -> bool {
        // Destructured without `..`, so that a new field cannot be
        // forgotten here.
        let AgentConfig {
            outbound,
            capture,
            mark,
            pin_dir,
            connect_timeout,
            drain_timeout,
            worker_threads,
            ebpf_log,
            inbound_port,
            state_dir,
            admin,
            metrics,
            admin_on_node_address,
            sockmap,
        } = self;
        *outbound == other.outbound
            && *capture == other.capture
            && *mark == other.mark
            && *pin_dir == other.pin_dir
            && *connect_timeout == other.connect_timeout
            && *drain_timeout == other.drain_timeout
            && *worker_threads == other.worker_threads
            && *ebpf_log == other.ebpf_log
            && *inbound_port == other.inbound_port
            && *state_dir == other.state_dir
            && admin.value == other.admin.value
            && metrics.as_ref().map(|m| m.value) == other.metrics.as_ref().map(|m| m.value)
            && admin_on_node_address.as_ref().map(|a| a.value)
                == other.admin_on_node_address.as_ref().map(|a| a.value)
            && *sockmap == other.sockmap
    }
}

/// One TCP listener the agent opens in the node's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// The config field that sets it, e.g. `agent.metrics`.
    pub field: &'static str,
    pub addr: SocketAddr,
    /// Line of the field in the file; 0 when defaulted or not spanned.
    pub line: u64,
}

impl Listener {
    /// Whether the two cannot both be bound: the same port on the same
    /// address, or on any address when one is the wildcard.
    /// Port 0 is refused on its own, never counted as an overlap.
    fn overlaps(&self, other: &Listener) -> bool {
        self.addr.port() != 0
            && self.addr.port() == other.addr.port()
            && (self.addr.ip() == other.addr.ip()
                || self.addr.ip().is_unspecified()
                || other.addr.ip().is_unspecified())
    }
}

/// A process group the agent meshes: the connect hook knows it by cgroup.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: Spanned<String>,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// cgroup path below `node.cgroup_root`; defaults to the name.
    #[serde(default)]
    pub cgroup: Option<Spanned<String>>,
    /// Who may reach this workload through the inbound listener.
    #[serde(default)]
    pub authorization: Option<Authorization>,
    /// The workload's own network namespace (a pod), as a path such as
    /// /var/run/netns/NAME; none: the agent's namespace.
    #[serde(default)]
    pub netns: Option<Spanned<PathBuf>>,
}

impl WorkloadSpec {
    /// The workload's cgroup, relative to `node.cgroup_root`.
    pub fn cgroup(&self) -> &str {
        self.cgroup.as_ref().map_or(&self.name.value, |c| &c.value)
    }
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// A meshed service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: Spanned<String>,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Virtual address workloads dial.
    pub address: Spanned<IpAddr>,
    pub port: Spanned<u16>,
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub load_balancer: LoadBalancer,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    #[serde(default)]
    pub circuit_breakers: CircuitBreakers,
    #[serde(default)]
    pub retries: Retries,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// When no endpoint is eligible.
    #[serde(default)]
    pub panic: Panic,
    /// How cross-node connections are protected.
    #[serde(default)]
    pub mode: Mode,
    /// What connects do while the agent is down; by default fail_closed for
    /// mtls and permissive, fail_open for plaintext.
    #[serde(default)]
    pub on_agent_down: Option<Spanned<OnAgentDown>>,
    /// Who may reach this service's endpoints on this node.
    #[serde(default)]
    pub authorization: Option<Authorization>,
}

/// One instance behind a service.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    pub address: Spanned<IpAddr>,
    pub port: Spanned<u16>,
    #[serde(default = "default_weight")]
    pub weight: Spanned<u32>,
    /// Node the endpoint runs on; defaults to this node.
    #[serde(default)]
    pub node: Option<String>,
    /// Zone the endpoint runs in; defaults to this node's zone when the
    /// endpoint is on this node.
    #[serde(default)]
    pub zone: Option<String>,
    /// Workload serving this endpoint, when it is one of this node's.
    #[serde(default)]
    pub workload: Option<Spanned<String>>,
    /// Service account the endpoint runs as (namespace: the service's),
    /// for endpoints on other nodes: the identity their agent must present.
    #[serde(default)]
    pub service_account: Option<String>,
    /// The pod behind an endpoint on another node (Kubernetes only): the
    /// identity its agent must present is its service account, read from
    /// the API server the first time a connection goes to it.
    #[serde(default)]
    pub pod: Option<PodRef>,
}

/// A pod, as an EndpointSlice's `targetRef` names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// Tells a pod from a later one of the same name (a StatefulSet's).
    #[serde(default)]
    pub uid: Option<String>,
}

fn default_weight() -> Spanned<u32> {
    unspanned(1)
}

fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned::new(
        value,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: the config file is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge { path: String },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{}", .0)]
    Invalid(Problems),
}

/// Every problem found in one config, in file order.
#[derive(Debug)]
pub struct Problems {
    pub path: String,
    pub items: Vec<Problem>,
}

/// One problem: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the file; 0 when the value was defaulted.
    pub line: u64,
    /// Dotted path of the field, e.g. `services[1].endpoints[0].port`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.items.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}: {}: {}", self.path, p.line, p.field, p.message)?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|error| ConfigError::Read {
            path: display.clone(),
            error,
        })?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge { path: display });
        }
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: display.clone(),
            error,
        })?;
        Config::from_text(&text, path)
    }

    /// Like [`Config::load`], from the text of the file at `path` as read
    /// earlier: Kubernetes discovery applies its changes over the file as
    /// last read, without reading it again for every event.
    pub fn from_text(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let mut config = Config::parse(text, &display)?;
        config.source = path.to_owned();
        config.validate().map_err(|items| {
            ConfigError::Invalid(Problems {
                path: display,
                items,
            })
        })?;
        Ok(config)
    }

    /// Parses YAML text without validating it; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        serde_saphyr::from_str::<Config>(text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            let mut message = bare_message(&e.to_string());
            // Type errors point at a value; name the key it belongs to.
            if let Some(key) = key_on_line(text, line)
                && !message.contains(&format!("`{key}`"))
            {
                message = format!("{key}: {message}");
            }
            ConfigError::Syntax {
                path: origin.to_owned(),
                line,
                column,
                message,
            }
        })
    }

    /// Checks what serde cannot: references, uniqueness, ranges. Returns
    /// every problem, not just the first.
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();

        if self.node.name.value.is_empty() {
            push(
                &mut problems,
                self.node.name.referenced.line(),
                "node.name".into(),
                "must not be empty".into(),
            );
        }
        if let Err(why) = check_cgroup_path(&self.node.cgroup_root.value) {
            push(
                &mut problems,
                self.node.cgroup_root.referenced.line(),
                "node.cgroup_root".into(),
                why,
            );
        }
        if self.agent.outbound.port() == 0 {
            push(
                &mut problems,
                0,
                "agent.outbound".into(),
                "port must not be 0".into(),
            );
        }
        if !self.agent.capture.ip().is_loopback() || self.agent.capture.port() == 0 {
            push(
                &mut problems,
                0,
                "agent.capture".into(),
                "must be a loopback address with a port: it is opened inside each captured \
                 namespace, where only the capture hook may reach it"
                    .into(),
            );
        }
        if self.audit.queue == 0 {
            push(
                &mut problems,
                0,
                "audit.queue".into(),
                "must be at least 1".into(),
            );
        }
        if self.agent.mark == 0 {
            push(
                &mut problems,
                0,
                "agent.mark".into(),
                "must not be 0: unmarked sockets would count as the agent's".into(),
            );
        }
        if self.agent.worker_threads == 0 {
            push(
                &mut problems,
                0,
                "agent.worker_threads".into(),
                "must be at least 1".into(),
            );
        }
        self.check_listeners(&mut problems);

        let mut workload_names: HashMap<&str, usize> = HashMap::new();
        let mut cgroups: HashMap<&str, usize> = HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let line = w.name.referenced.line();
            if w.name.value.is_empty() {
                push(
                    &mut problems,
                    line,
                    format!("workloads[{i}].name"),
                    "must not be empty".into(),
                );
            }
            if let Some(first) = workload_names.insert(&w.name.value, i) {
                push(
                    &mut problems,
                    line,
                    format!("workloads[{i}].name"),
                    format!(
                        "workload `{}` is already defined by workloads[{first}]",
                        w.name.value
                    ),
                );
            }
            if let Some(ns) = &w.netns
                && !ns.value.is_absolute()
            {
                push(
                    &mut problems,
                    ns.referenced.line(),
                    format!("workloads[{i}].netns"),
                    format!(
                        "`{}` is not an absolute path (e.g. /var/run/netns/NAME)",
                        ns.value.display()
                    ),
                );
            }
            let cg_line = w.cgroup.as_ref().map_or(line, |c| c.referenced.line());
            if let Err(why) = check_cgroup_path(w.cgroup()) {
                push(
                    &mut problems,
                    cg_line,
                    format!("workloads[{i}].cgroup"),
                    why,
                );
            }
            if let Some(first) = cgroups.insert(w.cgroup(), i) {
                push(
                    &mut problems,
                    cg_line,
                    format!("workloads[{i}].cgroup"),
                    format!(
                        "cgroup `{}` is already used by workloads[{first}]; the agent \
                         could not tell the two workloads apart",
                        w.cgroup()
                    ),
                );
            }
        }

        let mut vips: HashMap<(IpAddr, u16), usize> = HashMap::new();
        let mut names: HashSet<(&str, &str)> = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("services[{i}]");
            if s.name.value.is_empty() {
                push(
                    &mut problems,
                    s.name.referenced.line(),
                    format!("{at}.name"),
                    "must not be empty".into(),
                );
            }
            if !names.insert((&s.namespace, &s.name.value)) {
                push(
                    &mut problems,
                    s.name.referenced.line(),
                    format!("{at}.name"),
                    format!(
                        "service `{}/{}` is defined twice",
                        s.namespace, s.name.value
                    ),
                );
            }
            let addr_line = s.address.referenced.line();
            match s.address.value {
                IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => push(
                    &mut problems,
                    addr_line,
                    format!("{at}.address"),
                    format!(
                        "{v6} is an IPv4 address in IPv6 form; write it as {} (IPv6 sockets \
                         dialling {v6} reach the service all the same)",
                        v6.to_ipv4_mapped().expect("matched above")
                    ),
                ),
                IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => push(
                    &mut problems,
                    addr_line,
                    format!("{at}.address"),
                    format!("{v6} cannot be a virtual address"),
                ),
                IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() => push(
                    &mut problems,
                    addr_line,
                    format!("{at}.address"),
                    format!("{v4} cannot be a virtual address"),
                ),
                IpAddr::V4(_) | IpAddr::V6(_) => {}
            }
            if s.port.value == 0 {
                push(
                    &mut problems,
                    s.port.referenced.line(),
                    format!("{at}.port"),
                    "must not be 0".into(),
                );
            }
            if s.mode == Mode::Kernel {
                check_kernel_mode(&mut problems, &at, s);
            }
            let vip = (s.address.value, s.port.value);
            // The outbound listener, or its IPv6 twin on [::1].
            if vip.1 == self.agent.outbound.port()
                && (vip.0 == IpAddr::V4(*self.agent.outbound.ip())
                    || vip.0 == IpAddr::V6(std::net::Ipv6Addr::LOCALHOST))
            {
                push(
                    &mut problems,
                    addr_line,
                    format!("{at}.address"),
                    format!("{}:{} is the agent's own outbound listener", vip.0, vip.1),
                );
            }
            if let Some(first) = vips.insert(vip, i) {
                push(
                    &mut problems,
                    addr_line,
                    format!("{at}.address"),
                    format!(
                        "{}:{} is already the address of services[{first}] (`{}`)",
                        vip.0, vip.1, self.services[first].name.value
                    ),
                );
            }
            if s.endpoints.is_empty() {
                push(
                    &mut problems,
                    s.name.referenced.line(),
                    format!("{at}.endpoints"),
                    "a service needs at least one endpoint".into(),
                );
            }
            policy::validate(&mut problems, &at, s);
            let mut seen = HashSet::new();
            for (j, e) in s.endpoints.iter().enumerate() {
                let at = format!("{at}.endpoints[{j}]");
                if e.port.value == 0 {
                    push(
                        &mut problems,
                        e.port.referenced.line(),
                        format!("{at}.port"),
                        "must not be 0".into(),
                    );
                }
                if e.address.value.is_unspecified() {
                    push(
                        &mut problems,
                        e.address.referenced.line(),
                        format!("{at}.address"),
                        format!("{} cannot be dialled", e.address.value),
                    );
                }
                if let IpAddr::V6(v6) = e.address.value
                    && let Some(v4) = v6.to_ipv4_mapped()
                {
                    push(
                        &mut problems,
                        e.address.referenced.line(),
                        format!("{at}.address"),
                        format!("{v6} is an IPv4 address in IPv6 form; write it as {v4}"),
                    );
                } else if e.address.value.is_ipv4() != s.address.value.to_canonical().is_ipv4() {
                    // The kernel's tables (kernel mode, fail_open) cannot
                    // send an IPv4 socket to an IPv6 address; one rule for
                    // every mode. A dual-stack service is two services.
                    push(
                        &mut problems,
                        e.address.referenced.line(),
                        format!("{at}.address"),
                        format!(
                            "{} is not of the family of the service's address {}; a dual-stack \
                             service is two services, one per family",
                            e.address.value, s.address.value
                        ),
                    );
                }
                if e.weight.value == 0 {
                    push(
                        &mut problems,
                        e.weight.referenced.line(),
                        format!("{at}.weight"),
                        "must be at least 1 (remove the endpoint to send it nothing)".into(),
                    );
                }
                if !seen.insert((e.address.value, e.port.value)) {
                    push(
                        &mut problems,
                        e.address.referenced.line(),
                        format!("{at}.address"),
                        format!(
                            "{}:{} is listed twice in this service",
                            e.address.value, e.port.value
                        ),
                    );
                }
                if let Some(w) = &e.workload
                    && !workload_names.contains_key(w.value.as_str())
                {
                    push(
                        &mut problems,
                        w.referenced.line(),
                        format!("{at}.workload"),
                        format!("unknown workload `{}`; define it under workloads", w.value),
                    );
                }
            }
        }

        mesh::validate(&mut problems, self);

        if problems.is_empty() {
            Ok(())
        } else {
            problems.sort_by_key(|p| p.line);
            Err(problems)
        }
    }

    /// The address of the inbound mTLS listener.
    pub fn inbound_address(&self) -> SocketAddr {
        SocketAddr::new(self.node.address, self.agent.inbound_port)
    }

    /// Every TCP listener the agent opens in the node's network namespace
    /// (the outbound listeners inside pods' namespaces are not the node's).
    pub fn listeners(&self) -> Vec<Listener> {
        let mut listeners = vec![
            Listener {
                field: "agent.outbound",
                addr: SocketAddr::V4(self.agent.outbound),
                line: 0,
            },
            Listener {
                field: "agent.capture",
                addr: SocketAddr::V4(self.agent.capture),
                line: 0,
            },
            Listener {
                field: "agent.inbound_port",
                addr: self.inbound_address(),
                line: 0,
            },
            Listener {
                field: "agent.admin",
                addr: self.agent.admin.value,
                line: self.agent.admin.referenced.line(),
            },
        ];
        if let Some(metrics) = &self.agent.metrics {
            listeners.push(Listener {
                field: "agent.metrics",
                addr: metrics.value,
                line: metrics.referenced.line(),
            });
        }
        listeners
    }

    /// The admin API on loopback only, the metrics listener on a port of
    /// its own, and no two listeners on one port.
    fn check_listeners(&self, problems: &mut Vec<Problem>) {
        let admin = &self.agent.admin;
        if !admin.value.ip().to_canonical().is_loopback() {
            push(
                problems,
                admin.referenced.line(),
                "agent.admin".into(),
                format!(
                    "{} is not a loopback address: the admin API shows connections, \
                     workloads and endpoints and streams traces, so it listens on \
                     127.0.0.1 or ::1 only; serve /metrics, /healthz and /readyz to \
                     the network with agent.metrics (e.g. 0.0.0.0:15090)",
                    admin.value
                ),
            );
        }
        if let Some(old) = &self.agent.admin_on_node_address {
            push(
                problems,
                old.referenced.line(),
                "agent.admin_on_node_address".into(),
                "was removed: the admin API listens on loopback only; delete this line \
                 and set agent.metrics (e.g. 0.0.0.0:15090) to serve /metrics, /healthz \
                 and /readyz on the node's address"
                    .into(),
            );
        }
        if let Some(metrics) = &self.agent.metrics
            && metrics.value.port() == 0
        {
            push(
                problems,
                metrics.referenced.line(),
                "agent.metrics".into(),
                "port must not be 0: Prometheus and the probes need to know it".into(),
            );
        }
        let listeners = self.listeners();
        for (i, later) in listeners.iter().enumerate() {
            if let Some(first) = listeners[..i].iter().find(|l| l.overlaps(later)) {
                push(
                    problems,
                    later.line,
                    later.field.into(),
                    format!(
                        "{} overlaps {} ({}): two listeners cannot share a port on one address",
                        later.addr, first.field, first.addr
                    ),
                );
            }
        }
    }

    /// The workload named `name`, if the config defines it.
    pub fn workload(&self, name: &str) -> Option<&WorkloadSpec> {
        self.workloads.iter().find(|w| w.name.value == name)
    }
}

fn push(problems: &mut Vec<Problem>, line: u64, field: String, message: String) {
    problems.push(Problem {
        line,
        field,
        message,
    });
}

/// A cgroup path must stay below its parent: relative, no `..`, no empties.
fn check_cgroup_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("must not be empty".into());
    }
    if path.starts_with('/') {
        return Err(format!(
            "`{path}` must be relative (to the cgroup v2 mount or node.cgroup_root)"
        ));
    }
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!(
            "`{path}` must not contain empty, `.` or `..` components"
        ));
    }
    Ok(())
}

/// The mapping key written on 1-based `line` of `text`, if any
/// (`  - port: x` -> `port`).
fn key_on_line(text: &str, line: u64) -> Option<&str> {
    let l = text
        .lines()
        .nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let l = l.trim_start().trim_start_matches("- ").trim_start();
    let (key, _) = l.split_once(':')?;
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then_some(key)
}

/// The parser's message without its own `error: line L column C:` prefix
/// and snippet, since [`ConfigError::Syntax`] says where.
fn bare_message(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message).trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    if let Some(rest) = first.strip_prefix("line ")
        && let Some((_, after)) = rest.split_once(": ")
        && rest.contains(" column ")
    {
        return after.to_owned();
    }
    first.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
node:
  name: local
workloads:
  - name: checkout
    namespace: payments
    service_account: checkout
services:
  - name: payments
    address: 10.96.0.10
    port: 8080
    endpoints:
      - address: 127.0.0.1
        port: 9001
      - address: 127.0.0.1
        port: 9002
        weight: 3
        workload: checkout
";

    fn problems(text: &str) -> Vec<Problem> {
        Config::parse(text, "t.yaml")
            .expect("parses")
            .validate()
            .expect_err("must be invalid")
    }

    #[test]
    fn ipv6_services_are_accepted_with_endpoints_of_their_family_only() {
        let ok = GOOD
            .replace("10.96.0.10", "\"fd00:96::10\"")
            .replace("127.0.0.1", "\"::1\"");
        Config::parse(&ok, "t.yaml").unwrap().validate().unwrap();
        let ok = format!("{ok}    mode: kernel\n");
        Config::parse(&ok, "t.yaml").unwrap().validate().unwrap();

        // One service, one family: an IPv4 endpoint of an IPv6 service.
        let mixed = GOOD.replace("10.96.0.10", "\"fd00:96::10\"");
        let found = problems(&mixed);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].field, "services[0].endpoints[0].address");
        assert_eq!(found[0].line, 12);
        assert!(found[0].message.contains("two services"), "{found:?}");

        // An IPv4 address in IPv6 form is refused, naming its IPv4 form:
        // the maps have one key per address, and IPv6 sockets dialling
        // the v4-mapped form reach the IPv4 service anyway.
        let mapped = GOOD.replace("10.96.0.10", "\"::ffff:10.96.0.10\"");
        let found = problems(&mapped);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].field, "services[0].address");
        assert!(
            found[0].message.contains("write it as 10.96.0.10"),
            "{found:?}"
        );
        let own = GOOD
            .replace("10.96.0.10", "\"::1\"")
            .replace("port: 8080", "port: 15001");
        let found = problems(&own);
        assert!(
            found
                .iter()
                .any(|p| p.message.contains("agent's own outbound listener")),
            "{found:?}"
        );
        for bad in ["\"::\"", "\"ff02::1\""] {
            let found = problems(&GOOD.replace("10.96.0.10", bad));
            assert!(
                found.iter().any(|p| p.field == "services[0].address"),
                "{bad}: {found:?}"
            );
        }
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD, "t.yaml").unwrap();
        c.validate().unwrap();
        assert_eq!(c.agent.outbound, "127.0.0.1:15001".parse().unwrap());
        assert_eq!(c.node.cgroup_root.value, "sluice");
        assert_eq!(c.workloads[0].cgroup(), "checkout");
        assert_eq!(c.services[0].endpoints[0].weight.value, 1);
        assert_eq!(c.services[0].endpoints[1].weight.value, 3);
        assert_eq!(c.services[0].port.referenced.line(), 10);
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let text = GOOD.replace("    port: 8080\n", "    port: 8080\n    prot: 1\n");
        let err = Config::parse(&text, "t.yaml").unwrap_err().to_string();
        assert!(err.starts_with("t.yaml:11:"), "{err}");
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn type_errors_name_the_key() {
        let text = GOOD.replace("port: 8080", "port: eighty");
        let err = Config::parse(&text, "t.yaml").unwrap_err().to_string();
        assert_eq!(err, "t.yaml:10:11: port: invalid u16");
    }

    #[test]
    fn endpoint_without_port_is_a_syntax_error_with_line() {
        let text = GOOD.replace("        port: 9001\n", "");
        let err = Config::parse(&text, "t.yaml").unwrap_err().to_string();
        assert!(err.contains("port"), "{err}");
        assert!(err.starts_with("t.yaml:12:"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = format!(
            "{GOOD}  - name: ledger\n    address: 10.96.0.10\n    port: 8080\n    endpoints:\n      \
             - address: 127.0.0.1\n        port: 0\n        workload: nobody\n"
        );
        let found = problems(&text);
        let fields: Vec<_> = found.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "services[1].address",
                "services[1].endpoints[0].port",
                "services[1].endpoints[0].workload"
            ],
            "{found:?}"
        );
        assert_eq!(found[0].line, 19);
        assert!(found[0].message.contains("services[0] (`payments`)"));
        assert!(found[2].message.contains("unknown workload `nobody`"));
    }

    /// The reference must name every field serde accepts. The field lists
    /// come from serde itself: an unknown key in each section makes it
    /// answer "expected one of ...".
    #[test]
    fn reference() {
        let reference = include_str!("../../../config/REFERENCE.md");
        let sections = [
            ("top level", format!("{GOOD}zz_unknown: 1\n")),
            (
                "node",
                GOOD.replace("  name: local\n", "  name: local\n  zz_unknown: 1\n"),
            ),
            ("agent", format!("{GOOD}agent:\n  zz_unknown: 1\n")),
            (
                "workloads",
                GOOD.replace(
                    "    namespace: payments\n    service_account",
                    "    zz_unknown: 1\n    namespace: payments\n    service_account",
                ),
            ),
            (
                "services",
                GOOD.replace("    port: 8080\n", "    port: 8080\n    zz_unknown: 1\n"),
            ),
            (
                "endpoints",
                GOOD.replace(
                    "        port: 9001\n",
                    "        port: 9001\n        zz_unknown: 1\n",
                ),
            ),
        ];
        for (section, text) in sections {
            let err = Config::parse(&text, "t.yaml").unwrap_err().to_string();
            let (_, fields) = err
                .split_once("expected one of ")
                .unwrap_or_else(|| panic!("{section}: {err}"));
            let fields: Vec<&str> = fields.split(", ").map(|f| f.trim_matches('`')).collect();
            assert!(fields.len() >= 2, "{section}: {err}");
            for field in fields {
                assert!(
                    reference.contains(&format!("| `{field}` |"))
                        || reference.contains(&format!("## `{field}`")),
                    "config/REFERENCE.md does not describe {section} field `{field}`"
                );
            }
        }
    }

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

    #[test]
    fn all_zero_weights_are_refused() {
        let text = GOOD
            .replace(
                "        port: 9001\n",
                "        port: 9001\n        weight: 0\n",
            )
            .replace("        weight: 3\n", "        weight: 0\n");
        let found = problems(&text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.iter().all(|p| p.field.ends_with(".weight")));
    }

    #[test]
    fn a_non_loopback_admin_address_is_refused_with_its_line() {
        let text = format!("{GOOD}agent:\n  admin: 0.0.0.0:15020\n");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].line, found[0].field.as_str()),
            (19, "agent.admin")
        );
        assert!(found[0].message.contains("agent.metrics"), "{found:?}");
        for ok in ["127.0.0.1:15020", "127.0.0.9:1", "[::1]:15020"] {
            let c = Config::parse(&format!("{GOOD}agent:\n  admin: \"{ok}\"\n"), "t.yaml").unwrap();
            c.validate().unwrap_or_else(|p| panic!("{ok}: {p:?}"));
        }
        // An IPv4-mapped address is what it maps.
        let text = format!("{GOOD}agent:\n  admin: \"[::ffff:10.0.0.1]:15020\"\n");
        assert_eq!(problems(&text)[0].field, "agent.admin");
    }

    #[test]
    fn admin_on_node_address_is_refused_and_names_its_replacement() {
        let text = format!("{GOOD}agent:\n  admin_on_node_address: true\n");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].field, "agent.admin_on_node_address");
        assert_eq!(found[0].line, 19);
        assert!(found[0].message.contains("agent.metrics"), "{found:?}");
    }

    #[test]
    fn metrics_may_listen_on_the_node_but_not_on_another_listeners_port() {
        let c = Config::parse(
            &format!("{GOOD}agent:\n  metrics: 0.0.0.0:15090\n"),
            "t.yaml",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.agent.metrics.as_ref().map(|m| m.value),
            Some("0.0.0.0:15090".parse().unwrap())
        );
        assert_eq!(AgentConfig::default().metrics, None);
        let fields: Vec<&str> = c.listeners().iter().map(|l| l.field).collect();
        assert_eq!(
            fields,
            [
                "agent.outbound",
                "agent.capture",
                "agent.inbound_port",
                "agent.admin",
                "agent.metrics"
            ]
        );

        let text = format!("{GOOD}agent:\n  metrics: 0.0.0.0:15020\n");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].line, found[0].field.as_str()),
            (19, "agent.metrics")
        );
        assert!(
            found[0].message.contains("overlaps agent.admin"),
            "{found:?}"
        );
        let text = format!("{GOOD}agent:\n  metrics: 127.0.0.1:15008\n");
        assert!(problems(&text)[0].message.contains("agent.inbound_port"));
        let text = format!("{GOOD}agent:\n  metrics: 127.0.0.1:0\n");
        assert_eq!(
            problems(&text)[0].message,
            "port must not be 0: Prometheus and the probes need to know it"
        );
    }

    /// A reload compares `agent` sections to warn about restart-only
    /// changes; lines that merely moved are no change.
    #[test]
    fn agent_sections_compare_by_value_not_by_line() {
        let a = Config::parse(&format!("{GOOD}agent:\n  admin: 127.0.0.1:1\n"), "t.yaml").unwrap();
        let b = Config::parse(
            &format!("# moved\n{GOOD}agent:\n  admin: 127.0.0.1:1\n"),
            "t.yaml",
        )
        .unwrap();
        assert_ne!(
            a.agent.admin.referenced.line(),
            b.agent.admin.referenced.line()
        );
        assert_eq!(a.agent, b.agent);
        let c = Config::parse(&format!("{GOOD}agent:\n  admin: 127.0.0.1:2\n"), "t.yaml").unwrap();
        assert_ne!(a.agent, c.agent);
    }

    #[test]
    fn cgroup_paths_cannot_escape() {
        let text = GOOD.replace(
            "    service_account: checkout\n",
            "    service_account: checkout\n    cgroup: ../escape\n",
        );
        let found = problems(&text);
        assert_eq!(found[0].field, "workloads[0].cgroup");
        assert_eq!(found[0].line, 7);
    }
}
