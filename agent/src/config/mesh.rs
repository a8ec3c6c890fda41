//! Mutual TLS between agents: trust domain, certificate source, peer nodes,
//! per-service modes and authorization policies.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use super::Spanned;
use serde::Deserialize;

use super::{Entries, HumanDuration, Problem, unspanned};

/// `mesh` block.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeshConfig {
    /// The SPIFFE trust domain: identities are
    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub trust_domain: Spanned<String>,
    /// Where workload certificates come from.
    pub certificates: CertificateSource,
    /// Accept TLS 1.2 as well as 1.3 (off: TLS 1.3 only).
    pub allow_tls12: bool,
    /// Deadline for a peer's handshake plus preamble on the inbound port.
    pub inbound_handshake_timeout: HumanDuration,
    /// Bounds on handshakes and connections on the inbound port.
    pub inbound_limits: InboundLimitsConfig,
    /// Pooled HTTP/2 tunnels between agents.
    pub tunnels: super::tunnels::TunnelsConfig,
}

/// What peers may hold on the inbound port. Over a connection bound a
/// connection is reset; one that finds no handshake place waits for one
/// within the handshake deadline, else is reset; both count as `overloaded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboundLimitsConfig {
    /// TLS handshakes in flight on the node.
    pub max_handshakes: usize,
    /// TLS handshakes in flight from one source address.
    pub max_handshakes_per_source: usize,
    /// Inbound connections open on the node.
    pub max_connections: usize,
    /// Inbound connections open from one source address (a peer node's
    /// agent carries all of its workloads' connections from one address).
    pub max_connections_per_source: usize,
}

impl Default for InboundLimitsConfig {
    fn default() -> Self {
        InboundLimitsConfig {
            max_handshakes: 256,
            max_handshakes_per_source: 64,
            max_connections: 32_768,
            max_connections_per_source: 16_384,
        }
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            trust_domain: unspanned("cluster.local".to_owned()),
            certificates: CertificateSource::default(),
            allow_tls12: false,
            inbound_handshake_timeout: HumanDuration(Duration::from_secs(5)),
            inbound_limits: InboundLimitsConfig::default(),
            tunnels: super::tunnels::TunnelsConfig::default(),
        }
    }
}

/// Where certificates come from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum CertificateSource {
    /// The agent issues them from a CA in `agent.state_dir/ca`
    /// (`sluice ca init` writes one; the agent makes one if none exists).
    LocalCa {
        /// Certificate lifetime; renewed at half of it.
        #[serde(default = "default_lifetime")]
        lifetime: HumanDuration,
    },
    /// PEM files written by cert-manager, Vault or SPIRE: for each identity
    /// `<dir>/<namespace>/<service_account>/tls.crt` and `tls.key`, and a
    /// trust bundle (several roots allowed). Watched and reloaded.
    Files { dir: PathBuf, trust_bundle: PathBuf },
}

fn default_lifetime() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}

impl Default for CertificateSource {
    fn default() -> Self {
        CertificateSource::LocalCa {
            lifetime: default_lifetime(),
        }
    }
}

/// Another node's agent, reached on `agent.inbound_port` at `address`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerNode {
    pub name: Spanned<String>,
    pub address: IpAddr,
}

impl PeerNode {
    /// A node no file lists (one whose agent discovery found): no location.
    pub fn new(name: String, address: IpAddr) -> PeerNode {
        PeerNode {
            name: unspanned(name),
            address,
        }
    }
}

/// How a service's traffic between nodes is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Cross-node connections always go over mutual TLS.
    #[default]
    Mtls,
    /// Mutual TLS where the peer's agent and identity are known, plain
    /// otherwise (for migration).
    Permissive,
    /// Never encrypted by the agent.
    Plaintext,
    /// Plaintext, balanced by the kernel at connect time: no proxy hop.
    Kernel,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Mtls => "mtls",
            Mode::Permissive => "permissive",
            Mode::Plaintext => "plaintext",
            Mode::Kernel => "kernel",
        }
    }
}

