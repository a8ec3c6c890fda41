//! `cargo xtask setup`: idempotent; checks each prerequisite and installs
//! only what is missing, saying what it does.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::run as run_cmd;

/// Debian packages bpf-linker is built against (LLVM 22), and tools the
/// tests use: iproute2 (network namespaces as nodes), prometheus (a real
/// server scrapes the agent; promtool checks the exposition), python3 (a
/// client that calls getpeername).
const APT_PACKAGES: [&str; 10] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
    "iproute2",
    "prometheus",
    "python3",
    // An HTTP/2 implementation that is not the agent's, for the tunnel's
    // interoperability test.
    "python3-h2",
    // Real gRPC clients and servers (the C core) for the request path's
    // tests.
    "python3-grpcio",
];
const BPF_LINKER_VERSION: &str = "0.13";
/// The fuzz targets (fuzz/) are built and run by cargo-fuzz.
const CARGO_FUZZ_VERSION: &str = "0.13";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn run() -> anyhow::Result<()> {
    println!("== setup: checking the eBPF toolchain and bpffs");
    nightly_with_rust_src()?;
    apt_packages()?;
    bpf_linker()?;
    cargo_fuzz()?;
    bpffs()?;
    println!("== setup: done");
    Ok(())
}

fn ok(what: &str) {
    println!("   ok: {what}");
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_with_rust_src() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is not on PATH; install Rust with rustup first")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("   installing the nightly toolchain (the eBPF programs need it)");
        run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    } else {
        ok("nightly toolchain");
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        ok("rust-src for nightly");
    } else {
        println!("   adding rust-src to nightly (-Z build-std=core needs it)");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

pub fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn apt_packages() -> anyhow::Result<()> {
    if ensure_packages(&APT_PACKAGES)? {
        ok(&format!("Debian packages ({})", APT_PACKAGES.join(", ")));
    }
    Ok(())
}

/// Installs whichever of `packages` are missing; true when none were.
pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<bool> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(true);
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run `cargo xtask setup` as root (or apt-get install them)",
            missing.join(" ")
        );
    }
    println!("   installing Debian packages: {}", missing.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(false)
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version.contains(&format!(" {BPF_LINKER_VERSION}.")) {
        ok(&format!("bpf-linker ({})", version.trim()));
        return Ok(());
    }
    println!(
        "   building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once per machine)"
    );
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                &format!("~{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

fn cargo_fuzz() -> anyhow::Result<()> {
    let version = output(Command::new("cargo-fuzz").arg("--version")).unwrap_or_default();
    if version.contains(&format!(" {CARGO_FUZZ_VERSION}.")) {
        ok(&format!("cargo-fuzz ({})", version.trim()));
        return Ok(());
    }
    println!("   installing cargo-fuzz {CARGO_FUZZ_VERSION} (a minute, once per machine)");
    run_cmd(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        &format!("~{CARGO_FUZZ_VERSION}"),
    ]))
}

fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_dev, at, fstype) = (f.next(), f.next(), f.next());
        at == Some("/sys/fs/bpf") && fstype == Some("bpf")
    });
    if mounted {
        ok("bpffs at /sys/fs/bpf");
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at /sys/fs/bpf: run `cargo xtask setup` as root");
    }
    println!("   mounting bpffs at /sys/fs/bpf");
    if !Path::new("/sys/fs/bpf").exists() {
        std::fs::create_dir_all("/sys/fs/bpf").context("create /sys/fs/bpf")?;
    }
    run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
