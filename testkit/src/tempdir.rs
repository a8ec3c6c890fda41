//! A temporary directory that goes with its guard.

use std::{
    io,
    path::{Path, PathBuf},
};

use crate::names::unique;

/// A directory under the system's temporary directory, named
/// [`unique`]`(tag)`, removed with everything in it on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Makes the directory.
    pub fn create(tag: &str) -> io::Result<TempDir> {
        let path = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path })
    }

    /// The directory, absolute.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its name (the last component), unique to the run.
    pub fn name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("made from a UTF-8 name")
    }

    /// `path` joined to it.
    pub fn join(&self, path: impl AsRef<Path>) -> PathBuf {
        self.path.join(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("test kit: cannot remove {}: {e}", self.path.display());
        }
    }
}
