//! The handover socket as a file: its name, the private directory it
//! lives in, and the bind-then-rename that puts an agent's socket at the
//! path without a moment where the path leads nowhere.

use std::{
    fs::{self, DirBuilder},
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use log::warn;
use tokio::net::UnixListener;

use super::{Handover, HandoverError, peer::Me};

const SOCKET_PREFIX: &str = "handover-";
/// `sun_path` holds 108 bytes, the terminating NUL included.
pub(super) const MAX_SOCKET_PATH: usize = 107;

/// The socket's file name: one per pin directory, because an agent is its
/// pinned programs and maps. Two agents with different pin directories in
/// one network namespace and state directory (a bench, a test) are not
/// versions of each other and must never meet. `handover-sluice.sock` for
/// the default `/sys/fs/bpf/sluice`; a hash for a name that is long or
/// unusual.
pub(super) fn socket_file(pin_dir: &Path) -> String {
    let name = pin_dir.file_name().and_then(|n| n.to_str()).filter(|n| {
        n.len() <= 32
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    });
    match name {
        Some(name) => format!("{SOCKET_PREFIX}{name}.sock"),
        None => {
            let hash = pin_dir
                .as_os_str()
                .as_encoded_bytes()
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
                });
            format!("{SOCKET_PREFIX}{hash:016x}.sock")
        }
    }
}

/// `PATH.<pid>`: where this agent binds before renaming over the path, in
/// the same directory (rename() stays within one filesystem).
pub(super) fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}", std::process::id()));
    PathBuf::from(name)
}

