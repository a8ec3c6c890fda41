//! Finding a pod on this machine from its uid: its cgroup (the kubelet
//! names it after the uid: `pod<uid>` with the cgroupfs driver,
//! `kubepods-<qos>-pod<uid_with_underscores>.slice` with systemd) and its
//! network namespace (that of any process in the cgroup or below).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::Pod;

use super::translate::PodPlace;

/// How deep below the search root pod cgroups may be (kubepods/qos/pod).
const MAX_DEPTH: usize = 4;

pub struct Locator {
    node_root: PathBuf,
    search: PathBuf,
    found: HashMap<String, PodPlace>,
}

impl Locator {
    /// Searches below `node_root/pod_cgroups`; places are reported
    /// relative to `node_root`.
    pub fn new(node_root: PathBuf, pod_cgroups: &str) -> Locator {
        Locator {
            search: node_root.join(pod_cgroups),
            node_root,
            found: HashMap::new(),
        }
    }

    /// Drops what it remembers of pods that are gone.
    pub fn forget_missing(&mut self, pods: &[std::sync::Arc<Pod>]) {
        self.found.retain(|uid, _| {
            pods.iter()
                .any(|p| p.metadata.uid.as_deref() == Some(uid.as_str()))
        });
    }

    /// The pod's place, or none if its cgroup holds no process yet.
    pub fn find(&mut self, uid: &str) -> Option<PodPlace> {
        if let Some(place) = self.found.get(uid)
            && place.netns.exists()
        {
            return Some(place.clone());
        }
        let names = [format!("pod{uid}"), format!("pod{}", uid.replace('-', "_"))];
        let dir = find_dir(&self.search, &names, MAX_DEPTH)?;
        let pid = first_pid(&dir, MAX_DEPTH)?;
        let place = PodPlace {
            cgroup: dir
                .strip_prefix(&self.node_root)
                .ok()?
                .to_string_lossy()
                .into_owned(),
            netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
        };
        self.found.insert(uid.to_owned(), place.clone());
        Some(place)
    }
}

fn find_dir(dir: &Path, names: &[String], depth: usize) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut below = Vec::new();
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let stem = name.strip_suffix(".slice").unwrap_or(&name);
        if names
            .iter()
            .any(|n| stem == n || stem.ends_with(&format!("-{n}")))
        {
            return Some(entry.path());
        }
        below.push(entry.path());
    }
    if depth == 0 {
        return None;
    }
    below.iter().find_map(|d| find_dir(d, names, depth - 1))
}

fn first_pid(dir: &Path, depth: usize) -> Option<u32> {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs"))
        && let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok())
    {
        return Some(pid);
    }
    if depth == 0 {
        return None;
    }
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| first_pid(&e.path(), depth - 1))
}
