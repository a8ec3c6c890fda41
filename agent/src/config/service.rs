//! The `services` section: the services workloads reach at a virtual
//! address, and the rules an address, a port and a mode must keep.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use super::Spanned;
use serde::Deserialize;

use super::{
    Authorization, CircuitBreakers, EndpointSpec, Entries, HealthCheck, LoadBalancer, Mode,
    OnAgentDown, OutlierDetection, Panic, Policy, Problem, Requests, Retries, Timeouts, endpoint,
    policy, requests, unspanned, validate::push, workload::default_namespace,
};

/// A meshed service.
#[derive(Debug, Clone, Deserialize)]
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
    /// What the service speaks, as declared (never sniffed): `tcp`
    /// connections are balanced one by one, `http` (HTTP/1.1) requests.
    #[serde(default)]
    pub protocol: Option<Spanned<Protocol>>,
    /// Timeouts and retries of requests (http, http2 and grpc only).
    #[serde(default)]
    pub requests: Option<Spanned<Requests>>,
    /// What connects do while the agent is down; by default fail_closed for
    /// mtls and permissive, fail_open for plaintext.
    #[serde(default)]
    pub on_agent_down: Option<Spanned<OnAgentDown>>,
    /// Who may reach this service's endpoints on this node.
    #[serde(default)]
    pub authorization: Option<Authorization>,
}

impl ServiceSpec {
    /// A service no file lists (one discovery found): no locations, and
    /// every policy block as a file that leaves it out gets it.
    pub fn new(
        name: String,
        namespace: String,
        address: IpAddr,
        port: u16,
        mode: Mode,
        endpoints: Vec<EndpointSpec>,
    ) -> ServiceSpec {
        ServiceSpec {
            name: unspanned(name),
            namespace,
            address: unspanned(address),
            port: unspanned(port),
            endpoints,
            load_balancer: LoadBalancer::default(),
            health_check: None,
            outlier_detection: OutlierDetection::default(),
            circuit_breakers: CircuitBreakers::default(),
            retries: Retries::default(),
            timeouts: Timeouts::default(),
            panic: Panic::default(),
            mode,
            protocol: None,
            requests: None,
            on_agent_down: None,
            authorization: None,
        }
    }

    /// Declares what a service found elsewhere (Kubernetes) speaks.
    pub fn declare_protocol(&mut self, protocol: Protocol) {
        self.protocol = Some(unspanned(protocol));
    }

    /// The declared protocol (`tcp` when none is).
    pub fn protocol(&self) -> Protocol {
        self.protocol.as_ref().map_or(Protocol::Tcp, |p| p.value)
    }
}

/// What a service speaks (issue 17). Declared per service, never sniffed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Bytes: each connection is balanced once, at its connect.
    #[default]
    Tcp,
    /// HTTP/1.1: each request is balanced on its own, and a 5xx answer
    /// counts against its endpoint.
    Http,
    /// HTTP/2 with prior knowledge (h2c): each request (stream) is
    /// balanced on its own.
    Http2,
    /// gRPC over HTTP/2: as http2, and a call's `grpc-status` counts
    /// (UNAVAILABLE, INTERNAL and others are failures of the endpoint).
    Grpc,
}

