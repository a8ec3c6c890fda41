//! The agent refuses to start, with one sentence saying why and how to fix
//! it, when the machine cannot run it, and leaves nothing behind.

use std::{os::unix::process::CommandExt, process::Command};

use crate::support::*;

fn run_agent(config: &AgentConfig, as_nobody: bool) -> (i32, String) {
    let mut cmd = Command::new(sluice_bin());
    cmd.args(["agent", "--config"]).arg(&config.path);
    if as_nobody {
        // 65534 is `nobody` on Debian; dropping uid clears all capabilities.
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_nothing_left(config: &AgentConfig) {
    assert!(!config.pin_dir.exists(), "pin dir left behind");
    assert!(!config.cgroup_root_path().exists(), "cgroup left behind");
}

#[test]
fn without_root_the_agent_names_the_missing_capabilities() {
    let config = AgentConfig::new(&[]);
    // The config must be readable by nobody.
    std::fs::set_permissions(
        &config.dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (code, err) = run_agent(&config, true);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.trim(),
        "error: sluice agent needs root or the capabilities CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN; \
         run it as root (or grant them, e.g. in the DaemonSet's securityContext)"
    );
    assert_nothing_left(&config);
}

#[test]
fn a_pin_dir_outside_bpffs_is_refused() {
    let mut config = AgentConfig::new(&[]);
    let not_bpffs = config.dir.join("pins");
    let mut text = config.base(&[]);
    text.agent.pin_dir = Some(not_bpffs.clone());
    config.write(&text);
    config.pin_dir = not_bpffs.clone();
    let (code, err) = run_agent(&config, false);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "{} is not on a bpf filesystem",
            not_bpffs.display()
        )),
        "{err}"
    );
    assert!(err.contains("mount -t bpf bpf /sys/fs/bpf"), "{err}");
    assert_nothing_left(&config);
}

#[test]
fn an_occupied_outbound_port_fails_cleanly() {
    let config = AgentConfig::new(&[]);
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", config.outbound_port)).unwrap();
    let (code, err) = run_agent(&config, false);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("cannot bind 127.0.0.1:{}", config.outbound_port)),
        "{err}"
    );
    assert_nothing_left(&config);
}
