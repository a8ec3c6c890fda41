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
    let mut innermost_first: Vec<&PathBuf> = created.iter().collect();
    innermost_first.sort_by_key(|dir| std::cmp::Reverse(dir.components().count()));
    innermost_first
        .into_iter()
        .filter_map(|dir| match std::fs::remove_dir(dir) {
            Ok(()) => None,
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => Some((dir.clone(), e)),
        })
        .collect()
}

/// The cgroups this node's agents made, of every generation: kept in a
/// file that each agent reads at its start and writes when it makes one,
/// so that the agent that finally stops (SIGTERM) removes them all, even
/// those an agent it replaced, or one that crashed, made. Only paths below
/// `within` (the hooked cgroup root) are ever taken from the file.
#[derive(Debug)]
pub struct CreatedCgroups {
    file: PathBuf,
    within: PathBuf,
    dirs: Vec<PathBuf>,
    /// Those this process made.
    made_here: Vec<PathBuf>,
}

impl CreatedCgroups {
    /// What earlier agents recorded in `file`, below `within`.
    pub fn open(file: PathBuf, within: &Path) -> CreatedCgroups {
        let recorded = std::fs::read_to_string(&file).unwrap_or_default();
        let dirs = recorded
            .lines()
            .map(PathBuf::from)
            .filter(|p| is_below(p, within))
            .collect();
        CreatedCgroups {
            file,
            within: within.to_owned(),
            dirs,
            made_here: Vec::new(),
        }
    }

    /// Records `made` (as [`create_all`] returns them), with what other
    /// agents recorded meanwhile, and writes the record.
    pub fn add(&mut self, made: Vec<PathBuf>) {
        if made.is_empty() {
            return;
        }
        // What another agent of the node recorded meanwhile (the one this
        // replaces, during an upgrade) is kept.
        let recorded = CreatedCgroups::open(self.file.clone(), &self.within).dirs;
        for dir in recorded {
            if !self.dirs.contains(&dir) {
                self.dirs.push(dir);
            }
        }
        for dir in made {
            if is_below(&dir, &self.within) && !self.dirs.contains(&dir) {
                self.made_here.push(dir.clone());
                self.dirs.push(dir);
            }
        }
        self.save();
    }

    /// The cgroups recorded.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Removes every recorded cgroup (innermost first); those that cannot
    /// go (processes still in them) stay recorded for the next agent, and
    /// are returned with why.
    pub fn remove_all(&mut self) -> Vec<(PathBuf, io::Error)> {
        let left = remove_created(&self.dirs);
        self.dirs = left.iter().map(|(dir, _)| dir.clone()).collect();
        self.save();
        left
    }

    /// Removes only what this process made (a start that failed: the agent
    /// it meant to replace still runs in the rest).
    pub fn remove_made_here(&mut self) -> Vec<(PathBuf, io::Error)> {
        let left = remove_created(&self.made_here);
        let gone: Vec<PathBuf> = self
            .made_here
            .drain(..)
            .filter(|d| !left.iter().any(|(l, _)| l == d))
            .collect();
        self.dirs.retain(|d| !gone.contains(d));
        self.save();
        left
    }

    fn save(&self) {
        let file = &self.file;
        let result = if self.dirs.is_empty() {
            match std::fs::remove_file(file) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            let text: String = self
                .dirs
                .iter()
                .map(|d| format!("{}\n", d.display()))
                .collect();
            let temp = file.with_extension("cgroups.new");
            std::fs::write(&temp, text).and_then(|()| std::fs::rename(&temp, file))
        };
        if let Err(e) = result {
            log::warn!(
                "cannot record the cgroups made in {}: {e}; a later agent may leave them",
                file.display()
            );
        }
    }
}

/// Whether `path` is absolute, strictly below `within`, and has no `..`.
fn is_below(path: &Path, within: &Path) -> bool {
    path.is_absolute()
        && path != within
        && path.starts_with(within)
        && path
            .components()
            .all(|c| !matches!(c, std::path::Component::ParentDir))
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

    /// A second agent finds what the first made, and removes it with its
    /// own; what is not below the root is never taken from the record.
    #[test]
    fn the_last_agent_removes_what_every_agent_made() {
        let base = std::env::temp_dir().join(format!("sluice-cg-rec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let within = base.join("mount");
        std::fs::create_dir_all(&within).unwrap();
        let record = base.join("record.cgroups");

        let mut first = CreatedCgroups::open(record.clone(), &within);
        first.add(create_all(&within.join("pods/a")).unwrap());
        drop(first);
        // Someone wrote a path outside the root into the record.
        let mut text = std::fs::read_to_string(&record).unwrap();
        text.push_str(&format!(
            "{}\n{}/../escape\n",
            base.display(),
            within.display()
        ));
        std::fs::write(&record, text).unwrap();

        let mut second = CreatedCgroups::open(record.clone(), &within);
        assert_eq!(second.dirs(), [within.join("pods"), within.join("pods/a")]);
        second.add(create_all(&within.join("pods/b")).unwrap());
        // A failed start takes back only its own.
        let mut failed = CreatedCgroups::open(record.clone(), &within);
        failed.add(create_all(&within.join("other")).unwrap());
        assert!(failed.remove_made_here().is_empty());
        assert!(!within.join("other").exists());
        assert!(within.join("pods/a").exists());

        let mut last = CreatedCgroups::open(record.clone(), &within);
        assert_eq!(last.dirs().len(), 3, "{:?}", last.dirs());
        assert!(last.remove_all().is_empty());
        assert!(!within.join("pods").exists());
        assert!(!record.exists(), "an empty record is removed");
        assert!(base.exists(), "nothing outside the root was touched");
        std::fs::remove_dir_all(&base).unwrap();
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
