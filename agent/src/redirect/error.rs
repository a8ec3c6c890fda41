//! What can go wrong on the kernel side, named by the map, program, pin or
//! cgroup it concerns, with the kernel's own chain of causes.

use std::{io, path::PathBuf};

/// Why the redirect could not be installed or changed.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot prepare the pin directory {path}: {error}")]
    PinDir { path: PathBuf, error: io::Error },
    #[error(
        "the kernel refused Sluice's eBPF object; Sluice needs Linux 5.15 or newer with \
         CONFIG_CGROUP_BPF and BTF, and maps pinned by an incompatible version must be removed \
         first (`rm -r` the pin directory). Cause: {0}"
    )]
    Load(ErrorChain),
    #[error(
        "the kernel refused program {program}: this kernel lacks the program type \
         (cgroup_sock_addr or sock_ops) or a helper Sluice needs (Linux 5.15+ with \
         CONFIG_CGROUP_BPF). Cause: {error}"
    )]
    Program {
        program: &'static str,
        error: ErrorChain,
    },
    #[error("cannot attach {program} to cgroup {cgroup}: {error}")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        error: ErrorChain,
    },
    #[error("cannot open cgroup {path}: {error}")]
    Cgroup { path: PathBuf, error: io::Error },
    #[error("cannot pin {what} at {path}: {error}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        error: ErrorChain,
    },
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {map}: {error}")]
    Map {
        map: &'static str,
        error: ErrorChain,
    },
}

pub(super) fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> RedirectError {
    move |e| RedirectError::Map {
        map,
        error: ErrorChain::of(&e),
    }
}

/// An error and its causes, rendered once as `outer: cause: cause`. aya's
/// errors keep the errno in their source chain, which is what tells an
/// operator what went wrong.
#[derive(Debug)]
pub struct ErrorChain(String);

impl ErrorChain {
    pub fn of(e: &(dyn std::error::Error + 'static)) -> ErrorChain {
        let mut text = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            let part = c.to_string();
            // Some errors already print their source; do not repeat it.
            if !text.contains(&part) {
                text.push_str(": ");
                text.push_str(&part);
            }
            cause = c.source();
        }
        ErrorChain(text)
    }
}

impl std::fmt::Display for ErrorChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub(super) fn pin_err(
    what: &'static str,
    path: PathBuf,
    e: impl std::error::Error + Send + Sync + 'static,
) -> RedirectError {
    RedirectError::Pin {
        what,
        path,
        error: ErrorChain::of(&e),
    }
}
