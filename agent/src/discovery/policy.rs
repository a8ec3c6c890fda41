//! SluicePolicy (`sluice.io/v1alpha1`, config/kubernetes/policy-crd.yaml):
//! the config file's `authorization` block as a namespaced custom resource
//! that selects pods by label.
//!
//! The watched object keeps its spec as raw JSON: one malformed policy must
//! not break the watch stream of all of them. [`compile`] checks each spec
//! itself, with the same pattern rules as the config file
//! ([`crate::config::mesh::check_pattern`]), turns the valid ones into one
//! `authorization` block per selected pod, and names the field of every
//! problem, for the policy's `Accepted` condition ([`accepted_condition`]).

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
};

use k8s_openapi::{
    NamespaceResourceScope, api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::config::{Decision, mesh::check_pattern};

/// The API group of [`SluicePolicy`].
pub const GROUP: &str = "sluice.io";
/// The served and stored version of [`SluicePolicy`].
pub const VERSION: &str = "v1alpha1";
/// The kind, as in an object's `kind`.
pub const KIND: &str = "SluicePolicy";
/// The resource name, as in RBAC rules and API paths.
pub const PLURAL: &str = "sluicepolicies";
/// At most this many patterns in `allow`, and as many in `deny` (the CRD's
/// `maxItems`).
pub const MAX_PATTERNS: usize = 256;
/// The longest condition message metav1.Condition allows.
const MAX_MESSAGE_BYTES: usize = 32_768;

/// One SluicePolicy object as the API server returns it. `spec` and
/// `status` are not typed on purpose: any JSON reads, so the reflector keeps
/// watching whatever is stored, and [`compile`] says what is wrong.
#[derive(Debug, Clone, Deserialize)]
pub struct SluicePolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// As stored; `Null` when the object has none.
    #[serde(default)]
    pub spec: Value,
    /// As stored; the agents write only its `Accepted` condition.
    #[serde(default)]
    pub status: Option<Value>,
}

/// Serialises with `apiVersion` and `kind`, as the API server expects of a
/// request body.
impl Serialize for SluicePolicy {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            api_version: String,
            kind: &'static str,
            metadata: &'a ObjectMeta,
            spec: &'a Value,
            #[serde(skip_serializing_if = "Option::is_none")]
            status: Option<&'a Value>,
        }
        Wire {
            api_version: format!("{GROUP}/{VERSION}"),
            kind: KIND,
            metadata: &self.metadata,
            spec: &self.spec,
            status: self.status.as_ref(),
        }
        .serialize(serializer)
    }
}

impl kube::Resource for SluicePolicy {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        PLURAL.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl SluicePolicy {
    /// `namespace/name`, how problems and logs name the policy.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or(""),
            self.metadata.name.as_deref().unwrap_or("")
        )
    }

    /// Checks the spec: every problem, each naming its field (`spec.allow[2]`).
    /// Patterns must be of `trust_domain`, as in the config file.
    pub fn parse(&self, trust_domain: &str) -> Result<PolicySpec, Vec<PolicyProblem>> {
        let mut problems = Vec::new();
        let mut problem = |field: String, message: String| {
            problems.push(PolicyProblem {
                policy: self.key(),
                field,
                message,
                generation: self.metadata.generation,
            });
        };
        if self.metadata.namespace.is_none() {
            problem(
                "metadata.namespace".into(),
                "missing: a policy selects pods of its own namespace".into(),
            );
        }
        let Some(spec) = self.spec.as_object() else {
            problem(
                "spec".into(),
                format!("must be a map, not {}", type_name(&self.spec)),
            );
            return Err(problems);
        };
        let mut parsed = PolicySpec {
            match_labels: BTreeMap::new(),
            default: Decision::Deny,
            allow: BTreeSet::new(),
            deny: BTreeSet::new(),
        };
        for (key, value) in spec {
            // A null is what the API server prunes: the same as absent.
            if value.is_null() {
                continue;
            }
            match key.as_str() {
                "selector" => parse_selector(value, &mut parsed.match_labels, &mut problem),
                "default" => match value.as_str() {
                    Some("allow") => parsed.default = Decision::Allow,
                    Some("deny") => parsed.default = Decision::Deny,
                    _ => problem(
                        "spec.default".into(),
                        format!("{value} is neither allow nor deny"),
                    ),
                },
                "allow" | "deny" => {
                    let into = if key == "allow" {
                        &mut parsed.allow
                    } else {
                        &mut parsed.deny
                    };
                    parse_patterns(key, value, trust_domain, into, &mut problem);
                }
                _ => problem(
                    format!("spec.{key}"),
                    "unknown field: a SluicePolicy spec has selector, default, allow and deny"
                        .into(),
                ),
            }
        }
        if problems.is_empty() {
            Ok(parsed)
        } else {
            Err(problems)
        }
    }
}

