//! One policy's spec, checked: every problem, each naming its field, with
//! the same pattern rules as the config file.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{MAX_PATTERNS, SluicePolicy};
use crate::config::{Decision, mesh::check_pattern};

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
}
