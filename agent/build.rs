//! Builds the eBPF programs (agent-ebpf) with the nightly toolchain and
//! bpf-linker, and leaves the object in OUT_DIR for `include_bytes!`.
//! `cargo xtask setup` installs what this needs.
use anyhow::{Context as _, anyhow};

const EBPF_PACKAGE: &str = "sluice-ebpf";

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("{EBPF_PACKAGE} is not in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", package.manifest_path))?;
    let ebpf = aya_build::Package {
        name: EBPF_PACKAGE,
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    // The object is the same whichever profile builds the agent (clippy,
    // tests, release, fuzzing): aya-build makes it under OUT_DIR, where
    // each profile would build it and `core` for the bpf target anew
    // (half a minute each); so it builds in one directory they share, and
    // the object is copied to this profile's OUT_DIR.
    let out_dir = std::env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR is not set"))?;
    let shared = metadata.target_directory.join("ebpf");
    std::fs::create_dir_all(&shared).with_context(|| format!("cannot create {shared}"))?;
    // SAFETY: the build script has no other thread that reads the
    // environment.
    unsafe { std::env::set_var("OUT_DIR", &shared) };
    let built = aya_build::build_ebpf([ebpf], aya_build::Toolchain::default());
    // SAFETY: as above.
    unsafe { std::env::set_var("OUT_DIR", &out_dir) };
    built.map_err(|e| {
        anyhow!(
            "building the eBPF programs failed: {e:#}\n\
             (run `cargo xtask setup` to install the nightly rust-src and bpf-linker they need)"
        )
    })?;
    let object = shared.join(EBPF_PACKAGE);
    let copy = std::path::Path::new(&out_dir).join(EBPF_PACKAGE);
    std::fs::copy(&object, &copy).with_context(|| format!("cannot copy {object}"))?;
    Ok(())
}
