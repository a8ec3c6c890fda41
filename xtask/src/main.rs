//! Developer tasks: `cargo xtask setup | build | test | demo | bench | fuzz`.
//!
//! Every task starts with `setup`, which installs what is missing on a
//! fresh Debian 12 machine (as root) and says what it does.

mod bench;
mod demo;
mod fuzz;
mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use sluice_testkit::{leftovers, names};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Sluice developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build and the tests need; mount bpffs.
    Setup,
    /// Setup, then build the release binary (target/release/sluice, or
    /// under CARGO_TARGET_DIR).
    Build,
    /// Setup, then fmt check, clippy -D warnings, every test (as root; none
    /// may leave a cgroup, namespace, pin or process behind), and each fuzz
    /// target for SLUICE_FUZZ_SECONDS (60) seconds.
    Test,
    /// Setup, build, and run the agent on config/sluice.yaml with three
    /// payment backends and a meshed client.
    Demo,
    /// Setup, build, and measure Sluice beside HAProxy and nginx.
    Bench(bench::BenchArgs),
    /// Setup, then run the fuzz targets (fuzz/) for a bounded time each
    /// from their committed seeds; a crash fails.
    Fuzz(fuzz::FuzzArgs),
    /// (Used by bench.) Run one load-generator workload.
    #[command(hide = true)]
    Loadgen(bench::LoadArgs),
    /// (For profiling by hand.) Run the bench's echo backend until killed.
    #[command(hide = true)]
    Backend {
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            build_release()
        }
        Task::Test => {
            setup::run()?;
            test()
        }
        Task::Demo => {
            setup::run()?;
            build_release()?;
            demo::run()
        }
        Task::Bench(args) => {
            // The release build a full run runs itself again from finds
            // the setup done and the agent built.
            if !bench::is_release_rerun() {
                setup::run()?;
                build_release()?;
            }
            if cfg!(debug_assertions) && !args.quick {
                return bench::in_release_build();
            }
            bench::run(args)
        }
        Task::Fuzz(args) => {
            setup::run()?;
            fuzz::run(args)
        }
        Task::Loadgen(args) => bench::loadgen_main(args),
        Task::Backend { listen } => bench::backend_main(listen),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_owned()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (relative to the
/// workspace root), else `target/` in the workspace root.
pub fn target_dir() -> std::path::PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Runs a command in the workspace root, echoing it; fails on non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    cmd.current_dir(workspace_root());
    println!("==> {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn build_release() -> anyhow::Result<()> {
    run(cargo().args(["build", "--release", "--package", "sluice"]))
}

fn test() -> anyhow::Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // The fuzz crate is a workspace of its own.
    run(cargo().args([
        "fmt",
        "--all",
        "--manifest-path",
        "fuzz/Cargo.toml",
        "--",
        "--check",
    ]))?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // The eBPF crate builds only for the bpf target, with nightly.
    run(Command::new("rustup").args([
        "run",
        "nightly",
        "cargo",
        "clippy",
        "--package",
        "sluice-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--target-dir",
        &target_dir().join("ebpf-clippy").to_string_lossy(),
        "--",
        "-D",
        "warnings",
    ]))?;
    // Privileged tests need root: they load eBPF programs, make cgroups.
    if !setup::is_root() {
        bail!("the tests attach eBPF programs and create cgroups: run `cargo xtask test` as root");
    }
    // The tests name everything they make after this run, and every
    // process they start inherits the name: whatever is left is theirs.
    let test_run = format!("x{}", std::process::id());
    let test_cmd = || {
        let mut cmd = cargo();
        cmd.args([
            "test",
            "--workspace",
            "--exclude",
            "sluice-ebpf",
            "--all-targets",
        ]);
        cmd
    };
    // The test build first, with both cores; the fuzz build then takes
    // what the test run and the smoke benches leave idle.
    run(test_cmd().arg("--no-run"))?;
    let fuzz_build = fuzz::BackgroundBuild::start()?;
    let tests = run_tests(test_cmd().env(names::RUN_VAR, &test_run));
    let left = leftovers::find(&test_run);
    for thing in &left {
        println!("left behind by the tests: {thing}");
    }
    let totals = tests?;
    if !left.is_empty() {
        bail!(
            "the tests left {} things behind (listed above): each test must remove what it makes, \
             also when it fails",
            left.len()
        );
    }
    // The Kubernetes install: schema-valid manifests, an agent config the
    // agent accepts.
    run(Command::new("bash").arg("config/kubernetes/validate.sh"))?;
    // The benchmark harness as a smoke test: every path must carry
    // traffic. With the agent the tests ran (`cargo xtask bench` measures
    // the release build).
    let binary = Some(target_dir().join("debug/sluice"));
    let smoke = |upgrade, http| bench::BenchArgs {
        quick: true,
        upgrade,
        http,
        only: Vec::new(),
        binary: binary.clone(),
    };
    bench::run(smoke(false, false))?;
    // And the upgrade measurement, at a tenth of its connections.
    bench::run(smoke(true, false))?;
    // And the request rows, every path carrying requests.
    bench::run(smoke(false, true))?;
    // What the agent parses from outside (config, preamble, certificates)
    // under libFuzzer, a bounded time per target.
    fuzz_build.finish()?;
    fuzz::run_built(fuzz::FuzzArgs::from_env()?)?;
    // Last line: the totals, for whoever reads the end of the log.
    println!("{totals}");
    Ok(())
}

/// Runs `cargo test`, passing its output through, and ends with one total
/// line over all test binaries (`tests: N passed, N failed, N skipped`),
/// which it also returns.
fn run_tests(cmd: &mut Command) -> anyhow::Result<String> {
    use std::io::{BufRead as _, BufReader};
    cmd.current_dir(workspace_root())
        .stdout(std::process::Stdio::piped());
    println!("==> {}", display(cmd));
    let mut child = cmd.spawn().context("cannot start cargo test")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next())
                    && let Ok(n) = n.parse::<u64>()
                {
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    let totals = format!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    println!("{totals}");
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(totals)
}
