//! What can go wrong in discovery that a caller handles: discovery cannot
//! start (no client to the API server, a malformed setting), or what it
//! found cannot join the config (a catalog that does not validate). Objects that cannot be meshed are not errors:
//! the translation skips them, each with its reason.

use std::{fmt, path::PathBuf};

/// Why discovery could not start, or why what it found was refused.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// `kubernetes.kubeconfig` names a file that does not read as a
    /// kubeconfig.
    #[error("cannot read kubeconfig {}: {error}", path.display())]
    KubeconfigUnreadable {
        path: PathBuf,
        error: kube::config::KubeconfigError,
    },
    /// The kubeconfig reads but gives no usable client config (no current
    /// context, a certificate that does not load, ...).
    #[error("kubeconfig {}: {error}", path.display())]
    KubeconfigInvalid {
        path: PathBuf,
        error: kube::config::KubeconfigError,
    },
    /// No `kubernetes.kubeconfig`, and neither the in-cluster service
    /// account nor $KUBECONFIG gives a config.
    #[error("no in-cluster config and no kubeconfig: {0}")]
    NoClusterConfig(kube::config::InferConfigError),
    /// The config is there, but no client can be made from it.
    #[error("cannot make a Kubernetes client: {0}")]
    Client(kube::Error),
    /// `kubernetes.agent_service` is not `namespace/name`.
    #[error("kubernetes.agent_service: `{0}` is not namespace/name")]
    AgentService(String),
    /// The config file's entries with the discovered ones beside them do
    /// not validate: every problem, in file order.
    #[error("{}", join(problems))]
    Invalid { problems: Vec<EntryProblem> },
}

/// A discovered entry as a message names it: `service
/// shop/checkout`, `workload shop/checkout-7d4f9`, `node node-b`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `service`, `workload` or `node`.
    pub kind: &'static str,
    /// `namespace/name` for a service; the name (a pod's is
    /// `namespace/name` too) for the others. `?` when the entry has none.
    pub name: String,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

/// One problem of the two sources together: the field, what is wrong,
/// and the discovered entry the field belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryProblem {
    /// The discovered entry of `services`, `workloads` or `nodes` the
    /// field is in; none for the file's own.
    pub entry: Option<Entry>,
    /// Dotted path in the joined lists, e.g. `services[3].address` (the
    /// discovered ones follow the file's).
    pub field: String,
    /// What is wrong, as validation says it.
    pub message: String,
}

impl fmt::Display for EntryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(entry) = &self.entry {
            write!(f, "{entry}: ")?;
        }
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The problems on one line, as a refusal is logged.
fn join(problems: &[EntryProblem]) -> String {
    problems
        .iter()
        .map(EntryProblem::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
