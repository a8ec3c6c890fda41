//! The valid policies applied to pods: one `authorization` block per
//! selected pod, of the config file's own type; and each policy's last
//! accepted version, kept in force while a later one is refused.

use std::{
    borrow::Borrow,
    collections::{BTreeSet, HashMap, HashSet},
};

use k8s_openapi::api::core::v1::Pod;

use super::{PolicyProblem, PolicySpec, SluicePolicy};
use crate::config::{Authorization, Decision, requests::RateLimit};

/// The policies turned into what the config file would say.
#[derive(Debug, Clone, Default)]
pub struct Compiled {
    /// For each selected pod, as (namespace, pod name), its
    /// `authorization`, patterns sorted and deduplicated. A pod no valid
    /// policy selects is absent.
    pub by_pod: HashMap<(String, String), Authorization>,
    /// For each selected pod with a rate limit, as (namespace, pod name),
    /// the strictest of its policies' `rateLimit`s.
    pub rate_limits: HashMap<(String, String), RateLimit>,
    /// Every problem of every refused policy, ordered by policy, then
    /// field. A refused policy applies to no pod; the others are unaffected.
    /// A policy's first problem is the one its condition reports.
    pub problems: Vec<PolicyProblem>,
}

/// Applies the policies to the pods. A policy selects the pods of its own
/// namespace whose labels contain all of its `matchLabels`. Several
/// policies on one pod combine: allow and deny patterns are unions, and the
/// default is deny if any of them says deny (fail closed); each policy's
/// `requests` rules decide on their own, in the pod's one authorization,
/// and every policy whose rule matches a request must allow it; the
/// `rateLimit` with the fewest requests a second applies (then the
/// smallest burst, then the first policy by namespace/name). Patterns must be
/// of `trust_domain` (the config's `mesh.trust_domain`), as in the file:
/// one of another domain could never match.
pub fn compile<P: Borrow<Pod>>(
    policies: &[SluicePolicy],
    pods: &[P],
    trust_domain: &str,
) -> Compiled {
    let mut ordered: Vec<&SluicePolicy> = policies.iter().collect();
    ordered.sort_by_cached_key(|p| p.key());
    let mut valid: Vec<(&str, String, PolicySpec)> = Vec::new();
    let mut problems = Vec::new();
    for policy in ordered {
        match policy.parse(trust_domain) {
            Ok(spec) => {
                let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
                valid.push((namespace, policy.key(), spec));
            }
            Err(found) => problems.extend(found),
        }
    }

    let mut by_pod = HashMap::new();
    let mut rate_limits = HashMap::new();
    for pod in pods {
        let pod: &Pod = pod.borrow();
        let (Some(namespace), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            continue;
        };
        let labels = pod.metadata.labels.as_ref();
        let selecting: Vec<(&String, &PolicySpec)> = valid
            .iter()
            .filter(|(ns, _, spec)| ns == namespace && spec.selects(labels))
            .map(|(_, key, spec)| (key, spec))
            .collect();
        if selecting.is_empty() {
            continue;
        }
        let mut default = Decision::Allow;
        let mut allow = BTreeSet::new();
        let mut deny = BTreeSet::new();
        let mut requests = Vec::new();
        let mut request_sources = Vec::new();
        for (key, spec) in &selecting {
            if spec.default == Decision::Deny {
                default = Decision::Deny;
            }
            allow.extend(spec.allow.iter().cloned());
            deny.extend(spec.deny.iter().cloned());
            if !spec.requests.is_empty() {
                requests.extend(spec.requests.iter().cloned());
                request_sources.push((format!("sluicepolicy {key}"), spec.requests.len()));
            }
        }
        let pod_key = (namespace.clone(), name.clone());
        let strictest = selecting
            .iter()
            .filter_map(|(_, spec)| spec.rate_limit.as_ref())
            .min_by_key(|r| (*r.requests_per_second.get(), r.burst()));
        if let Some(limit) = strictest {
            rate_limits.insert(pod_key.clone(), limit.clone());
        }
        let mut authorization = Authorization::new(default, allow, deny);
        authorization.requests = requests;
        authorization.request_sources = request_sources;
        by_pod.insert(pod_key, authorization);
    }
    Compiled {
        by_pod,
        rate_limits,
        problems,
    }
}

/// Each policy's last version that passed every check, by uid: a policy
/// edited into an invalid one keeps its last accepted version in force (as
/// a broken config file keeps the running config), rather than leaving
/// the pods it protected open or shut.
#[derive(Debug, Default)]
pub struct Accepted {
    by_uid: HashMap<String, SluicePolicy>,
}

