//! `cargo xtask fuzz`: runs the cargo-fuzz targets in fuzz/ for a bounded
//! time each, from the committed seeds; `cargo xtask test` runs it too.
//! A crash, a hang or an out-of-memory is a failure naming the target and
//! the input libFuzzer saved.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{display, run as run_cmd, workspace_root};

/// The targets, in the order they run: fuzz/fuzz_targets/<name>.rs, seeds
/// in fuzz/corpus/<name>/.
pub const TARGETS: [&str; 3] = ["config", "preamble", "identity"];

/// Seconds per target unless told otherwise.
pub const DEFAULT_SECONDS: u64 = 60;

/// One input taking longer than this is reported as a hang: every target
/// parses a few KiB at most, in microseconds.
const INPUT_TIMEOUT_SECONDS: u64 = 10;

#[derive(clap::Parser)]
pub struct FuzzArgs {
    /// Seconds per target. Not 0: libFuzzer reads that as no limit.
    #[arg(
        long,
        env = "SLUICE_FUZZ_SECONDS",
        default_value_t = DEFAULT_SECONDS,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub seconds: u64,
    /// One target (default: all).
    #[arg(value_parser = TARGETS)]
    pub target: Option<String>,
}

impl FuzzArgs {
    /// Every target, for `SLUICE_FUZZ_SECONDS` (or the default) seconds:
    /// what `cargo xtask test` runs.
    pub fn from_env() -> anyhow::Result<FuzzArgs> {
        use clap::Parser as _;
        FuzzArgs::try_parse_from(["fuzz"]).context("SLUICE_FUZZ_SECONDS")
    }
}

/// cargo-fuzz needs nightly (sancov passes); `--fuzz-dir` makes it
/// independent of the directory it is started from. No sanitizer: the
/// targets are safe Rust, where AddressSanitizer finds little a panic does
/// not, and with it (and full optimisation) a fresh build of the whole
/// tree (kube, aws-lc) took 7 to 11 minutes, over CI's budget; `--dev` with
/// the fuzz crate's opt-level 1 takes about 4.
fn cargo_fuzz(subcommand: &str) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz", subcommand])
        .args(["--fuzz-dir", "fuzz", "--sanitizer", "none", "--dev"]);
    cmd
}

pub fn run(args: FuzzArgs) -> anyhow::Result<()> {
    // One build for every target, so the time bound below is all fuzzing.
    run_cmd(&mut cargo_fuzz("build"))?;
    run_built(args)
}

/// The fuzz build running at the lowest CPU priority beside whatever comes
/// next: `cargo xtask test`'s test run leaves about half of two cores idle
/// (it waits on sockets and timers), and the fuzz build, the largest step
/// after the test build, takes that half instead of minutes of its own.
/// Its output goes to a log, printed when it fails. Dropped unfinished (a
/// step before it failed), it stops the build.
pub struct BackgroundBuild {
    child: Option<Child>,
    log: PathBuf,
    started: Instant,
}

impl BackgroundBuild {
    pub fn start() -> anyhow::Result<BackgroundBuild> {
        let log = crate::target_dir().join("fuzz-build.log");
        std::fs::create_dir_all(crate::target_dir())?;
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let build = cargo_fuzz("build");
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "19"])
            .arg(build.get_program())
            .args(build.get_args())
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        println!(
            "==> in the background, at the lowest priority: {} (log: {})",
            display(&cmd),
            log.display()
        );
        let child = cmd.spawn().context("cannot start the fuzz build")?;
        Ok(BackgroundBuild {
            child: Some(child),
            log,
            started: Instant::now(),
        })
    }

    /// Waits for the build; its error ends with the log's last lines.
    pub fn finish(mut self) -> anyhow::Result<()> {
        let mut child = self.child.take().expect("finished once");
        let status = child.wait().context("wait for the fuzz build")?;
        let seconds = self.started.elapsed().as_secs();
        if !status.success() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            bail!(
                "the fuzz build failed ({status}) after {seconds} s; the end of {}:\n{tail}",
                self.log.display()
            );
        }
        println!("fuzz build: done, {seconds} s after it started");
        Ok(())
    }
}

