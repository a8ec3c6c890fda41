# syntax=docker/dockerfile:1
# The agent's image: one static `sluice` binary and nothing else.
#
#   docker build -t REGISTRY/sluice:0.1.0 .
#
# config/kubernetes/daemonset.yaml runs it. x86_64 only for now.

# The stable Rust the workspace declares (rust-version in Cargo.toml).
ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The eBPF programs are built with a nightly, and its LLVM must be the major
# bpf-linker is built against (22): bpf-linker cannot read bitcode from a
# newer LLVM. So the nightly is pinned to the one the project's machines use
# (rustc 1.97, LLVM 22.1) rather than whatever nightly is current.
ARG RUST_NIGHTLY=nightly-2026-05-20
ARG BPF_LINKER_VERSION=0.13

# What `cargo xtask setup` installs (xtask/src/setup.rs), less the tools only
# the tests use: LLVM 22's development files and the libraries bpf-linker
# links with. Debian 12 carries LLVM 22 in bookworm-security.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev libxml2-dev \
 && rm -rf /var/lib/apt/lists/*

# agent/build.rs (aya-build) runs `rustup run nightly cargo build ...`, so the
# pinned nightly has to answer to the plain name `nightly`; rustup installs a
# dated one under its date, hence the rename.
RUN rustup toolchain install "$RUST_NIGHTLY" --profile minimal --component rust-src \
 && mv "$RUSTUP_HOME/toolchains/$RUST_NIGHTLY-x86_64-unknown-linux-gnu" \
       "$RUSTUP_HOME/toolchains/nightly-x86_64-unknown-linux-gnu" \
 && rustup run nightly rustc --version --verbose | grep '^LLVM version: 22\.'

RUN LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --locked \
      --version "~$BPF_LINKER_VERSION" --no-default-features --features llvm-22

WORKDIR /src
COPY . .

# glibc, linked statically, rather than musl: the agent brings no allocator of
# its own, musl's malloc is slower and serialises threads on one lock, and a
# proxy allocates on every burst of traffic; the figures in README.md were
# measured with glibc's. Static glibc cannot load NSS modules, which does not
# matter here: the agent resolves no host names. The flags go through the
# target's own variable so that they reach neither build scripts nor the
# nested eBPF build. The checks after the build refuse a binary that still
# needs a dynamic loader or a shared library (grep without -q: reading to the
# end keeps readelf from dying of SIGPIPE, which pipefail would count).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --locked -p sluice --target x86_64-unknown-linux-gnu \
 && install -D -m 0755 target/x86_64-unknown-linux-gnu/release/sluice /out/sluice \
 && ! readelf --program-headers --wide /out/sluice | grep INTERP \
 && ! readelf --dynamic /out/sluice | grep NEEDED \
 && /out/sluice --version

# distroless/static: CA certificates, /etc/passwd and tzdata, no shell. The
# root variant rather than :nonroot, because the agent runs as uid 0 with the
# capabilities the DaemonSet grants it. Pin a digest in production.
FROM gcr.io/distroless/static-debian12:latest
COPY --from=build /out/sluice /usr/local/bin/sluice
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["agent", "--config", "/etc/sluice/sluice.yaml"]
