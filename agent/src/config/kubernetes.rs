//! The `kubernetes` section: discovery from the API server, and the modes
//! its annotations give services.

use std::path::PathBuf;

use serde::Deserialize;

use super::{HealthCheck, Mode};

/// Service discovery from the Kubernetes API server.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// A kubeconfig file; none: the in-cluster service account (or
    /// $KUBECONFIG, as kubectl finds it).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// The mode of services whose namespace and Service carry no
    /// `sluice.io/mode` annotation; `off` leaves them unmeshed.
    #[serde(default)]
    pub default_mode: KubeMode,
    /// Where pods' cgroups are searched (by pod uid), relative to
    /// `node.cgroup_root`; empty: the root itself.
    #[serde(default)]
    pub pod_cgroups: String,
    /// `namespace/name` of the headless Service over the agents' pods:
    /// its EndpointSlices say on which node each agent runs and at what
    /// address, so one config serves every node.
    #[serde(default = "default_agent_service")]
    pub agent_service: String,
    /// Active health checks for every discovered service (the pods on this
    /// node are probed from inside their namespace; endpoints on other
    /// nodes are their agents' to check). None: no active checks, outlier
    /// detection only.
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

fn default_agent_service() -> String {
    "sluice-system/sluice-agents".to_owned()
}

/// A service's mode as annotations and the cluster default give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KubeMode {
    /// Not meshed: the agent leaves the service's traffic alone.
    #[default]
    Off,
    Mtls,
    Permissive,
    Plaintext,
    Kernel,
}

impl KubeMode {
    /// The annotation value as the agent reads it.
    pub fn parse(value: &str) -> Option<KubeMode> {
        Some(match value {
            "off" => KubeMode::Off,
            "mtls" => KubeMode::Mtls,
            "permissive" => KubeMode::Permissive,
            "plaintext" => KubeMode::Plaintext,
            "kernel" => KubeMode::Kernel,
            _ => return None,
        })
    }

    /// The service mode, or none when not meshed.
    pub fn mode(self) -> Option<Mode> {
        match self {
            KubeMode::Off => None,
            KubeMode::Mtls => Some(Mode::Mtls),
            KubeMode::Permissive => Some(Mode::Permissive),
            KubeMode::Plaintext => Some(Mode::Plaintext),
            KubeMode::Kernel => Some(Mode::Kernel),
        }
    }
}
