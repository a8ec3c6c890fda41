//! Names of what the tests make: cgroups, pin directories, network
//! namespaces, temporary directories. Each starts with the run's prefix, so
//! that [`crate::leftovers`] finds whatever a run left behind, and two runs
//! on one machine never take each other's.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The environment variable that names a run (`cargo xtask test` sets it
/// for the tests it starts; every process they start inherits it).
pub const RUN_VAR: &str = "SLUICE_TEST_RUN";

/// What every name starts with: `sluice-test-<run>-`, or `sluice-test-`
/// when no run is named (a test binary started by hand).
pub fn prefix() -> String {
    match std::env::var(RUN_VAR) {
        Ok(run) if !run.is_empty() => run_prefix(&run),
        _ => "sluice-test-".to_owned(),
    }
}

/// The prefix of run `run`'s names.
pub fn run_prefix(run: &str) -> String {
    format!("sluice-test-{run}-")
}

/// A name unique to this process and call: `<prefix><pid>-<n>-<tag>`.
pub fn unique(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}{}-{}-{tag}",
        prefix(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
