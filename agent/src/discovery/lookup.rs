//! The identity of a pod on another node, read from the API server the
//! first time one of this node's workloads connects to it, rather than
//! watching every pod of the cluster from every node.

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};

use crate::{config::PodRef, tls::Identity};

/// Reads a pod's service account from the API server: the identity that
/// the agent of its node must present for it.
pub struct PodLookup {
    client: Client,
    trust_domain: String,
}

/// Why a pod's identity could not be read. The caller names the pod.
#[derive(Debug, thiserror::Error)]
pub enum PodLookupError {
    /// No such pod (any more).
    #[error("the pod no longer exists")]
    Gone,
    /// The agent may not read pods.
    #[error(
        "the API server refused to get pods (403 Forbidden): the agent's ClusterRole must grant \
         get on pods"
    )]
    Forbidden,
    /// The API server could not be reached, or answered with another error.
    #[error("the API server did not answer: {0}")]
    Unanswered(kube::Error),
    /// A pod of that name exists, but not the one the EndpointSlice named.
    #[error("the pod was replaced by another of the same name")]
    Replaced,
}

impl PodLookup {
    /// Reads pods through `client`; identities are of `trust_domain`.
    pub fn new(client: Client, trust_domain: String) -> PodLookup {
        PodLookup {
            client,
            trust_domain,
        }
    }

    /// One GET with resourceVersion=0, which the API server answers from
    /// its watch cache rather than etcd. The pod must still be the one the
    /// EndpointSlice named (same uid), not a later one of the same name.
    pub async fn identity(&self, pod: &PodRef) -> Result<Identity, PodLookupError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let found = api
            .get_with(&pod.name, &kube::api::GetParams::any())
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) if s.code == 404 => PodLookupError::Gone,
                kube::Error::Api(s) if s.code == 403 => PodLookupError::Forbidden,
                e => PodLookupError::Unanswered(e),
            })?;
        if let Some(uid) = &pod.uid
            && found.metadata.uid.as_ref() != Some(uid)
        {
            return Err(PodLookupError::Replaced);
        }
        let account = found
            .spec
            .and_then(|s| s.service_account_name)
            .unwrap_or_else(|| "default".to_owned());
        Ok(Identity::new(&self.trust_domain, &pod.namespace, &account))
    }
}
