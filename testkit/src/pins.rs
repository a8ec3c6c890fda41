//! The agent's pins on bpffs, removed whatever state the agent left them
//! in (a killed agent leaves its maps and links pinned).

use std::{
    io,
    path::{Path, PathBuf},
};

/// Where the tests pin their programs and maps.
pub const BPFFS: &str = "/sys/fs/bpf";

/// A pin directory on bpffs: on drop it and every sibling whose name starts
/// with its name (what an agent sets aside while it replaces old pins) are
/// removed with everything pinned in them. Unpinning a link detaches its
/// program once nothing else holds it.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// `BPFFS/name`, not made here: the agent makes it.
    pub fn named(name: &str) -> PinDir {
        PinDir {
            path: Path::new(BPFFS).join(name),
        }
    }

    /// The directory, absolute.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let (Some(parent), Some(name)) = (self.path.parent(), self.path.file_name()) else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(parent) else {
            return;
        };
        let name = name.to_string_lossy();
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(name.as_ref())
                && let Err(e) = remove(&entry.path())
            {
                eprintln!(
                    "test kit: cannot remove pin {}: {e}",
                    entry.path().display()
                );
            }
        }
    }
}

/// Removes a pin or a directory of pins (bpffs has no `remove_dir_all`
/// worries: its files are unlinked like any other).
fn remove(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        for entry in std::fs::read_dir(path)?.flatten() {
            remove(&entry.path())?;
        }
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    }
}
