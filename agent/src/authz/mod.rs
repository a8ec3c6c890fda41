//! Authorization on the inbound path: may this caller identity reach this
//! workload? Evaluated before any byte reaches the workload.

use std::fmt;

use crate::{
    config::Spanned,
    config::{Authorization, Decision},
    tls::Identity,
};

/// One allow or deny pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(Identity),
    Namespace {
        trust_domain: String,
        namespace: String,
    },
    TrustDomain(String),
}

impl Pattern {
    /// Parses a validated pattern (see config::mesh).
    fn parse(text: &str) -> Option<Pattern> {
        let rest = text.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["*"] => Some(Pattern::TrustDomain(td.to_owned())),
            ["ns", ns, "*"] => Some(Pattern::Namespace {
                trust_domain: td.to_owned(),
                namespace: (*ns).to_owned(),
            }),
            ["ns", ns, "sa", sa] => Some(Pattern::Exact(Identity::new(td, ns, sa))),
            _ => None,
        }
    }

    fn matches(&self, id: &Identity) -> bool {
        match self {
            Pattern::Exact(want) => want == id,
            Pattern::Namespace {
                trust_domain,
                namespace,
            } => &id.trust_domain == trust_domain && &id.namespace == namespace,
            Pattern::TrustDomain(td) => &id.trust_domain == td,
        }
    }
}

/// A compiled policy, named after what it protects (for the log).
#[derive(Debug, Clone)]
pub struct Policy {
    owner: String,
    default: Decision,
    allow: Vec<(String, Pattern)>,
    deny: Vec<(String, Pattern)>,
    /// Groups of `requests` rules, each with the name its verdicts give
    /// (a SluicePolicy's, or the owner's): each group decides on its own.
    requests: Vec<(String, Vec<RequestRule>)>,
}

/// A compiled `requests` rule.
#[derive(Debug, Clone)]
struct RequestRule {
    from: Vec<Pattern>,
    methods: Vec<http::Method>,
    /// Exact paths, and prefixes (a rule's path ending in `*`).
    paths: Vec<(String, bool)>,
    allow: bool,
}

impl RequestRule {
    fn compile(rule: &crate::config::requests::RequestRule) -> RequestRule {
        RequestRule {
            from: rule.from.iter().filter_map(|p| Pattern::parse(p)).collect(),
            methods: rule
                .methods
                .iter()
                .filter_map(|m| http::Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            paths: rule
                .paths
                .iter()
                .map(|p| match p.strip_suffix('*') {
                    Some(prefix) => (prefix.to_owned(), true),
                    None => (p.get().clone(), false),
                })
                .collect(),
            allow: rule.decision == Decision::Allow,
        }
    }

    fn matches(&self, caller: Option<&Identity>, method: &http::Method, path: &str) -> bool {
        let from =
            self.from.is_empty() || caller.is_some_and(|c| self.from.iter().any(|p| p.matches(c)));
        let method = self.methods.is_empty() || self.methods.contains(method);
        let path = self.paths.is_empty()
            || self.paths.iter().any(|(p, prefix)| match prefix {
                true => path.starts_with(p.as_str()),
                false => path == p,
            });
        from && method && path
    }
}

/// A decision and the rule that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// e.g. `workload payments/ledger allow[0] spiffe://td/ns/payments/*`.
    pub rule: String,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} by {}",
            if self.allowed { "allowed" } else { "denied" },
            self.rule
        )
    }
}

impl Policy {
    /// Compiles a validated policy; `owner` says whose it is.
    pub fn new(owner: String, a: &Authorization) -> Policy {
        let compile = |rules: &[Spanned<String>]| {
            rules
                .iter()
                .filter_map(|r| Pattern::parse(r).map(|p| (r.get().clone(), p)))
                .collect()
        };
        let mut rules = a.requests.iter().map(RequestRule::compile);
        let requests = match a.request_sources.is_empty() {
            true => vec![(owner.clone(), rules.collect())],
            false => a
                .request_sources
                .iter()
                .map(|(name, n)| (name.clone(), rules.by_ref().take(*n).collect()))
                .collect(),
        };
        Policy {
            owner,
            default: a.default,
            allow: compile(&a.allow),
            deny: compile(&a.deny),
            requests,
        }
    }

    /// Whether it decides single requests (`requests` rules).
    pub fn has_request_rules(&self) -> bool {
        self.request_rules() > 0
    }

    /// How many `requests` rules it has, all groups together.
    pub fn request_rules(&self) -> usize {
        self.requests.iter().map(|(_, rules)| rules.len()).sum()
    }

    /// In each group of `requests` rules, the first rule that matches
    /// this request decides it; a group's denial wins over another's
    /// allowance. None when no rule matches (the connection-level
    /// decision stands).
    pub fn evaluate_request(
        &self,
        caller: Option<&Identity>,
        method: &http::Method,
        path: &str,
    ) -> Option<Verdict> {
        let mut allowed = None;
        for (name, rules) in &self.requests {
            let Some((i, rule)) = rules
                .iter()
                .enumerate()
                .find(|(_, r)| r.matches(caller, method, path))
            else {
                continue;
            };
            let verdict = Verdict {
                allowed: rule.allow,
                rule: format!("{name} requests[{i}]"),
            };
            if !verdict.allowed {
                return Some(verdict);
            }
            allowed.get_or_insert(verdict);
        }
        allowed
    }

