//! SluicePolicy (`sluice.io/v1alpha1`, config/kubernetes/policy-crd.yaml):
//! the config file's `authorization` block as a namespaced custom resource
//! that selects pods by label.
//!
//! The watched object keeps its spec as raw JSON: one malformed policy must
//! not break the watch stream of all of them. [`compile()`] checks each spec
//! itself, with the same pattern rules as the config file
//! ([`crate::config::mesh::check_pattern`]), turns the valid ones into one
//! `authorization` block per selected pod, and names the field of every
//! problem, for the policy's `Accepted` condition ([`accepted_condition`]).
//!
//! `spec.rs` checks one policy's spec, `compile.rs` applies the valid ones
//! to pods, `status.rs` says and writes each policy's verdict.

mod compile;
mod spec;
mod status;

use std::borrow::Cow;

use k8s_openapi::{NamespaceResourceScope, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use compile::{Accepted, Compiled, compile};
pub use spec::{PolicyProblem, PolicySpec};
pub(super) use status::PolicyStatus;
pub use status::{accepted_condition, status_changes};

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

/// One SluicePolicy object as the API server returns it. `spec` and
/// `status` are not typed on purpose: any JSON reads, so the reflector keeps
/// watching whatever is stored, and [`compile()`] says what is wrong.
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
}

#[cfg(test)]
mod tests;
