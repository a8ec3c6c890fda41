//! Each policy's verdict, as the `Accepted` condition of its status: what
//! it should say, and the writes that make it say so (through the status
//! subresource, each change once).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use kube::{Api, Client};
use log::warn;
use serde_json::{Map, Value, json};

use super::{Accepted, PolicyProblem, SluicePolicy};

/// The longest condition message metav1.Condition allows.
const MAX_MESSAGE_BYTES: usize = 32_768;

/// The `Accepted` condition each policy should carry and does not yet, as
/// (namespace, name, merge-patch body). `problems` are those of
/// [`compile`](fn@super::compile); `kept` tells whether a refused policy's
/// earlier version is still in force (the message says which).
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

/// Writes policies' `Accepted` condition through the status subresource,
/// each change once (a write in flight is not sent again), off the
/// rebuild loop.
pub(in crate::discovery) struct PolicyStatus {
    client: Client,
    /// The condition last sent per policy (without its time).
    sent: Arc<Mutex<HashMap<(String, String), Value>>>,
}

impl PolicyStatus {
    /// Writes through `client`; nothing sent yet.
    pub(in crate::discovery) fn new(client: Client) -> PolicyStatus {
        PolicyStatus {
            client,
            sent: Arc::default(),
        }
    }

    /// Sends each policy's condition that differs from what was last sent
    /// (`refused`: the problems of [`compile`](fn@super::compile); `accepted`:
    /// which refused policies keep an earlier version in force).
    pub(in crate::discovery) fn write(
        &self,
        policies: &[SluicePolicy],
        refused: &[PolicyProblem],
        accepted: &Accepted,
    ) {
        let now = crate::audit::now_rfc3339();
        for (ns, name, body) in status_changes(policies, refused, |p| accepted.has(p), &now) {
            let mut condition = body["status"]["conditions"][0].clone();
            if let Some(c) = condition.as_object_mut() {
                c.remove("lastTransitionTime");
            }
            let key = (ns.clone(), name.clone());
            {
                let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
                if sent.get(&key) == Some(&condition) {
                    continue;
                }
                sent.insert(key.clone(), condition);
            }
            let api: Api<SluicePolicy> = Api::namespaced(self.client.clone(), &ns);
            let sent = self.sent.clone();
            tokio::spawn(async move {
                let patch = kube::api::Patch::Merge(&body);
                if let Err(e) = api
                    .patch_status(&name, &kube::api::PatchParams::default(), &patch)
                    .await
                {
                    warn!("kubernetes: cannot write the status of sluicepolicy {ns}/{name}: {e}");
                    // Sent again at the next change.
                    sent.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
