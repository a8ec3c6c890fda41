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
        Policy {
            owner,
            default: a.default,
            allow: compile(&a.allow),
            deny: compile(&a.deny),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