impl Drop for BackgroundBuild {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the targets of a finished fuzz build.
pub fn run_built(args: FuzzArgs) -> anyhow::Result<()> {
    let targets: Vec<&str> = match &args.target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    // The targets run side by side: each still gets its full time, and
    // CI's two cores finish all three in the time of one.
    let results: Vec<anyhow::Result<String>> = std::thread::scope(|scope| {
        let runs: Vec<_> = targets
            .iter()
            .map(|target| scope.spawn(move || run_target(target, args.seconds)))
            .collect();
        runs.into_iter()
            .map(|run| {
                run.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a fuzz run panicked")))
            })
            .collect()
    });
    let mut failed = None;
    for result in results {
        match result {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("{e:#}");
                failed.get_or_insert(e);
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Runs one target for `seconds` from a scratch copy of its seeds (what
/// libFuzzer adds to a corpus while it runs stays out of the repository).
/// Returns a one-line summary.
fn run_target(target: &str, seconds: u64) -> anyhow::Result<String> {
    let root = workspace_root();
    let seeds = root.join("fuzz/corpus").join(target);
    let scratch = std::env::temp_dir().join(format!("sluice-fuzz-{}-{target}", std::process::id()));
    copy_seeds(&seeds, &scratch)?;
    let result = fuzz_for(target, seconds, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn copy_seeds(seeds: &Path, scratch: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch).with_context(|| format!("create {}", scratch.display()))?;
    let entries = std::fs::read_dir(seeds)
        .with_context(|| format!("read the seeds in {}", seeds.display()))?;
    let mut copied = 0;
    for entry in entries {
        let path = entry?.path();
        if path.is_file() {
            let to = scratch.join(path.file_name().expect("a file has a name"));
            std::fs::copy(&path, &to).with_context(|| format!("copy {}", path.display()))?;
            copied += 1;
        }
    }
    if copied == 0 {
        bail!("{} holds no seed", seeds.display());
    }
    Ok(())
}

fn fuzz_for(target: &str, seconds: u64, corpus: &Path) -> anyhow::Result<String> {
    let mut cmd = cargo_fuzz("run");
    cmd.arg(target)
        .arg(corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .arg("-print_final_stats=1")
        .current_dir(workspace_root())
        .stderr(Stdio::piped());
    println!("==> {}", display(&cmd));
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", display(&cmd)))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut artifact: Option<PathBuf> = None;
    let (mut runs, mut per_second) = (None, None);
    let mut in_dictionary = false;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        // libFuzzer's progress (`#1234 NEW cov: ...`, `NEW_FUNC ...`) and
        // the dictionary it recommends at the end run to thousands of
        // lines; the final stats say what matters.
        if line.starts_with("###### Recommended dictionary") {
            in_dictionary = true;
        }
        let progress = line.starts_with('#') || line.trim_start().starts_with("NEW_FUNC");
        if !progress && !in_dictionary {
            eprintln!("{line}");
        }
        if line.starts_with("###### End of recommended dictionary") {
            in_dictionary = false;
        }
        if let Some(path) = line.split("Test unit written to ").nth(1) {
            artifact = Some(workspace_root().join(path.trim()));
        }
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units: ") {
            runs = n.trim().parse::<u64>().ok();
        }
        if let Some(n) = line.strip_prefix("stat::average_exec_per_sec: ") {
            per_second = n.trim().parse::<u64>().ok();
        }
    }
    let status = child.wait()?;
    let took = started.elapsed().as_secs();
    if !status.success() {
        match artifact {
            Some(path) => bail!(
                "fuzz target `{target}` failed ({status}): the input is {}; \
                 reproduce with `cargo +nightly fuzz run --fuzz-dir fuzz {target} {}`",
                path.display(),
                path.display()
            ),
            None => bail!(
                "fuzz target `{target}` failed ({status}) without saving an input: \
                 see its output above"
            ),
        }
    }
    Ok(format!(
        "fuzz {target}: no crash in {took} s, {} runs ({} exec/s)",
        runs.map_or("?".into(), |n| n.to_string()),
        per_second.map_or("?".into(), |n| n.to_string()),
    ))
}
