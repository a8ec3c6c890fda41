//! What a test run left behind: cgroups, bpffs pins, network namespaces
//! and temporary directories named with its prefix, and processes that
//! still carry its name in their environment.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    cgroup,
    names::{RUN_VAR, run_prefix},
    netns::NETNS_DIR,
    pins::BPFFS,
    wait::wait_until,
};

/// Everything run `run` left, one line each (`cgroup PATH`, `process PID
/// (COMMAND)`, ...); empty when it left nothing. A process killed a moment
/// ago may still be on its way out, so this waits up to 5 s for the list
/// to empty before it answers.
pub fn find(run: &str) -> Vec<String> {
    let mut left = Vec::new();
    wait_until(Duration::from_secs(5), || {
        left = look(run);
        left.is_empty()
    });
    left
}

fn look(run: &str) -> Vec<String> {
    let prefix = run_prefix(run);
    let mut left = Vec::new();
    let mut places = vec![
        ("pin", PathBuf::from(BPFFS)),
        ("network namespace", PathBuf::from(NETNS_DIR)),
        ("temporary directory", std::env::temp_dir()),
    ];
    if let Ok(mount) = cgroup::mount() {
        places.insert(0, ("cgroup", mount));
    }
    for (what, dir) in places {
        for path in named(&dir, &prefix) {
            left.push(format!("{what} {}", path.display()));
        }
    }
    left.extend(
        processes(run)
            .into_iter()
            .map(|(pid, command)| format!("process {pid} ({command})")),
    );
    left
}

/// Entries of `dir` whose name starts with `prefix`.
fn named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Live processes (zombies aside: they hold nothing) whose environment
/// names run `run`, other than this one: (pid, command line).
fn processes(run: &str) -> Vec<(u32, String)> {
    let wanted = format!("{RUN_VAR}={run}");
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<(u32, String)> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == wanted.as_bytes()))
        })
        .filter(|&pid| !zombie(pid))
        .map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let command = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (pid, command.trim().to_owned())
        })
        .collect();
    found.sort();
    found
}

/// Whether `pid` has exited and waits to be reaped (or is gone already).
fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        // The state follows the command name, which may hold spaces and
        // parentheses: it comes after the last `)`.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_named_for_the_run_is_found_until_it_goes() {
        let run = format!("unit{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("{}1-0-cfg", run_prefix(&run)));
        std::fs::create_dir_all(&dir).unwrap();
        let left = look(&run);
        std::fs::remove_dir(&dir).unwrap();
        assert_eq!(
            left,
            [format!("temporary directory {}", dir.display())],
            "another run's names are not this run's"
        );
        assert!(look(&run).is_empty());
    }

    #[test]
    fn a_process_carrying_the_run_in_its_environment_is_found() {
        let run = format!("proc{}", std::process::id());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(RUN_VAR, &run)
            .spawn()
            .unwrap();
        // Until it has exec'd, the child shows this process's environment.
        let mut left = Vec::new();
        wait_until(Duration::from_secs(5), || {
            left = look(&run);
            !left.is_empty()
        });
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(left, [format!("process {} (sleep 30)", child.id())]);
        assert!(look(&run).is_empty());
    }
}
