//! One policy's spec, checked: every problem, each naming its field, with
//! the same pattern rules as the config file.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{MAX_PATTERNS, SluicePolicy};
use crate::config::{
    Decision,
    mesh::check_pattern,
    requests::{RateLimit, RequestRule, validate_request_rules},
    unspanned,
};

/// At most this many `requests` rules in one policy (the CRD's
/// `maxItems`).
pub const MAX_REQUEST_RULES: usize = 64;

impl SluicePolicy {
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
            requests: Vec::new(),
            rate_limit: None,
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
                "requests" => parsed.requests = parse_request_rules(value, &mut problem),
                "rateLimit" => parsed.rate_limit = parse_rate_limit(value, &mut problem),
                _ => problem(
                    format!("spec.{key}"),
                    "unknown field: a SluicePolicy spec has selector, default, allow, deny, \
                     requests and rateLimit"
                        .into(),
                ),
            }
        }
        // The file's own checks of methods, paths and caller patterns.
        let mut found = Vec::new();
        validate_request_rules(&mut found, "spec", &parsed.requests, trust_domain);
        for p in found {
            problem(p.field, p.message);
        }
        problems.sort_by(|a, b| a.field.cmp(&b.field));
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

/// A `requests` list: each rule's fields read as the config file's
/// `authorization.requests` (their values are checked by the file's own
/// validation afterwards).
fn parse_request_rules(
    value: &Value,
    problem: &mut impl FnMut(String, String),
) -> Vec<RequestRule> {
    let Some(items) = value.as_array() else {
        problem(
            "spec.requests".into(),
            format!("must be a list of rules, not {}", type_name(value)),
        );
        return Vec::new();
    };
    if items.len() > MAX_REQUEST_RULES {
        problem(
            "spec.requests".into(),
            format!("has {} rules; at most {MAX_REQUEST_RULES}", items.len()),
        );
        return Vec::new();
    }
    let mut rules = Vec::new();
    for (k, item) in items.iter().enumerate() {
        let at = format!("spec.requests[{k}]");
        let mut rule = RequestRule {
            from: Vec::new(),
            methods: Vec::new(),
            paths: Vec::new(),
            decision: Decision::Deny,
        };
        let Some(fields) = item.as_object() else {
            problem(
                at,
                format!(
                    "must be a map (from, methods, paths, decision), not {}",
                    type_name(item)
                ),
            );
            // Kept in its place, so that the checks after name the
            // others by their own index.
            rules.push(rule);
            continue;
        };
        for (key, value) in fields {
            if value.is_null() {
                continue;
            }
            let field = format!("{at}.{key}");
            match key.as_str() {
                "from" => rule.from = strings(&field, value, problem),
                "methods" => rule.methods = strings(&field, value, problem),
                "paths" => rule.paths = strings(&field, value, problem),
                "decision" => match value.as_str() {
                    Some("allow") => rule.decision = Decision::Allow,
                    Some("deny") => rule.decision = Decision::Deny,
                    _ => problem(field, format!("{value} is neither allow nor deny")),
                },
                _ => problem(
                    field,
                    "unknown field: a rule has from, methods, paths and decision".into(),
                ),
            }
        }
        if fields.get("decision").is_none_or(Value::is_null) {
            problem(
                format!("{at}.decision"),
                "missing: a rule says allow or deny".into(),
            );
        }
        rules.push(rule);
    }
    rules
}

/// A list of strings (methods, paths, patterns), each unchecked.
fn strings(
    field: &str,
    value: &Value,
    problem: &mut impl FnMut(String, String),
) -> Vec<crate::config::Spanned<String>> {
    let Some(items) = value.as_array() else {
        problem(
            field.to_owned(),
            format!("must be a list of strings, not {}", type_name(value)),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match item.as_str() {
            Some(s) => out.push(unspanned(s.to_owned())),
            None => problem(
                format!("{field}[{i}]"),
                format!("must be a string, not {}", type_name(item)),
            ),
        }
    }
    out
}

/// `rateLimit`: the file's workload `rate_limit`, in the API's case.
/// None when it is not all valid.
fn parse_rate_limit(value: &Value, problem: &mut impl FnMut(String, String)) -> Option<RateLimit> {
    let Some(fields) = value.as_object() else {
        problem(
            "spec.rateLimit".into(),
            format!(
                "must be a map (requestsPerSecond, burst, perSource), not {}",
                type_name(value)
            ),
        );
        return None;
    };
    let mut valid = true;
    let (mut per_second, mut burst, mut per_source) = (None, None, false);
    for (key, value) in fields {
        if value.is_null() {
            continue;
        }
        let field = format!("spec.rateLimit.{key}");
        match key.as_str() {
            "requestsPerSecond" | "burst" => {
                let n = value
                    .as_u64()
                    .filter(|n| *n >= 1)
                    .and_then(|n| u32::try_from(n).ok());
                let Some(n) = n else {
                    problem(
                        field,
                        format!("{value} is not a whole number from 1 to {}", u32::MAX),
                    );
                    valid = false;
                    continue;
                };
                match key == "burst" {
                    true => burst = Some(unspanned(n)),
                    false => per_second = Some(unspanned(n)),
                }
            }
            "perSource" => match value.as_bool() {
                Some(b) => per_source = b,
                None => {
                    problem(
                        field,
                        format!("must be true or false, not {}", type_name(value)),
                    );
                    valid = false;
                }
            },
            _ => {
                problem(
                    field,
                    "unknown field: a rateLimit has requestsPerSecond, burst and perSource".into(),
                );
                valid = false;
            }
        }
    }
    if fields.get("requestsPerSecond").is_none_or(Value::is_null) {
        problem(
            "spec.rateLimit.requestsPerSecond".into(),
            "missing: the requests a second the selected pods take".into(),
        );
    }
    Some(RateLimit {
        requests_per_second: per_second.filter(|_| valid)?,
        burst,
        per_source,
    })
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
#[derive(Debug, Clone, PartialEq)]
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
    /// Rules on requests, checked as the file's `authorization.requests`.
    pub requests: Vec<RequestRule>,
    /// The selected pods' rate limit, as the file's workload `rate_limit`.
    pub rate_limit: Option<RateLimit>,
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::{Value, json};

    use crate::discovery::policy::{
        compile,
        tests::{TD, policy},
    };

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

    #[test]
    fn request_rules_and_rate_limits_name_each_bad_field() {
        let policies = [policy(
            "shop",
            "bad",
            json!({
                "requests": [
                    { "methods": ["GET"] },
                    { "paths": ["admin"], "decision": "deny", "hosts": ["x"] },
                    "deny",
                ],
                "rateLimit": { "requestsPerSecond": 0.5, "burst": 0, "perSource": "yes" },
            }),
        )];
        let compiled = compile::<Pod>(&policies, &[], TD);
        let fields: Vec<&str> = compiled.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.rateLimit.burst",
                "spec.rateLimit.perSource",
                "spec.rateLimit.requestsPerSecond",
                "spec.requests[0].decision",
                "spec.requests[1].hosts",
                "spec.requests[1].paths[0]",
                "spec.requests[2]",
            ]
        );
        let no_rate = [policy("shop", "r", json!({ "rateLimit": { "burst": 3 } }))];
        let problems = compile::<Pod>(&no_rate, &[], TD).problems;
        assert_eq!(problems[0].field, "spec.rateLimit.requestsPerSecond");
        assert!(problems[0].message.starts_with("missing"), "{problems:?}");
    }
}