/// `dir` exists, is a directory (not a link to one) owned by this user,
/// and only this user may enter it.
pub(super) fn make_private_dir(dir: &Path) -> Result<(), HandoverError> {
    let at = |source| HandoverError::Io {
        path: dir.to_owned(),
        source,
    };
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(|source| HandoverError::Io {
            path: parent.to_owned(),
            source,
        })?;
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(at(e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(at)?;
    if !meta.file_type().is_dir() {
        return Err(HandoverError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let agent = unsafe { libc::geteuid() };
    if meta.uid() != agent {
        return Err(HandoverError::NotOwned {
            path: dir.to_owned(),
            owner: meta.uid(),
            agent,
        });
    }
    if meta.mode() & 0o777 != 0o700 {
        warn!(
            "{}: mode {:o}, but only the agent may reach the handover socket; setting 0700",
            dir.display(),
            meta.mode() & 0o7777
        );
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(at)?;
    }
    Ok(())
}

impl Handover {
    /// Puts this agent's handover socket at the path, replacing whatever
    /// is there in one rename: after an upgrade that is the previous
    /// agent's socket, which stops listening once it has read `READY`.
    pub fn listen(&self) -> Result<Listening, HandoverError> {
        let temp = temp_path(&self.path);
        let at = |path: &Path| {
            let path = path.to_owned();
            move |source| HandoverError::Io { path, source }
        };
        match fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(at(&temp)(e)),
        }
        let std_listener = std::os::unix::net::UnixListener::bind(&temp).map_err(at(&temp))?;
        let meta = fs::symlink_metadata(&temp).map_err(at(&temp))?;
        if let Err(e) = fs::rename(&temp, &self.path) {
            let _ = fs::remove_file(&temp);
            return Err(at(&self.path)(e));
        }
        std_listener.set_nonblocking(true).map_err(at(&self.path))?;
        Ok(Listening {
            listener: UnixListener::from_std(std_listener).map_err(at(&self.path))?,
            file: SocketFile {
                path: self.path.clone(),
                dev: meta.dev(),
                ino: meta.ino(),
            },
            me: self.me.clone(),
        })
    }
}

/// The running agent's handover socket, bound at its path.
pub struct Listening {
    pub(super) listener: UnixListener,
    pub(super) file: SocketFile,
    pub(super) me: Me,
}

impl Listening {
    /// The file, to remove when this agent stops.
    pub fn file(&self) -> SocketFile {
        self.file.clone()
    }
}

/// The socket file one agent bound, known by its inode: the path may lead
/// to a successor's socket later.
#[derive(Debug, Clone)]
pub struct SocketFile {
    pub(super) path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Removes the file if the path still leads to this agent's socket; a
    /// successor's (renamed over it) stays. For an agent that stops
    /// without a successor: a clean stop leaves no stale file.
    pub fn remove_if_ours(&self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours && let Err(e) = fs::remove_file(&self.path) {
            warn!(
                "cannot remove the handover socket {}: {e}",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{super::tests::temp_dir, *};

    #[test]
    fn the_run_directory_is_made_private_and_a_looser_one_tightened() {
        let state = temp_dir("private");
        let handover = Handover::prepare(&state, Path::new("/sys/fs/bpf/sluice")).unwrap();
        let run = state.join("run");
        assert_eq!(handover.path(), run.join("handover-sluice.sock"));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&run), 0o700);
        fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
        Handover::prepare(&state, Path::new("/sys/fs/bpf/sluice")).unwrap();
        assert_eq!(mode(&run), 0o700);
        fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn each_pin_directory_has_a_socket_of_its_own() {
        assert_eq!(
            socket_file(Path::new("/sys/fs/bpf/sluice-2")),
            "handover-sluice-2.sock"
        );
        assert_eq!(
            socket_file(Path::new("/sys/fs/bpf/a dir with spaces")),
            socket_file(Path::new("/sys/fs/bpf/a dir with spaces"))
        );
        assert_ne!(
            socket_file(Path::new("/x/a dir with spaces")),
            socket_file(Path::new("/y/a dir with spaces"))
        );
        let long = format!("/sys/fs/bpf/{}", "p".repeat(33));
        let hashed = socket_file(Path::new(&long));
        assert!(!hashed.contains("ppp"), "{hashed}");
        assert_eq!(hashed.len(), "handover-".len() + 16 + ".sock".len());
    }

    #[test]
    fn a_run_directory_that_is_a_link_or_someone_elses_is_refused_by_name() {
        let state = temp_dir("refused");
        let run = state.join("run");
        let elsewhere = state.join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &run).unwrap();
        let e = Handover::prepare(&state, Path::new("/sys/fs/bpf/sluice")).unwrap_err();
        assert!(matches!(e, HandoverError::NotADirectory { .. }), "{e}");
        assert!(e.to_string().contains(&run.display().to_string()), "{e}");
        fs::remove_file(&run).unwrap();
        // Only root can give a directory away; the tests run as root.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            fs::create_dir(&run).unwrap();
            std::os::unix::fs::chown(&run, Some(1000), None).unwrap();
            let e = Handover::prepare(&state, Path::new("/sys/fs/bpf/sluice")).unwrap_err();
            assert!(
                matches!(e, HandoverError::NotOwned { owner: 1000, .. }),
                "{e}"
            );
            assert!(e.to_string().contains(&run.display().to_string()), "{e}");
        }
        fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn a_state_dir_too_long_for_a_socket_address_is_refused() {
        let long = PathBuf::from("/").join("s".repeat(100));
        let e = Handover::prepare(&long, Path::new("/sys/fs/bpf/sluice")).unwrap_err();
        assert!(matches!(e, HandoverError::PathTooLong { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_successors_socket_replaces_the_file_and_survives_the_old_agents_exit() {
        let state = temp_dir("replace");
        let handover = Handover::prepare(&state, Path::new("/sys/fs/bpf/sluice")).unwrap();
        let old = handover.listen().unwrap().file();
        let new = handover.listen().unwrap().file();
        assert!(!temp_path(handover.path()).exists(), "the temporary name");
        old.remove_if_ours();
        assert!(handover.path().exists(), "the successor's socket stays");
        new.remove_if_ours();
        assert!(!handover.path().exists());
        fs::remove_dir_all(&state).unwrap();
    }
}
