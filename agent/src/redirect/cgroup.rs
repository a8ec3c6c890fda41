//! cgroup v2: where workloads live and what the hooks attach to.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// The cgroup v2 mount point, read from /proc/mounts (never assumed: it is
/// /sys/fs/cgroup on most systems, /sys/fs/cgroup/unified on hybrid ones).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let _device = fields.next()?;
        let mount_point = fields.next()?;
        (fields.next()? == "cgroup2").then(|| PathBuf::from(unescape_mount(mount_point)))
    })
}

/// /proc/mounts escapes spaces and friends as octal (`\040`).
fn unescape_mount(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The id the kernel reports for a cgroup (`bpf_get_current_cgroup_id`):
/// on cgroup v2 it is the inode number of the cgroup's directory.
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

/// Creates `path` and any missing parents; returns the directories it made,
/// outermost first, so that the caller can remove exactly those.
pub fn create_all(path: &Path) -> io::Result<Vec<PathBuf>> {
    let mut missing: Vec<PathBuf> = path
        .ancestors()
        .take_while(|p| !p.exists())
        .map(Path::to_owned)
        .collect();
    missing.reverse();
    for dir in &missing {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot create cgroup {}: {e}", dir.display()),
                ));
            }
        }
    }
    Ok(missing)
}

/// Removes cgroups that [`create_all`] made, innermost first. A cgroup that
/// still holds processes stays (rmdir fails with EBUSY) and is reported.
pub fn remove_created(created: &[PathBuf]) -> Vec<(PathBuf, io::Error)> {
    created
        .iter()
        .rev()
        .filter_map(|dir| std::fs::remove_dir(dir).err().map(|e| (dir.clone(), e)))
        .collect()
}

/// Moves process `pid` (0: the caller) into the cgroup at `path`.
pub fn enter(path: &Path, pid: u32) -> io::Result<()> {
    std::fs::write(path.join("cgroup.procs"), pid.to_string()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot move pid {pid} into cgroup {}: {e}", path.display()),
        )
    })
}

/// The cgroup this process runs in, as a path below `mount`.
///
/// /proc/self/cgroup names it relative to the process's cgroup namespace;
/// in a container with a private one (the default on cgroup v2) that reads
/// `/` while the host's tree is mounted at `mount`. Then the tree is
/// searched once for the directory whose `cgroup.procs` lists this process.
pub fn own_cgroup(mount: &Path) -> io::Result<PathBuf> {
    let pid = std::process::id().to_string();
    let lists_us = |dir: &Path| {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .is_ok_and(|procs| procs.lines().any(|l| l.trim() == pid))
    };
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| io::Error::other("/proc/self/cgroup has no cgroup v2 entry"))?;
    let direct = mount.join(relative.trim_start_matches('/'));
    if lists_us(&direct) {
        return Ok(direct);
    }
    let mut pending = vec![mount.to_owned()];
    while let Some(dir) = pending.pop() {
        if lists_us(&dir) {
            return Ok(dir);
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            pending.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "no cgroup below {} lists this process ({pid})",
            mount.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape_mount(r"/a\040b"), "/a b");
        assert_eq!(unescape_mount(r"/plain"), "/plain");
    }

    #[test]
    fn create_all_reports_only_new_dirs() {
        let base = std::env::temp_dir().join(format!("sluice-cg-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let created = create_all(&base.join("a/b")).unwrap();
        assert_eq!(created, vec![base.join("a"), base.join("a/b")]);
        assert!(remove_created(&created).is_empty());
        assert!(!base.join("a").exists());
        std::fs::remove_dir(&base).unwrap();
    }

    #[test]
    fn finds_its_own_cgroup() {
        let Some(mount) = cgroup2_mount() else {
            panic!("cgroup v2 must be mounted for this test");
        };
        let own = own_cgroup(&mount).unwrap();
        let procs = std::fs::read_to_string(own.join("cgroup.procs")).unwrap();
        assert!(
            procs
                .lines()
                .any(|l| l.trim() == std::process::id().to_string())
        );
    }
}
