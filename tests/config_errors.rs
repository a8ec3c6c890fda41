//! Bad config files: `sluice config check` and `sluice agent` both refuse
//! them with file:line and the field, exit non-zero, and touch nothing.

mod support;

use std::{path::PathBuf, process::Command};

use support::*;

const BASE: &str = "\
node:
  name: local
workloads:
  - name: checkout
services:
  - name: payments
    address: 127.77.0.10
    port: 8080
    endpoints:
      - address: 127.0.0.1
        port: 9001
";

struct BadConfig {
    dir: PathBuf,
    path: PathBuf,
}

impl BadConfig {
    fn new(text: &str) -> BadConfig {
        let dir = std::env::temp_dir().join(unique("badcfg"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sluice.yaml");
        std::fs::write(&path, text).unwrap();
        BadConfig { dir, path }
    }

    /// Runs `sluice ARGS... <file>`; returns (exit code, stderr).
    fn run(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(sluice_bin())
            .args(args)
            .arg(&self.path)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Both commands must refuse the file with the same message.
    fn refused(&self) -> String {
        let (code, check) = self.run(&["config", "check"]);
        assert_eq!(code, 2, "config check: {check}");
        let (code, agent) = self.run(&["agent", "--config"]);
        assert_eq!(code, 2, "agent: {agent}");
        assert_eq!(check, agent);
        check
    }
}

impl Drop for BadConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_good_base_config_passes() {
    let cfg = BadConfig::new(BASE);
    let out = Command::new(sluice_bin())
        .args(["config", "check"])
        .arg(&cfg.path)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 workloads, 1 services)"));
}

#[test]
fn duplicate_service_address_names_both_services() {
    let cfg = BadConfig::new(&format!(
        "{BASE}  - name: ledger\n    address: 127.77.0.10\n    port: 8080\n    endpoints:\n      \
         - address: 127.0.0.1\n        port: 9002\n"
    ));
    let err = cfg.refused();
    let expected = format!(
        "{}:13: services[1].address: 127.77.0.10:8080 is already the address of services[0] (`payments`)",
        cfg.path.display()
    );
    assert_eq!(err.trim(), expected);
}

#[test]
fn endpoint_without_port_names_line_and_field() {
    let cfg = BadConfig::new(&BASE.replace("        port: 9001\n", ""));
    let err = cfg.refused();
    assert!(
        err.starts_with(&format!("{}:10:", cfg.path.display())),
        "{err}"
    );
    assert!(err.contains("missing field `port`"), "{err}");
}

#[test]
fn unknown_workload_is_named() {
    let cfg = BadConfig::new(&format!("{BASE}        workload: ghost\n"));
    let err = cfg.refused();
    assert_eq!(
        err.trim(),
        format!(
            "{}:12: services[0].endpoints[0].workload: unknown workload `ghost`; define it under workloads",
            cfg.path.display()
        )
    );
}

#[test]
fn unknown_field_is_rejected_with_its_line() {
    let cfg =
        BadConfig::new(&BASE.replace("    port: 8080\n", "    port: 8080\n    timeout: 5s\n"));
    let err = cfg.refused();
    assert!(
        err.starts_with(&format!("{}:9:", cfg.path.display())),
        "{err}"
    );
    assert!(err.contains("unknown field `timeout`"), "{err}");
}

#[test]
fn a_value_of_the_wrong_type_names_its_line() {
    let cfg = BadConfig::new(&BASE.replace("port: 8080", "port: eighty"));
    let err = cfg.refused();
    assert!(
        err.starts_with(&format!("{}:8:", cfg.path.display())),
        "{err}"
    );
}

#[test]
fn several_problems_are_reported_together() {
    let cfg = BadConfig::new(&BASE.replace("port: 9001", "port: 0").replace(
        "  - name: checkout\n",
        "  - name: checkout\n  - name: checkout\n",
    ));
    let err = cfg.refused();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].contains(":5: workloads[1].name: workload `checkout` is already defined"));
    assert!(lines[1].contains(":5: workloads[1].cgroup: cgroup `checkout` is already used"));
    assert!(lines[2].contains(":12: services[0].endpoints[0].port: must not be 0"));
}

#[test]
fn a_missing_file_is_named() {
    let out = Command::new(sluice_bin())
        .args(["config", "check", "/nonexistent/sluice.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/sluice.yaml: cannot read the config file"),
        "{err}"
    );
}

#[test]
fn exec_with_an_unknown_workload_names_the_known_ones() {
    let cfg = BadConfig::new(BASE);
    let out = Command::new(sluice_bin())
        .args(["exec", "--workload", "ghost", "--config"])
        .arg(&cfg.path)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no workload named `ghost` (defined: checkout)"),
        "{err}"
    );
}

/// Every config the project ships is valid.
#[test]
fn every_shipped_config_passes_the_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut files = vec![root.join("sluice.yaml")];
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        files.push(entry.unwrap().path());
    }
    assert!(files.len() >= 4);
    for file in files {
        let out = Command::new(sluice_bin())
            .args(["config", "check"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