/// Each service: a name unique in its namespace, a virtual address and
/// port no other service (nor the agent's outbound listener) holds, at
/// least one endpoint, a policy that makes sense, endpoints that can be
/// dialled (`endpoint::validate`) and name workloads of `workload_names`.
pub(super) fn validate(
    problems: &mut Vec<Problem>,
    entries: &Entries,
    workload_names: &HashMap<&str, usize>,
) {
    let config = entries.file;
    let mut vips: HashMap<(IpAddr, u16), usize> = HashMap::new();
    let mut names: HashSet<(&str, &str)> = HashSet::new();
    for (i, s) in entries.services().iter().enumerate() {
        let at = format!("services[{i}]");
        if s.name.value.is_empty() {
            push(
                problems,
                s.name.referenced.line(),
                format!("{at}.name"),
                "must not be empty".into(),
            );
        }
        if !names.insert((&s.namespace, &s.name.value)) {
            push(
                problems,
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
                problems,
                addr_line,
                format!("{at}.address"),
                format!(
                    "{v6} is an IPv4 address in IPv6 form; write it as {} (IPv6 sockets \
                     dialling {v6} reach the service all the same)",
                    v6.to_ipv4_mapped().expect("matched above")
                ),
            ),
            IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => push(
                problems,
                addr_line,
                format!("{at}.address"),
                format!("{v6} cannot be a virtual address"),
            ),
            IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() => push(
                problems,
                addr_line,
                format!("{at}.address"),
                format!("{v4} cannot be a virtual address"),
            ),
            IpAddr::V4(_) | IpAddr::V6(_) => {}
        }
        if s.port.value == 0 {
            push(
                problems,
                s.port.referenced.line(),
                format!("{at}.port"),
                "must not be 0".into(),
            );
        }
        if s.mode == Mode::Kernel {
            check_kernel_mode(problems, &at, s);
        }
        check_protocol(problems, &at, s);
        if let Some(r) = &s.requests {
            requests::validate(problems, &at, r, s.protocol() != Protocol::Tcp);
        }
        let vip = (s.address.value, s.port.value);
        // The outbound listener, or its IPv6 twin on [::1].
        if vip.1 == config.agent.outbound.port()
            && (vip.0 == IpAddr::V4(*config.agent.outbound.ip())
                || vip.0 == IpAddr::V6(std::net::Ipv6Addr::LOCALHOST))
        {
            push(
                problems,
                addr_line,
                format!("{at}.address"),
                format!("{}:{} is the agent's own outbound listener", vip.0, vip.1),
            );
        }
        if let Some(first) = vips.insert(vip, i) {
            push(
                problems,
                addr_line,
                format!("{at}.address"),
                format!(
                    "{}:{} is already the address of services[{first}] (`{}`)",
                    vip.0,
                    vip.1,
                    entries.services()[first].name.value
                ),
            );
        }
        if s.endpoints.is_empty() {
            push(
                problems,
                s.name.referenced.line(),
                format!("{at}.endpoints"),
                "a service needs at least one endpoint".into(),
            );
        }
        policy::validate(problems, &at, s);
        endpoint::validate(problems, &at, s, workload_names);
    }
    check_fallbacks(problems, entries.services());
}

/// The service a `requests.fallback.service` names, from service `s`:
/// `namespace/name`, or `name` in `s`'s namespace.
pub fn fallback_of<'a>(s: &'a ServiceSpec, named: &'a str) -> (&'a str, &'a str) {
    named.split_once('/').unwrap_or((&s.namespace, named))
}

/// A fallback service exists, is another service, and speaks the same
/// protocol (its answers go back on the caller's connection as they are).
fn check_fallbacks(problems: &mut Vec<Problem>, services: &[&ServiceSpec]) {
    for (i, s) in services.iter().enumerate() {
        let Some(named) = s
            .requests
            .as_ref()
            .and_then(|r| r.fallback.as_ref())
            .and_then(|f| f.service.as_ref())
        else {
            continue;
        };
        let (ns, name) = fallback_of(s, &named.value);
        let target = services
            .iter()
            .find(|t| t.namespace == ns && t.name.value == name);
        let message = match target {
            None => format!("no service {ns}/{name}"),
            Some(t) if std::ptr::eq(*t, *s) => "a service cannot fall back to itself".into(),
            Some(t) if t.protocol() != s.protocol() => format!(
                "{ns}/{name} speaks {:?}, this service {:?}: a fallback must speak the same",
                t.protocol(),
                s.protocol()
            ),
            Some(_) => continue,
        };
        push(
            problems,
            named.referenced.line(),
            format!("services[{i}].requests.fallback.service"),
            message,
        );
    }
}

/// Requests need the proxy: `mode: kernel` has none.
fn check_protocol(problems: &mut Vec<Problem>, at: &str, s: &ServiceSpec) {
    let Some(protocol) = &s.protocol else {
        return;
    };
    if protocol.value != Protocol::Tcp && s.mode == Mode::Kernel {
        push(
            problems,
            protocol.referenced.line(),
            format!("{at}.protocol"),
            "mode: kernel has no proxy to see requests; requests need another mode".to_owned(),
        );
    }
}

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

#[cfg(test)]
mod tests {
    use crate::config::{
        Config,
        tests::{GOOD, problems},
    };

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
}