    /// Deny rules first, then allow rules, then the default.
    pub fn evaluate(&self, caller: &Identity) -> Verdict {
        let rule = |list: &str, i: usize, text: &str| format!("{} {list}[{i}] {text}", self.owner);
        if let Some((i, (text, _))) = self
            .deny
            .iter()
            .enumerate()
            .find(|(_, (_, p))| p.matches(caller))
        {
            return Verdict {
                allowed: false,
                rule: rule("deny", i, text),
            };
        }
        if let Some((i, (text, _))) = self
            .allow
            .iter()
            .enumerate()
            .find(|(_, (_, p))| p.matches(caller))
        {
            return Verdict {
                allowed: true,
                rule: rule("allow", i, text),
            };
        }
        Verdict {
            allowed: self.default == Decision::Allow,
            rule: format!(
                "{} default {}",
                self.owner,
                if self.default == Decision::Allow {
                    "allow"
                } else {
                    "deny"
                }
            ),
        }
    }
}

/// Every policy that applies must allow; with none, the call is allowed
/// (a workload without a policy is open to every authenticated caller of
/// the trust domain).
pub fn evaluate(policies: &[std::sync::Arc<Policy>], caller: &Identity) -> Verdict {
    let mut last = None;
    for p in policies {
        let v = p.evaluate(caller);
        if !v.allowed {
            return v;
        }
        last = Some(v);
    }
    last.unwrap_or_else(|| Verdict {
        allowed: true,
        rule: "no policy (any identity of the trust domain)".into(),
    })
}

/// A request as the destination's policies see it: each that has a
/// matching `requests` rule must allow it. None: no rule spoke.
pub fn evaluate_request(
    policies: &[std::sync::Arc<Policy>],
    caller: Option<&Identity>,
    method: &http::Method,
    path: &str,
) -> Option<Verdict> {
    let mut last = None;
    for p in policies {
        if let Some(v) = p.evaluate_request(caller, method, path) {
            if !v.allowed {
                return Some(v);
            }
            last = Some(v);
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_rules_match_caller_method_and_path_and_the_first_decides() {
        let p = policy(
            "default: allow\nrequests:\n  - from: [spiffe://td/ns/payments/sa/batch]\n    \
             methods: [POST]\n    decision: deny\n  - paths: [/admin/*]\n    decision: deny\n  \
             - paths: [/balance]\n    methods: [GET]\n    decision: allow\n",
        );
        let batch = Identity::new("td", "payments", "batch");
        let checkout = Identity::new("td", "payments", "checkout");
        let decide = |who: &Identity, m: http::Method, path: &str| {
            p.evaluate_request(Some(who), &m, path)
                .map(|v| (v.allowed, v.rule))
        };
        let rule = |i: usize| format!("workload payments/ledger requests[{i}]");
        assert_eq!(
            decide(&batch, http::Method::POST, "/pay"),
            Some((false, rule(0)))
        );
        assert_eq!(decide(&checkout, http::Method::POST, "/pay"), None);
        assert_eq!(
            decide(&checkout, http::Method::GET, "/admin/keys"),
            Some((false, rule(1)))
        );
        assert_eq!(decide(&checkout, http::Method::GET, "/adminx"), None);
        assert_eq!(
            decide(&batch, http::Method::GET, "/balance"),
            Some((true, rule(2)))
        );
    }

    fn policy(yaml: &str) -> Policy {
        let a: Authorization = serde_saphyr::from_str(yaml).unwrap();
        Policy::new("workload payments/ledger".into(), &a)
    }

    #[test]
    fn deny_then_allow_then_default() {
        let p = policy(
            "default: deny\nallow:\n  - spiffe://td/ns/payments/*\ndeny:\n  - spiffe://td/ns/payments/sa/intruder\n",
        );
        let v = p.evaluate(&Identity::new("td", "payments", "checkout"));
        assert!(v.allowed);
        assert_eq!(
            v.rule,
            "workload payments/ledger allow[0] spiffe://td/ns/payments/*"
        );
        let v = p.evaluate(&Identity::new("td", "payments", "intruder"));
        assert!(!v.allowed);
        assert!(v.rule.contains("deny[0]"));
        let v = p.evaluate(&Identity::new("td", "web", "frontend"));
        assert_eq!(
            v,
            Verdict {
                allowed: false,
                rule: "workload payments/ledger default deny".into()
            }
        );
    }

    #[test]
    fn exact_and_domain_patterns() {
        let p = policy("allow:\n  - spiffe://td/ns/a/sa/b\n");
        assert!(p.evaluate(&Identity::new("td", "a", "b")).allowed);
        assert!(!p.evaluate(&Identity::new("td", "a", "c")).allowed);
        let p = policy("allow:\n  - spiffe://td/*\n");
        assert!(p.evaluate(&Identity::new("td", "x", "y")).allowed);
        assert!(!p.evaluate(&Identity::new("other", "x", "y")).allowed);
    }
}
