//! The test kit: what the integration tests (`tests/`) and xtask share.
//!
//! - [`names`]: everything a test makes is named `sluice-test-<run>-...`,
//!   so that whatever a run leaves behind can be found.
//! - [`netns`], [`cgroup`], [`process`]: network namespaces, cgroup trees
//!   and child processes, each removed (or killed) when its guard drops,
//!   also when a test fails or panics; [`pins`] and [`tempdir`] likewise.
//! - [`leftovers`]: what a run left behind; `cargo xtask test` fails on it.
//! - [`shell`], [`port`], [`wait`]: running `ip` and friends, a port to
//!   listen on, waiting on a condition instead of sleeping.
//! - [`config`]: the agent's config file as typed builders, written as
//!   JSON (which is YAML); [`metrics`]: a Prometheus exposition, parsed.
//! - [`client`]: the test client, a process that makes calls from inside a
//!   workload's cgroup as an application would.
//!
//! It does not depend on the `sluice` crate: xtask builds it on a fresh
//! machine, before the eBPF toolchain that `sluice` needs exists.

pub mod cgroup;
pub mod client;
pub mod config;
pub mod leftovers;
pub mod metrics;
pub mod names;
pub mod netns;
pub mod pins;
pub mod port;
pub mod process;
pub mod shell;
pub mod tempdir;
pub mod wait;