fn parse_selector(
    value: &Value,
    labels: &mut BTreeMap<String, String>,
    problem: &mut impl FnMut(String, String),
) {
    let Some(selector) = value.as_object() else {
        problem(
            "spec.selector".into(),
            format!("must be a map with matchLabels, not {}", type_name(value)),
        );
        return;
    };
    for (key, value) in selector {
        if value.is_null() {
            continue;
        }
        if key != "matchLabels" {
            problem(
                format!("spec.selector.{key}"),
                "unknown field: a selector has matchLabels only".into(),
            );
            continue;
        }
        let Some(map) = value.as_object() else {
            problem(
                "spec.selector.matchLabels".into(),
                format!("must be a map of label to value, not {}", type_name(value)),
            );
            continue;
        };
        for (label, wanted) in map {
            match wanted.as_str() {
                Some(v) => {
                    labels.insert(label.clone(), v.to_owned());
                }
                None => problem(
                    format!("spec.selector.matchLabels.{label}"),
                    format!(
                        "must be a string (a label value), not {}",
                        type_name(wanted)
                    ),
                ),
            }
        }
    }
}

fn parse_patterns(
    list: &str,
    value: &Value,
    trust_domain: &str,
    into: &mut BTreeSet<String>,
    problem: &mut impl FnMut(String, String),
) {
    let Some(items) = value.as_array() else {
        problem(
            format!("spec.{list}"),
            format!(
                "must be a list of identity patterns, not {}",
                type_name(value)
            ),
        );
        return;
    };
    if items.len() > MAX_PATTERNS {
        problem(
            format!("spec.{list}"),
            format!(
                "has {} patterns; at most {MAX_PATTERNS} (use a namespace pattern, spiffe://TD/ns/NS/*)",
                items.len()
            ),
        );
        return;
    }
    for (i, item) in items.iter().enumerate() {
        let field = format!("spec.{list}[{i}]");
        match item.as_str() {
            Some(pattern) => match check_pattern(pattern, trust_domain) {
                Ok(()) => {
                    into.insert(pattern.to_owned());
                }
                Err(message) => problem(field, message),
            },
            None => problem(
                field,
                format!(
                    "must be a string (an identity pattern), not {}",
                    type_name(item)
                ),
            ),
        }
    }
}

/// How a JSON value's type reads in a message.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

/// A policy whose spec passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    /// A pod of the policy's namespace is selected when its labels contain
    /// all of these; empty selects every pod of the namespace.
    pub match_labels: BTreeMap<String, String>,
    /// For a caller no pattern matches; deny when the spec leaves it out.
    pub default: Decision,
    /// Checked patterns, sorted, without duplicates.
    pub allow: BTreeSet<String>,
    /// Checked patterns, sorted, without duplicates; they win over `allow`.
    pub deny: BTreeSet<String>,
}

impl PolicySpec {
    /// Whether a pod with these labels is selected (the namespace is the
    /// caller's to compare).
    pub fn selects(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
    }
}

/// Why one policy was refused: the policy, the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    /// `namespace/name`.
    pub policy: String,
    /// e.g. `spec.allow[2]`.
    pub field: String,
    /// What is wrong with the field, and what would be right.
    pub message: String,
    /// `metadata.generation` of the refused object, for `observedGeneration`.
    pub generation: Option<i64>,
}

/// The policies turned into what the config file would say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compiled {
    /// For each selected pod, as (namespace, pod name), an `authorization`
    /// block in the config file's shape: `{"default": "allow"|"deny",
    /// "allow": [...], "deny": [...]}`, patterns sorted and deduplicated. A
    /// pod no valid policy selects is absent.
    pub by_pod: HashMap<(String, String), Value>,
    /// Every problem of every refused policy, ordered by policy, then
    /// field. A refused policy applies to no pod; the others are unaffected.
    /// A policy's first problem is the one its condition reports.
    pub problems: Vec<PolicyProblem>,
}

