//! Where workloads live on this node: their cgroups (made when missing)
//! and network namespaces, and the node settings the start fixed for the
//! agent's whole run.

use std::{io, path::Path, sync::Arc};

use crate::{
    catalog::{Catalog, Placement},
    config::{Config, WorkloadSpec},
    netns::Netns,
    redirect::cgroup::{self, CreatedCgroups},
};

/// The kubelet puts pods below `kubepods.slice` with the systemd cgroup
/// driver and below `kubepods` with cgroupfs. In Kubernetes mode either
/// name in `node.cgroup_root` means the kubelet's root, whichever of the
/// two this node has, so one config serves nodes of both kinds.
pub(super) fn kubelet_root(mount: &Path, configured: &str) -> Option<String> {
    let path = Path::new(configured);
    let other = match path.file_name()?.to_str()? {
        "kubepods.slice" => "kubepods",
        "kubepods" => "kubepods.slice",
        _ => return None,
    };
    let alternative = path.with_file_name(other);
    (!mount.join(path).exists() && mount.join(&alternative).is_dir())
        .then(|| alternative.to_string_lossy().into_owned())
}

/// What the start fixed for this run over the file's `node`: the name
/// given on the command line, the kubelet root found on this machine. Every
/// reload keeps them.
#[derive(Debug, Clone, Default)]
pub(super) struct StartOverrides {
    pub node_name: Option<String>,
    pub cgroup_root: Option<String>,
}

impl StartOverrides {
    pub fn apply(&self, config: &mut Config) {
        if let Some(name) = &self.node_name {
            config.node.name.get_mut().clone_from(name);
        }
        if let Some(root) = &self.cgroup_root {
            config.node.cgroup_root.get_mut().clone_from(root);
        }
    }
}

/// Makes sure every workload's cgroup exists and opens its network
/// namespace when it has one; returns where each workload lives, in config
/// order, and adds the cgroup directories it made to `created`.
pub(super) fn workload_placements(
    config: &Config,
    root: &Path,
    created: &mut CreatedCgroups,
) -> io::Result<Vec<Placement>> {
    config
        .workloads
        .iter()
        .map(|w| place_workload(w, root, created, None))
        .collect()
}

/// Where one workload lives. A namespace `previous` already holds open for
/// the same workload, path and cgroup is taken over rather than opened
/// again, so that what is keyed by it (health checks, listeners) stays.
pub(super) fn place_workload(
    w: &WorkloadSpec,
    root: &Path,
    created: &mut CreatedCgroups,
    previous: Option<&Catalog>,
) -> io::Result<Placement> {
    let path = root.join(w.cgroup());
    created.add(cgroup::create_all(&path)?);
    let id = cgroup::cgroup_id(&path)?;
    let netns = match &w.netns {
        Some(ns) => {
            let known = previous
                .and_then(|c| c.workloads().iter().find(|o| o.name == *w.name))
                .filter(|o| o.cgroup_id == id)
                .and_then(|o| o.netns.clone())
                .filter(|n| n.path() == ns.get());
            match known {
                Some(n) => Some(n),
                None => Some(Arc::new(Netns::open(ns.get()).map_err(|e| {
                    io::Error::new(e.kind(), format!("workload `{}`: {e}", w.name.get()))
                })?)),
            }
        }
        None => None,
    };
    Ok(Placement {
        cgroup: path,
        cgroup_id: id,
        netns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Either driver's name finds the kubelet's root under the other;
    /// anything else, or a root that exists, is taken as written.
    #[test]
    fn the_kubelet_root_is_found_under_either_driver() {
        let mount =
            std::env::temp_dir().join(format!("sluice-kubelet-root-{}", std::process::id()));
        std::fs::create_dir_all(mount.join("k/kubepods")).unwrap();
        std::fs::create_dir_all(mount.join("s/kubepods.slice")).unwrap();
        assert_eq!(
            kubelet_root(&mount, "k/kubepods.slice").as_deref(),
            Some("k/kubepods")
        );
        assert_eq!(
            kubelet_root(&mount, "s/kubepods").as_deref(),
            Some("s/kubepods.slice")
        );
        assert_eq!(kubelet_root(&mount, "k/kubepods"), None);
        assert_eq!(kubelet_root(&mount, "x/kubepods.slice"), None);
        assert_eq!(kubelet_root(&mount, "k/other"), None);
        std::fs::remove_dir_all(&mount).unwrap();
    }

    /// A reload reads the file afresh; what the start fixed must win over
    /// it every time, and nothing else may change.
    #[test]
    fn the_starts_overrides_survive_every_reload() {
        let text = "node:\n  name: from-file\n  cgroup_root: kubepods.slice\n";
        let mut config = Config::parse(text, "t.yaml").unwrap();
        StartOverrides::default().apply(&mut config);
        assert_eq!(config.node.name.get(), "from-file");
        assert_eq!(config.node.cgroup_root.get(), "kubepods.slice");
        let overrides = StartOverrides {
            node_name: Some("node-7".into()),
            cgroup_root: Some("kubepods".into()),
        };
        overrides.apply(&mut config);
        assert_eq!(config.node.name.get(), "node-7");
        assert_eq!(config.node.cgroup_root.get(), "kubepods");
        assert_eq!(
            config.node.address,
            Config::parse(text, "t.yaml").unwrap().node.address
        );
    }
}
