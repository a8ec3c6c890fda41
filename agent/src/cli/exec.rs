//! `sluice exec`: run a command as a meshed workload on this machine.

use std::{os::unix::process::CommandExt, process::Command};

use anyhow::{Context as _, anyhow};

use super::Outcome;
use crate::{config::Config, redirect::cgroup};

/// Moves this process into the workload's cgroup (creating it if needed)
/// and replaces it with `command`. Returns only on failure.
pub fn exec(config: &Config, workload: &str, command: &[String]) -> anyhow::Result<Outcome> {
    let Some(spec) = config.workload(workload) else {
        let known: Vec<&str> = config.workloads.iter().map(|w| w.name.as_str()).collect();
        eprintln!(
            "{}: no workload named `{workload}` (defined: {})",
            config.source.display(),
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
        return Ok(Outcome::Invalid);
    };
    let mount = cgroup::cgroup2_mount()
        .ok_or_else(|| anyhow!("no cgroup v2 hierarchy is mounted (none in /proc/mounts)"))?;
    let path = mount
        .join(config.node.cgroup_root.get())
        .join(spec.cgroup());
    cgroup::create_all(&path)?;
    cgroup::enter(&path, std::process::id())?;
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow!("no command given"))?;
    let err = Command::new(program).args(args).exec();
    Err(err).with_context(|| format!("cannot run `{program}`"))
}
