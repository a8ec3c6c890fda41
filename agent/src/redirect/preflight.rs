//! Checks that the machine can run the agent, before anything is attached.
//! Each failure is one sentence: what is missing and how to fix it.

use std::{
    ffi::CString,
    mem::MaybeUninit,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use super::cgroup;

/// Capabilities the agent needs, with their numbers from linux/capability.h.
const REQUIRED_CAPS: [(u32, &str); 3] = [
    (39, "CAP_BPF"),
    (12, "CAP_NET_ADMIN"),
    (21, "CAP_SYS_ADMIN"),
];

/// What stops the agent from starting on this machine.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "sluice agent needs root or the capabilities {missing}; run it as root \
         (or grant them, e.g. in the DaemonSet's securityContext)"
    )]
    MissingCapabilities { missing: String },
    #[error(
        "no cgroup v2 hierarchy is mounted (none in /proc/mounts); mount one with \
         `mount -t cgroup2 none /sys/fs/cgroup/unified` or boot with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,
    #[error(
        "{path} is not on a bpf filesystem, so maps and links cannot be pinned there; \
         mount one with `mount -t bpf bpf /sys/fs/bpf` (or set agent.pin_dir to a directory on bpffs)"
    )]
    NoBpffs { path: PathBuf },
    #[error(
        "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing); Sluice needs Linux 5.15 \
         or newer built with CONFIG_DEBUG_INFO_BTF and CONFIG_CGROUP_BPF"
    )]
    NoBtf,
}

/// Runs every check that needs no change to the system. Returns the cgroup
/// v2 mount point on success.
pub fn check(pin_dir: &Path) -> Result<PathBuf, PreflightError> {
    check_capabilities()?;
    let mount = cgroup::cgroup2_mount().ok_or(PreflightError::NoCgroup2)?;
    check_bpffs(pin_dir)?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(PreflightError::NoBtf);
    }
    Ok(mount)
}

fn check_capabilities() -> Result<(), PreflightError> {
    let effective = effective_capabilities().unwrap_or(0);
    let missing: Vec<&str> = REQUIRED_CAPS
        .iter()
        .filter(|(bit, _)| effective & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::MissingCapabilities {
            missing: missing.join(", "),
        })
    }
}

/// The `CapEff` mask of this process.
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// The pin directory, or its nearest existing ancestor, must be on bpffs.
fn check_bpffs(pin_dir: &Path) -> Result<(), PreflightError> {
    let existing = pin_dir.ancestors().find(|p| p.exists()).unwrap_or(pin_dir);
    if fs_magic(existing) == Some(libc::BPF_FS_MAGIC) {
        Ok(())
    } else {
        Err(PreflightError::NoBpffs {
            path: pin_dir.to_owned(),
        })
    }
}

/// The filesystem type (`f_type` of statfs) of `path`.
pub(crate) fn fs_magic(path: &Path) -> Option<libc::c_long> {
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut buf = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: c_path is NUL-terminated; buf is written by the kernel on success.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), buf.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statfs returned 0, so buf is initialised.
    Some(unsafe { buf.assume_init() }.f_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmp_is_not_bpffs() {
        let err = check_bpffs(Path::new("/tmp/sluice-not-bpffs")).unwrap_err();
        assert!(err.to_string().contains("mount -t bpf bpf /sys/fs/bpf"));
    }
}