/// Who may reach a workload (or a service's local endpoints). Deny rules
/// win, then allow rules, then the default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    #[serde(default)]
    pub default: Decision,
    /// Patterns: `spiffe://TD/ns/NS/sa/SA` (one identity),
    /// `spiffe://TD/ns/NS/*` (a namespace), `spiffe://TD/*` (the domain).
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
    /// Rules on requests (services with protocol http, http2 or grpc):
    /// the first that matches a request decides it; none: the caller's
    /// connection-level decision stands.
    #[serde(default)]
    pub requests: Vec<super::requests::RequestRule>,
    /// Whose `requests` rules these are when several policies were joined
    /// (the SluicePolicies selecting one pod): each policy's name and its
    /// number of rules, in order. Each policy's rules decide on their own
    /// (the first of its rules that matches), and every policy whose rule
    /// matched must allow. Empty: all the rules are one policy's, the
    /// owner's.
    #[serde(skip)]
    pub request_sources: Vec<(String, usize)>,
}

impl Authorization {
    /// Rules no file wrote (a SluicePolicy's): no locations.
    pub fn new(
        default: Decision,
        allow: impl IntoIterator<Item = String>,
        deny: impl IntoIterator<Item = String>,
    ) -> Authorization {
        Authorization {
            default,
            allow: allow.into_iter().map(unspanned).collect(),
            deny: deny.into_iter().map(unspanned).collect(),
            requests: Vec::new(),
            request_sources: Vec::new(),
        }
    }
}

/// An authorization outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    #[default]
    Deny,
}

/// A DNS-label-like name: what Kubernetes allows for namespaces and
/// service accounts, and what an identity may carry.
pub fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A trust domain: dot-separated labels.
pub fn is_trust_domain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.split('.').all(is_label)
}

