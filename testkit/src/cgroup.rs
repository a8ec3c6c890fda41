//! cgroup v2 for the tests: where it is mounted, putting a process into a
//! cgroup as it starts, and removing a whole tree with whatever still runs
//! in it.

use std::{
    ffi::CString,
    io,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::wait::wait_until;

/// Where cgroup v2 is mounted, from /proc/self/mountinfo (/sys/fs/cgroup on
/// most systems, /sys/fs/cgroup/unified on hybrid ones: never assumed).
pub fn mount() -> io::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(cgroup2_mount_point)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "cgroup v2 is not mounted"))
}

/// The mount point of a mountinfo line, if it mounts cgroup2. A line is
/// `id parent major:minor root mount-point options [optional...] - type
/// source super-options`.
fn cgroup2_mount_point(line: &str) -> Option<PathBuf> {
    let (before, after) = line.split_once(" - ")?;
    if after.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    let mount_point = before.split_whitespace().nth(4)?;
    Some(PathBuf::from(unescape(mount_point)))
}

/// mountinfo writes space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let code = s
            .get(i + 1..i + 4)
            .and_then(|c| u8::from_str_radix(c, 8).ok());
        match (bytes[i], code) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes `cmd`'s child move itself into the cgroup at `dir` (which must
/// exist) before it execs, so that the hooks see everything it does.
pub fn enter_on_exec(cmd: &mut Command, dir: &Path) {
    let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
        .expect("a cgroup path has no NUL byte");
    // SAFETY: only async-signal-safe calls (open, write, close) on memory
    // prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let error = io::Error::last_os_error();
            libc::close(fd);
            if written == 1 { Ok(()) } else { Err(error) }
        });
    }
}

/// Kills every process in the cgroup at `dir` and below it (`cgroup.kill`),
/// waits until none is left, and removes the cgroups deepest first
/// (cgroupfs refuses to remove one with children or processes). Nothing to
/// do if `dir` does not exist. The error names a cgroup that would not go.
pub fn kill_and_remove(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // Absent before Linux 5.14; the removal then says what is still there.
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    wait_until(Duration::from_secs(10), || !populated(dir));
    remove_tree(dir)
}

/// Whether a process still runs in the cgroup at `dir` or below it.
fn populated(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("cgroup.events"))
        .is_ok_and(|events| events.lines().any(|l| l == "populated 1"))
}

fn remove_tree(dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        entries => entries?,
    };
    // Every child is tried, so one that will not go leaves the least behind.
    let children: Vec<io::Result<()>> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| remove_tree(&e.path()))
        .collect();
    children.into_iter().collect::<io::Result<()>>()?;
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io::Error::new(
            e.kind(),
            format!("cannot remove cgroup {}: {e}", dir.display()),
        )),
        _ => Ok(()),
    }
}

/// A cgroup tree that is killed and removed on drop, whatever made the
/// cgroups below it (a test, `sluice exec`, the agent).
#[derive(Debug)]
pub struct CgroupTree {
    path: PathBuf,
}

impl CgroupTree {
    /// Takes charge of the tree at `path` (made if missing, with parents).
    pub fn create(path: PathBuf) -> io::Result<CgroupTree> {
        std::fs::create_dir_all(&path)?;
        Ok(CgroupTree { path })
    }

    /// Takes charge of the tree at `path` without making it: whoever makes
    /// it later, it goes on drop.
    pub fn adopt(path: PathBuf) -> CgroupTree {
        CgroupTree { path }
    }

    /// The tree's root, absolute.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        if let Err(e) = kill_and_remove(&self.path) {
            eprintln!("test kit: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_line_of_mountinfo_gives_its_mount_point() {
        let v1 = "35 25 0:30 / /sys/fs/cgroup/cpu rw,nosuid shared:13 - cgroup cgroup rw,cpu";
        let v2 = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw";
        assert_eq!(cgroup2_mount_point(v1), None);
        assert_eq!(
            cgroup2_mount_point(v2),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn an_escaped_mount_point_is_read_back() {
        let line = "41 31 0:38 / /mnt/my\\040cgroups rw - cgroup2 none rw";
        assert_eq!(
            cgroup2_mount_point(line),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }
}
