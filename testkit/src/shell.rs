//! Running a shell command (`ip`, `sysctl`) and getting its output.

use std::process::Command;

/// A command that could not start or exited non-zero.
#[derive(Debug)]
pub struct CommandFailed {
    /// The command line.
    pub command: String,
    /// How it ended, or why it did not start.
    pub outcome: String,
    /// What it wrote to stderr.
    pub stderr: String,
}

impl std::fmt::Display for CommandFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` failed ({}): {}",
            self.command,
            self.outcome,
            self.stderr.trim()
        )
    }
}

impl std::error::Error for CommandFailed {}

/// Runs `cmd` with `sh -c`; returns its stdout, or what went wrong.
pub fn sh(cmd: &str) -> Result<String, CommandFailed> {
    let failed = |outcome: String, stderr: String| CommandFailed {
        command: cmd.to_owned(),
        outcome,
        stderr,
    };
    let out = Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map_err(|e| failed(format!("cannot start sh: {e}"), String::new()))?;
    if !out.status.success() {
        return Err(failed(
            out.status.to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