/// Checks an authorization pattern against the trust domain: one of the
/// three forms, in that domain. The error says which rule it breaks. Shared
/// by the config file and by SluicePolicy objects (`discovery::policy`), so
/// both accept exactly the same patterns.
pub fn check_pattern(pattern: &str, trust_domain: &str) -> Result<(), String> {
    let rest = pattern
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("`{pattern}` must start with spiffe://"))?;
    let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
    if td != trust_domain {
        return Err(format!(
            "`{pattern}` is in trust domain `{td}`, not `{trust_domain}`: it could never match"
        ));
    }
    let parts: Vec<&str> = path.split('/').collect();
    let ok = match parts.as_slice() {
        ["*"] => true,
        ["ns", ns, "*"] => is_label(ns),
        ["ns", ns, "sa", sa] => is_label(ns) && is_label(sa),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{pattern}` is not spiffe://TD/ns/NS/sa/SA, spiffe://TD/ns/NS/* or spiffe://TD/*"
        ))
    }
}

fn check_authorization(
    problems: &mut Vec<Problem>,
    at: &str,
    authz: &Authorization,
    trust_domain: &str,
) {
    for (list, rules) in [("allow", &authz.allow), ("deny", &authz.deny)] {
        for (k, rule) in rules.iter().enumerate() {
            if let Err(message) = check_pattern(&rule.value, trust_domain) {
                problems.push(Problem {
                    line: rule.referenced.line(),
                    field: format!("{at}.authorization.{list}[{k}]"),
                    message,
                });
            }
        }
    }
    let at = format!("{at}.authorization");
    super::requests::validate_request_rules(problems, &at, &authz.requests, trust_domain);
}

/// Checks the mesh settings, peer nodes, modes and policies.
pub(super) fn validate(problems: &mut Vec<Problem>, entries: &Entries) {
    let config = entries.file;
    let td = &config.mesh.trust_domain;
    if !is_trust_domain(&td.value) {
        problems.push(Problem {
            line: td.referenced.line(),
            field: "mesh.trust_domain".into(),
            message: format!(
                "`{}` is not a trust domain (lower-case DNS labels separated by dots)",
                td.value
            ),
        });
    }
    if let CertificateSource::LocalCa { lifetime } = &config.mesh.certificates
        && lifetime.0 < Duration::from_secs(2)
    {
        problems.push(Problem {
            line: 0,
            field: "mesh.certificates.local_ca.lifetime".into(),
            message: "must be at least 2s (certificates are renewed at half-life)".into(),
        });
    }
    super::tunnels::check(&config.mesh.tunnels, problems);
    if config.mesh.inbound_handshake_timeout.0.is_zero() {
        problems.push(Problem {
            line: 0,
            field: "mesh.inbound_handshake_timeout".into(),
            message: "must be longer than 0".into(),
        });
    }

    let mut names = std::collections::HashSet::new();
    for (i, n) in entries.nodes().iter().enumerate() {
        if n.name.value == config.node.name.value || !names.insert(n.name.value.as_str()) {
            problems.push(Problem {
                line: n.name.referenced.line(),
                field: format!("nodes[{i}].name"),
                message: format!("node `{}` is defined twice (or is this node)", n.name.value),
            });
        }
    }

    for (i, w) in entries.workloads().iter().enumerate() {
        for (field, value) in [
            ("namespace", &w.namespace),
            ("service_account", &w.service_account),
        ] {
            if !is_label(value) {
                problems.push(Problem {
                    line: w.name.referenced.line(),
                    field: format!("workloads[{i}].{field}"),
                    message: format!(
                        "`{value}` cannot be part of an identity (lower-case letters, digits, -)"
                    ),
                });
            }
        }
        if let Some(a) = &w.authorization {
            check_authorization(problems, &format!("workloads[{i}]"), a, &td.value);
        }
    }

    for (i, s) in entries.services().iter().enumerate() {
        let at = format!("services[{i}]");
        if config.kubernetes.is_none() {
            for (j, e) in s.endpoints.iter().enumerate() {
                if e.pod.is_some() {
                    problems.push(Problem {
                        line: e.address.referenced.line(),
                        field: format!("{at}.endpoints[{j}].pod"),
                        message: "a pod's service account is read from the API server: \
                                  `pod` needs the `kubernetes` section (or give \
                                  `service_account`)"
                            .into(),
                    });
                }
            }
        }
        if let Some(a) = &s.authorization {
            check_authorization(problems, &at, a, &td.value);
        }
        if s.mode != Mode::Mtls {
            continue;
        }
        for (j, e) in s.endpoints.iter().enumerate() {
            let Some(node) = e.node.as_deref().filter(|n| *n != config.node.name.value) else {
                continue;
            };
            let line = e.address.referenced.line();
            if !entries.nodes().iter().any(|n| n.name.value == node) {
                problems.push(Problem {
                    line,
                    field: format!("{at}.endpoints[{j}].node"),
                    message: format!(
                        "node `{node}` is not under `nodes`, so its agent cannot be reached: \
                         service mode mtls would be downgraded (define the node, or set mode: \
                         permissive)"
                    ),
                });
            }
            if e.service_account.is_none() && e.pod.is_none() {
                problems.push(Problem {
                    line,
                    field: format!("{at}.endpoints[{j}].service_account"),
                    message: format!(
                        "an endpoint on node `{node}` of an mtls service needs the service \
                         account it runs as, to verify the peer's identity"
                    ),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(check_pattern("spiffe://td/*", "td").is_ok());
        assert!(check_pattern("spiffe://td/ns/pay/*", "td").is_ok());
        assert!(check_pattern("spiffe://td/ns/pay/sa/checkout", "td").is_ok());
        assert!(
            check_pattern("spiffe://other/*", "td")
                .unwrap_err()
                .contains("could never match")
        );
        assert!(check_pattern("spiffe://td/ns/pay", "td").is_err());
        assert!(check_pattern("td/ns/pay/sa/x", "td").is_err());
        assert!(is_trust_domain("cluster.local"));
        assert!(!is_trust_domain("Cluster.local"));
    }
}