impl Accepted {
    /// The policies to apply: each valid one as it is, each invalid one as
    /// last accepted (if it ever was). Forgets policies that are gone.
    pub fn in_force(&mut self, policies: &[SluicePolicy], trust_domain: &str) -> Vec<SluicePolicy> {
        let mut live = HashSet::new();
        let mut out = Vec::with_capacity(policies.len());
        for policy in policies {
            let Some(uid) = policy.metadata.uid.clone() else {
                continue;
            };
            if policy.parse(trust_domain).is_ok() {
                self.by_uid.insert(uid.clone(), policy.clone());
                out.push(policy.clone());
            } else if let Some(last) = self.by_uid.get(&uid) {
                out.push(last.clone());
            }
            live.insert(uid);
        }
        self.by_uid.retain(|uid, _| live.contains(uid));
        out
    }

    /// Whether an earlier version of this policy is in force.
    pub fn has(&self, policy: &SluicePolicy) -> bool {
        policy
            .metadata
            .uid
            .as_ref()
            .is_some_and(|uid| self.by_uid.contains_key(uid))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        config::{Config, WorkloadSpec},
        discovery::policy::tests::{TD, key, pod, policy, rules},
    };

    #[test]
    fn a_policy_selects_the_pods_of_its_namespace_with_all_its_labels() {
        let policies = [policy(
            "shop",
            "checkout",
            json!({
                "selector": { "matchLabels": { "app": "checkout", "tier": "back" } },
                "allow": ["spiffe://cluster.local/ns/shop/sa/frontend"],
            }),
        )];
        let pods = [
            pod(
                "shop",
                "both",
                json!({ "app": "checkout", "tier": "back", "x": "y" }),
            ),
            pod("shop", "one", json!({ "app": "checkout" })),
            pod("shop", "none", json!({})),
            pod(
                "other",
                "elsewhere",
                json!({ "app": "checkout", "tier": "back" }),
            ),
        ];
        let compiled = compile(&policies, &pods, TD);
        assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
        assert_eq!(
            compiled.by_pod.keys().collect::<Vec<_>>(),
            [&key("shop", "both")]
        );
        assert_eq!(
            rules(&compiled.by_pod[&key("shop", "both")]),
            (
                Decision::Deny,
                vec!["spiffe://cluster.local/ns/shop/sa/frontend"],
                vec![],
            )
        );
    }

    #[test]
    fn no_selector_or_an_empty_one_selects_the_whole_namespace() {
        let policies = [
            policy("shop", "all", json!({ "default": "allow" })),
            policy(
                "shop",
                "empty",
                json!({ "selector": {}, "default": "allow" }),
            ),
        ];
        let pods = [
            pod("shop", "a", json!({ "app": "a" })),
            pod("shop", "b", Value::Null),
        ];
        let compiled = compile(&policies, &pods, TD);
        assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
        assert_eq!(compiled.by_pod.len(), 2);
        assert_eq!(compiled.by_pod[&key("shop", "b")].default, Decision::Allow);
    }

    #[test]
    fn policies_on_one_pod_combine_as_unions_and_deny_wins_the_default() {
        let policies = [
            policy(
                "shop",
                "open",
                json!({
                    "default": "allow",
                    "allow": ["spiffe://cluster.local/ns/shop/*"],
                    "deny": ["spiffe://cluster.local/ns/shop/sa/batch"],
                }),
            ),
            policy(
                "shop",
                "closed",
                json!({
                    "selector": { "matchLabels": { "app": "checkout" } },
                    "default": "deny",
                    "allow": [
                        "spiffe://cluster.local/ns/web/sa/frontend",
                        "spiffe://cluster.local/ns/shop/*",
                    ],
                }),
            ),
        ];
        let pods = [
            pod("shop", "checkout-1", json!({ "app": "checkout" })),
            pod("shop", "cart-1", json!({ "app": "cart" })),
        ];
        let compiled = compile(&policies, &pods, TD);
        assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
        assert_eq!(
            rules(&compiled.by_pod[&key("shop", "checkout-1")]),
            (
                Decision::Deny,
                vec![
                    "spiffe://cluster.local/ns/shop/*",
                    "spiffe://cluster.local/ns/web/sa/frontend",
                ],
                vec!["spiffe://cluster.local/ns/shop/sa/batch"],
            )
        );
        // Only the open policy selects the cart.
        assert_eq!(
            compiled.by_pod[&key("shop", "cart-1")].default,
            Decision::Allow
        );
    }