/// Applies the policies to the pods. A policy selects the pods of its own
/// namespace whose labels contain all of its `matchLabels`. Several
/// policies on one pod combine: allow and deny patterns are unions, and the
/// default is deny if any of them says deny (fail closed). Patterns must be
/// of `trust_domain` (the config's `mesh.trust_domain`), as in the file:
/// one of another domain could never match.
pub fn compile<P: std::borrow::Borrow<Pod>>(
    policies: &[SluicePolicy],
    pods: &[P],
    trust_domain: &str,
) -> Compiled {
    let mut ordered: Vec<&SluicePolicy> = policies.iter().collect();
    ordered.sort_by_cached_key(|p| p.key());
    let mut valid: Vec<(&str, PolicySpec)> = Vec::new();
    let mut problems = Vec::new();
    for policy in ordered {
        match policy.parse(trust_domain) {
            Ok(spec) => {
                let namespace = policy.metadata.namespace.as_deref().unwrap_or_default();
                valid.push((namespace, spec));
            }
            Err(found) => problems.extend(found),
        }
    }

    let mut by_pod = HashMap::new();
    for pod in pods {
        let pod: &Pod = pod.borrow();
        let (Some(namespace), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            continue;
        };
        let labels = pod.metadata.labels.as_ref();
        let mut selecting = valid
            .iter()
            .filter(|(ns, spec)| ns == namespace && spec.selects(labels))
            .map(|(_, spec)| spec)
            .peekable();
        if selecting.peek().is_none() {
            continue;
        }
        let mut default = Decision::Allow;
        let mut allow = BTreeSet::new();
        let mut deny = BTreeSet::new();
        for spec in selecting {
            if spec.default == Decision::Deny {
                default = Decision::Deny;
            }
            allow.extend(spec.allow.iter().cloned());
            deny.extend(spec.deny.iter().cloned());
        }
        let default = match default {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        };
        by_pod.insert(
            (namespace.clone(), name.clone()),
            json!({ "default": default, "allow": allow, "deny": deny }),
        );
    }
    Compiled { by_pod, problems }
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
        let mut live = std::collections::HashSet::new();
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

/// The `Accepted` condition each policy should carry and does not yet, as
/// (namespace, name, merge-patch body). `problems` are those of
/// [`compile`]; `kept` tells whether a refused policy's earlier version is
/// still in force (the message says which).
pub fn status_changes(
    policies: &[SluicePolicy],
    problems: &[PolicyProblem],
    kept: impl Fn(&SluicePolicy) -> bool,
    now: &str,
) -> Vec<(String, String, Value)> {
    let mut changes = Vec::new();
    for policy in policies {
        let (Some(ns), Some(name)) = (&policy.metadata.namespace, &policy.metadata.name) else {
            continue;
        };
        let key = policy.key();
        let problem = problems.iter().find(|p| p.policy == key);
        let generation = policy.metadata.generation;
        let mut wanted = accepted_condition(problem, kept(policy), generation, now);
        let mut wanted = wanted["status"]["conditions"][0].take();
        let current = policy
            .status
            .as_ref()
            .and_then(|s| s["conditions"].as_array())
            .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"));
        let same = |field: &str| current.is_some_and(|c| c[field] == wanted[field]);
        if ["status", "reason", "message", "observedGeneration"]
            .iter()
            .all(|f| same(f))
        {
            continue;
        }
        // A condition whose status stays keeps its transition time.
        if same("status")
            && let Some(at) = current.and_then(|c| c.get("lastTransitionTime"))
        {
            wanted["lastTransitionTime"] = at.clone();
        }
        changes.push((
            ns.clone(),
            name.clone(),
            json!({ "status": { "conditions": [wanted] } }),
        ));
    }
    changes
}

/// The body of a JSON merge patch on a policy's `status` subresource that
/// sets its `Accepted` condition: `True`/`Valid` without a problem,
/// `False`/`Invalid` with one, its message naming the field.
/// `kept`: an earlier version of a refused policy stays in force (the
/// message says so). `generation` is the policy's `metadata.generation`
/// the verdict is about;
/// `now` is an RFC 3339 time for `lastTransitionTime` (pass the condition's
/// previous time when its status did not change, as metav1.Condition
/// means). A merge patch replaces the whole list; Accepted is the only
/// condition.
pub fn accepted_condition(
    problem: Option<&PolicyProblem>,
    kept: bool,
    generation: Option<i64>,
    now: &str,
) -> Value {
    let (status, reason, message) = match problem {
        None => (
            "True",
            "Valid",
            "the policy is valid and applies to the pods it selects".to_owned(),
        ),
        Some(p) => (
            "False",
            "Invalid",
            format!(
                "{}: {}; {} until this is fixed",
                p.field,
                p.message,
                if kept {
                    "its last accepted version stays in force"
                } else {
                    "the policy applies to no pod"
                }
            ),
        ),
    };
    let mut condition = Map::new();
    condition.insert("type".into(), "Accepted".into());
    condition.insert("status".into(), status.into());
    condition.insert("reason".into(), reason.into());
    condition.insert(
        "message".into(),
        truncate(message, MAX_MESSAGE_BYTES).into(),
    );
    if let Some(generation) = generation {
        condition.insert("observedGeneration".into(), generation.into());
    }
    condition.insert("lastTransitionTime".into(), now.into());
    json!({ "status": { "conditions": [condition] } })
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Authorization, Config};

    const TD: &str = "cluster.local";

    fn policy(namespace: &str, name: &str, spec: Value) -> SluicePolicy {
        serde_json::from_value(json!({
            "apiVersion": "sluice.io/v1alpha1",
            "kind": "SluicePolicy",
            "metadata": { "namespace": namespace, "name": name, "generation": 3 },
            "spec": spec,
        }))
        .unwrap()
    }

    fn pod(namespace: &str, name: &str, labels: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "namespace": namespace, "name": name, "labels": labels },
        }))
        .unwrap()
    }

    fn key(namespace: &str, name: &str) -> (String, String) {
        (namespace.to_owned(), name.to_owned())
    }

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
            compiled.by_pod[&key("shop", "both")],
            json!({
                "default": "deny",
                "allow": ["spiffe://cluster.local/ns/shop/sa/frontend"],
                "deny": [],
            })
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
        assert_eq!(compiled.by_pod[&key("shop", "b")]["default"], "allow");
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
            compiled.by_pod[&key("shop", "checkout-1")],
            json!({
                "default": "deny",
                "allow": [
                    "spiffe://cluster.local/ns/shop/*",
                    "spiffe://cluster.local/ns/web/sa/frontend",
                ],
                "deny": ["spiffe://cluster.local/ns/shop/sa/batch"],
            })
        );
        // Only the open policy selects the cart.
        assert_eq!(compiled.by_pod[&key("shop", "cart-1")]["default"], "allow");
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
            compiled.by_pod[&key("shop", "checkout-1")],
            json!({
                "default": "allow",
                "allow": [],
                "deny": ["spiffe://cluster.local/ns/shop/sa/batch"],
            })
        );
    }

    #[test]
    fn an_unknown_field_or_a_missing_spec_is_named() {
        let policies = [
            policy("shop", "typo", json!({ "selector": { "matchLabel": {} } })),
            policy("shop", "nospec", Value::Null),
        ];
        let compiled = compile::<Pod>(&policies, &[], TD);
        let fields: Vec<&str> = compiled.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["spec", "spec.selector.matchLabel"]);
    }

    /// What [`compile`] gives is an `authorization` the config file's own
    /// types read and its validation accepts.
    #[test]
    fn the_authorization_reads_and_validates_as_the_config_files() {
        let policies = [policy(
            "shop",
            "p",
            json!({
                "default": "deny",
                "allow": ["spiffe://cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/*"],
                "deny": ["spiffe://cluster.local/ns/shop/*"],
            }),
        )];
        let compiled = compile(&policies, &[pod("shop", "checkout-1", json!({}))], TD);
        let authorization = &compiled.by_pod[&key("shop", "checkout-1")];
        let parsed: Authorization = serde::Deserialize::deserialize(authorization).unwrap();
        assert_eq!(parsed.default, Decision::Deny);
        assert_eq!(parsed.allow.len(), 2);

        let mut config = Config::parse(
            "node:\n  name: n1\nmesh:\n  trust_domain: cluster.local\n",
            "test",
        )
        .unwrap();
        let workload = json!({
            "name": "checkout-1",
            "namespace": "shop",
            "authorization": authorization,
        });
        config
            .workloads
            .push(serde::Deserialize::deserialize(&workload).unwrap());
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn the_condition_says_accepted_or_names_the_field() {
        let ok = accepted_condition(None, false, Some(4), "2026-01-02T03:04:05Z");
        assert_eq!(
            ok,
            json!({ "status": { "conditions": [{
                "type": "Accepted",
                "status": "True",
                "reason": "Valid",
                "message": "the policy is valid and applies to the pods it selects",
                "observedGeneration": 4,
                "lastTransitionTime": "2026-01-02T03:04:05Z",
            }]}})
        );
        let problem = PolicyProblem {
            policy: "shop/p".into(),
            field: "spec.allow[2]".into(),
            message: "`x` must start with spiffe://".into(),
            generation: Some(5),
        };
        let refused = accepted_condition(Some(&problem), false, Some(5), "2026-01-02T03:04:05Z");
        let condition = &refused["status"]["conditions"][0];
        assert_eq!(condition["status"], "False");
        assert_eq!(condition["reason"], "Invalid");
        assert!(
            condition["message"]
                .as_str()
                .unwrap()
                .starts_with("spec.allow[2]: `x` must start with spiffe://")
        );
        assert_eq!(condition["observedGeneration"], 5);
        let unknown = accepted_condition(None, false, None, "2026-01-02T03:04:05Z");
        assert!(
            unknown["status"]["conditions"][0]
                .get("observedGeneration")
                .is_none()
        );
    }

    #[test]
    fn the_resource_is_what_the_crd_declares() {
        use kube::Resource;
        assert_eq!(SluicePolicy::api_version(&()), "sluice.io/v1alpha1");
        assert_eq!(SluicePolicy::plural(&()), "sluicepolicies");
        assert_eq!(
            SluicePolicy::url_path(&(), Some("shop")),
            "/apis/sluice.io/v1alpha1/namespaces/shop/sluicepolicies"
        );
        // What `discovery::reflect` asks of a watched kind.
        fn watchable<K>()
        where
            K: Resource<DynamicType = ()>
                + Clone
                + std::fmt::Debug
                + Send
                + Sync
                + serde::de::DeserializeOwned
                + 'static,
        {
        }
        watchable::<SluicePolicy>();
        let text = serde_json::to_value(policy("shop", "p", json!({}))).unwrap();
        assert_eq!(text["apiVersion"], "sluice.io/v1alpha1");
        assert_eq!(text["kind"], "SluicePolicy");

        #[derive(Deserialize)]
        struct Crd {
            spec: CrdSpec,
        }
        #[derive(Deserialize)]
        struct CrdSpec {
            group: String,
            scope: String,
            names: Names,
            versions: Vec<Version>,
        }
        #[derive(Deserialize)]
        struct Names {
            kind: String,
            plural: String,
        }
        #[derive(Deserialize)]
        struct Version {
            name: String,
        }
        let crd: Crd =
            serde_saphyr::from_str(&read(&examples_dir().join("../policy-crd.yaml"))).unwrap();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, KIND);
        assert_eq!(crd.spec.names.plural, PLURAL);
        let versions: Vec<&str> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(versions, [VERSION]);
    }

    fn examples_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/kubernetes/examples")
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn yaml_files(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        files
    }

    /// The shipped examples: each valid one compiles with no problem, each
    /// invalid one yields a problem whose field its first-line comment names.
    #[test]
    fn the_examples_compile_and_the_invalid_ones_are_refused_by_field() {
        let valid = yaml_files(&examples_dir());
        assert!(!valid.is_empty());
        for path in &valid {
            let policy: SluicePolicy = serde_saphyr::from_str(&read(path)).unwrap();
            let compiled = compile::<Pod>(std::slice::from_ref(&policy), &[], TD);
            assert!(
                compiled.problems.is_empty(),
                "{}: {:?}",
                path.display(),
                compiled.problems
            );
        }
        let frontend: SluicePolicy =
            serde_saphyr::from_str(&read(&examples_dir().join("policy-allow-frontend.yaml")))
                .unwrap();
        let pods = [
            pod("shop", "checkout-1", json!({ "app": "checkout" })),
            pod("shop", "cart-1", json!({ "app": "cart" })),
        ];
        let compiled = compile(&[frontend], &pods, TD);
        assert_eq!(
            compiled.by_pod,
            HashMap::from([(
                key("shop", "checkout-1"),
                json!({
                    "default": "deny",
                    "allow": ["spiffe://cluster.local/ns/shop/sa/frontend"],
                    "deny": [],
                })
            )])
        );

        let invalid = yaml_files(&examples_dir().join("invalid"));
        assert!(invalid.len() >= 4);
        for path in &invalid {
            let text = read(path);
            let policy: SluicePolicy = serde_saphyr::from_str(&text).unwrap();
            let compiled = compile::<Pod>(&[policy], &[], TD);
            let first_line = text.lines().next().unwrap();
            assert!(first_line.starts_with("# Invalid: "), "{}", path.display());
            let problem = compiled
                .problems
                .first()
                .unwrap_or_else(|| panic!("{}: accepted", path.display()));
            assert!(
                first_line.contains(&format!("{} ", problem.field)),
                "{}: the comment does not name {}",
                path.display(),
                problem.field
            );
        }
    }
}