    #[test]
    fn an_invalid_policy_is_reported_by_field_and_the_valid_one_still_applies() {
        let policies = [
            policy(
                "shop",
                "broken",
                json!({
                    "default": "deny",
                    "allow": [
                        "spiffe://cluster.local/ns/shop/*",
                        "spiffe://cluster.local/ns/shop/sa/frontend",
                        "spiffe://elsewhere/ns/shop/sa/frontend",
                    ],
                    "deny": "spiffe://cluster.local/*",
                }),
            ),
            policy(
                "shop",
                "good",
                json!({
                    "default": "allow",
                    "deny": ["spiffe://cluster.local/ns/shop/sa/batch"],
                }),
            ),
        ];
        let pods = [pod("shop", "checkout-1", json!({}))];
        let compiled = compile(&policies, &pods, TD);
        let fields: Vec<(&str, &str)> = compiled
            .problems
            .iter()
            .map(|p| (p.policy.as_str(), p.field.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("shop/broken", "spec.allow[2]"),
                ("shop/broken", "spec.deny")
            ]
        );
        assert!(compiled.problems[0].message.contains("could never match"));
        assert_eq!(compiled.problems[0].generation, Some(3));
        // The broken policy's deny default is not in force; the good one is.
        assert_eq!(
            rules(&compiled.by_pod[&key("shop", "checkout-1")]),
            (
                Decision::Allow,
                vec![],
                vec!["spiffe://cluster.local/ns/shop/sa/batch"],
            )
        );
    }

    /// Each policy's request rules stay a group of their own in the pod's
    /// authorization, so that one policy's denial wins over another's
    /// allowance whatever their order; the strictest rate limit applies.
    #[test]
    fn request_rules_stay_per_policy_and_the_strictest_rate_limit_applies() {
        let policies = [
            policy(
                "shop",
                "a-admin",
                json!({
                    "default": "allow",
                    "requests": [
                        { "paths": ["/admin/health"], "decision": "allow" },
                        { "paths": ["/admin/*"], "decision": "deny" },
                    ],
                    "rateLimit": { "requestsPerSecond": 200, "perSource": true },
                }),
            ),
            policy(
                "shop",
                "b-no-posts",
                json!({
                    "default": "allow",
                    "requests": [{ "methods": ["POST"], "decision": "deny" }],
                    "rateLimit": { "requestsPerSecond": 100, "burst": 5 },
                }),
            ),
            policy(
                "shop",
                "c-loose",
                json!({
                    "default": "allow",
                    "rateLimit": { "requestsPerSecond": 100, "burst": 50 },
                }),
            ),
        ];
        let compiled = compile(&policies, &[pod("shop", "ledger-1", json!({}))], TD);
        assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
        let ledger = key("shop", "ledger-1");
        let limit = &compiled.rate_limits[&ledger];
        assert_eq!(
            (
                *limit.requests_per_second.get(),
                limit.burst(),
                limit.per_source
            ),
            (100, 5, false)
        );
        let policy =
            crate::authz::Policy::new("workload shop/ledger-1".into(), &compiled.by_pod[&ledger]);
        let caller = crate::tls::Identity::new(TD, "shop", "checkout");
        let decide = |method: http::Method, path: &str| {
            policy
                .evaluate_request(Some(&caller), &method, path)
                .map(|v| (v.allowed, v.rule))
        };
        let by = |name: &str, i: usize| format!("sluicepolicy shop/{name} requests[{i}]");
        assert_eq!(
            decide(http::Method::GET, "/admin/health"),
            Some((true, by("a-admin", 0)))
        );
        assert_eq!(
            decide(http::Method::POST, "/admin/health"),
            Some((false, by("b-no-posts", 0)))
        );
        assert_eq!(
            decide(http::Method::GET, "/admin/keys"),
            Some((false, by("a-admin", 1)))
        );
        assert_eq!(decide(http::Method::GET, "/balance"), None);
        // A pod that no policy with a rate limit selects has none.
        let open = compile(&policies[..0], &[pod("shop", "ledger-1", json!({}))], TD);
        assert!(open.rate_limits.is_empty());
    }

    /// What [`compile`] gives is an `authorization` the config file's own
    /// validation accepts.
    #[test]
    fn the_authorization_reads_and_validates_as_the_config_files() {
        let policies = [policy(
            "shop",
            "p",
            json!({
                "default": "deny",
                "allow": ["spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/*"],
                "deny": ["spiffe://cluster.local/ns/shop/*"],
                "requests": [{ "methods": ["GET"], "paths": ["/balance"], "decision": "allow" }],
                "rateLimit": { "requestsPerSecond": 50 },
            }),
        )];
        let compiled = compile(&policies, &[pod("shop", "checkout-1", json!({}))], TD);
        let authorization = &compiled.by_pod[&key("shop", "checkout-1")];
        assert_eq!(authorization.default, Decision::Deny);
        assert_eq!(authorization.allow.len(), 2);

        let mut config = Config::parse(
            "node:\n  name: n1\nmesh:\n  trust_domain: cluster.local\n",
            "test",
        )
        .unwrap();
        let mut workload = WorkloadSpec::new(
            "checkout-1".into(),
            "shop".into(),
            "default".into(),
            "checkout-1".into(),
            "/proc/1/ns/net".into(),
        );
        workload.authorization = Some(authorization.clone());
        workload.rate_limit = compiled
            .rate_limits
            .get(&key("shop", "checkout-1"))
            .cloned();
        assert!(workload.rate_limit.is_some());
        config.workloads.push(workload);
        assert_eq!(config.validate(), Ok(()));
    }
}
