//! Bad config files: `sluice config check` and `sluice agent` both refuse
//! them with file:line and the field, exit non-zero, and touch nothing.

use std::{path::PathBuf, process::Command};

use crate::support::*;

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
    path: PathBuf,
    _dir: TempDir,
}

impl BadConfig {
    fn new(text: &str) -> BadConfig {
        let dir = TempDir::create("badcfg").unwrap();
        let path = dir.join("sluice.yaml");
        std::fs::write(&path, text).unwrap();
        BadConfig { path, _dir: dir }
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

#[test]
fn a_non_loopback_admin_address_is_refused() {
    let cfg = BadConfig::new(&format!("{BASE}agent:\n  admin: 0.0.0.0:15020\n"));
    let err = cfg.refused();
    let expected = format!(
        "{}:13: agent.admin: 0.0.0.0:15020 is not a loopback address",
        cfg.path.display()
    );
    assert!(err.starts_with(&expected), "{err}");
    assert!(err.contains("agent.metrics"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn admin_on_node_address_is_refused_and_points_to_agent_metrics() {
    let cfg = BadConfig::new(&format!("{BASE}agent:\n  admin_on_node_address: true\n"));
    let err = cfg.refused();
    let expected = format!(
        "{}:13: agent.admin_on_node_address: was removed",
        cfg.path.display()
    );
    assert!(err.starts_with(&expected), "{err}");
    assert!(err.contains("set agent.metrics"), "{err}");
}

/// The Kubernetes install, read as `kubectl apply -k` would take it (the
/// files the kustomization lists) plus the PodMonitor applied beside it:
/// off the node's loopback the agent exposes the inbound mTLS port and the
/// metrics listener and nothing else, and kubelet and Prometheus use the
/// metrics listener.
#[test]
fn the_shipped_manifests_expose_only_metrics_off_loopback() {
    use serde_json::Value;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/kubernetes");
    let read = |name: &str| -> Vec<Value> {
        let text =
            std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let kustomization = read("kustomization.yaml").remove(0);
    let mut objects: Vec<Value> = kustomization["resources"]
        .as_array()
        .expect("kustomization.yaml lists resources")
        .iter()
        .flat_map(|r| read(r.as_str().expect("a resource is a file name")))
        .collect();
    objects.extend(read("podmonitor.yaml"));
    let only = |kind: &str| -> &Value {
        let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
        assert_eq!(found.len(), 1, "one {kind} in the install");
        found[0]
    };

    // The embedded config, judged by the agent's own loader.
    let config_text = only("ConfigMap")["data"]["sluice.yaml"]
        .as_str()
        .expect("configmap.yaml carries sluice.yaml");
    let cfg = BadConfig::new(config_text);
    let config = sluice::config::Config::load(&cfg.path)
        .unwrap_or_else(|e| panic!("configmap.yaml sluice.yaml: {e}"));
    let admin = config.agent.admin.get();
    assert!(admin.ip().is_loopback(), "agent.admin is {admin}");
    let metrics = config
        .agent
        .metrics
        .as_ref()
        .expect("configmap.yaml sets agent.metrics")
        .get();
    let exposed: Vec<&str> = config
        .listeners()
        .iter()
        .filter(|l| !l.addr.ip().is_loopback())
        .map(|l| l.field)
        .collect();
    assert_eq!(exposed, ["agent.inbound_port", "agent.metrics"]);
    // kubelet probes the pod's address, the node's with hostNetwork.
    let pod = &only("DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert!(
        metrics.ip().is_unspecified() || metrics.ip() == config.node.address,
        "agent.metrics {metrics} is not on the node's address"
    );

    let mut probes = 0;
    for container in pod["containers"].as_array().expect("containers") {
        for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let probe = &container[kind];
            if probe.is_null() {
                continue;
            }
            probes += 1;
            let get = &probe["httpGet"];
            assert_eq!(get["port"], metrics.port(), "{kind}: {probe}");
            let path = get["path"].as_str().unwrap_or_default();
            assert!(
                ["/healthz", "/readyz"].contains(&path),
                "{kind} asks for {path}, which the metrics listener does not serve"
            );
        }
    }
    assert!(probes >= 2, "liveness and readiness probes");

    let endpoints = only("PodMonitor")["spec"]["podMetricsEndpoints"]
        .as_array()
        .expect("podMetricsEndpoints");
    assert!(!endpoints.is_empty());
    for endpoint in endpoints {
        assert_eq!(endpoint["path"], "/metrics");
        let targets: Vec<&Value> = endpoint["relabelings"]
            .as_array()
            .expect("relabelings")
            .iter()
            .filter(|r| r["targetLabel"] == "__address__")
            .collect();
        assert_eq!(targets.len(), 1, "{endpoint}");
        assert_eq!(
            targets[0]["replacement"],
            format!("${{1}}:{}", metrics.port()),
            "the PodMonitor scrapes the metrics port"
        );
    }
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

/// A kernel-mode service connects the caller straight to an endpoint with
/// no identity: `config check` says so, and refuses one that carries an
/// authorization policy, naming the line and field.
#[test]
fn kernel_mode_carries_no_identity_and_cannot_be_authorized() {
    let kernel = BASE.replace("    port: 8080\n", "    port: 8080\n    mode: kernel\n");
    let ok = BadConfig::new(&kernel);
    let out = Command::new(sluice_bin())
        .args(["config", "check"])
        .arg(&ok.path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "service default/payments is mode: kernel: its connections carry no identity"
        ),
        "{stdout}"
    );

    let with_policy = kernel.replace(
        "    mode: kernel\n",
        "    mode: kernel\n    authorization:\n      default: deny\n",
    );
    let bad = BadConfig::new(&with_policy);
    let message = bad.refused();
    assert!(
        message.contains(":6: services[0].authorization:"),
        "{message}"
    );
    assert!(message.contains("no identity"), "{message}");
}

/// What the request path does not take yet is refused where it is
/// declared: requests to endpoints on other nodes over mTLS. An unknown
/// protocol names its line too, and so do a `requests` block on a TCP
/// service and settings out of range.
#[test]
fn a_protocol_the_agent_cannot_serve_yet_is_refused_with_its_line() {
    let declared = |protocol: &str| {
        BASE.replace(
            "    port: 8080\n",
            &format!("    port: 8080\n    protocol: {protocol}\n"),
        )
    };
    let kernel = declared("grpc").replace(
        "    protocol: grpc\n",
        "    protocol: grpc\n    mode: kernel\n",
    );
    let err = BadConfig::new(&kernel).refused();
    assert!(
        err.contains(":9: services[0].protocol: mode: kernel has no proxy to see requests"),
        "{err}"
    );
    // Requests to another node's endpoints ride the tunnels.
    let remote = declared("http").replace(
        "        port: 9001\n",
        "        port: 9001\n        node: node-b\n        service_account: ledger\n",
    ) + "nodes:\n  - name: node-b\n    address: 10.0.0.2\n";
    let (code, out) = BadConfig::new(&remote).run(&["config", "check"]);
    assert_eq!(code, 0, "{out}");
    let err = BadConfig::new(&declared("smtp")).refused();
    assert!(err.contains(":9:"), "{err}");
    let on_tcp = BASE.replace(
        "    port: 8080\n",
        "    port: 8080\n    requests:\n      timeout: 2s\n",
    );
    let err = BadConfig::new(&on_tcp).refused();
    assert!(
        err.contains(":10: services[0].requests: only requests have these settings"),
        "{err}"
    );
    let out_of_range = declared("http").replace(
        "    protocol: http\n",
        "    protocol: http\n    requests:\n      max_attempts: 9\n      \
         idempotency_header: \"bad header\"\n      timeout: 0s\n      \
         max_requests_per_connection: 0\n    circuit_breakers:\n      \
         max_pending_requests: 0\n",
    );
    let err = BadConfig::new(&out_of_range).refused();
    for expected in [
        ":11: services[0].requests.max_attempts: 9 is not between 1 and 5",
        ":12: services[0].requests.idempotency_header: `bad header` is not an HTTP header name",
        ":13: services[0].requests.timeout: must be longer than 0",
        ":14: services[0].requests.max_requests_per_connection: must be at least 1",
        ":16: services[0].circuit_breakers.max_pending_requests: must be at least 1",
    ] {
        assert!(err.contains(expected), "{expected}: {err}");
    }
    for protocol in ["http2", "grpc"] {
        let (code, out) = BadConfig::new(&declared(protocol)).run(&["config", "check"]);
        assert_eq!(code, 0, "{protocol}: {out}");
    }
    // A fallback names a service that exists and speaks the same, or is a
    // fixed answer; not both, not neither.
    let fallback = |block: &str| {
        declared("http").replace(
            "    protocol: http\n",
            &format!("    protocol: http\n    requests:\n      fallback:\n{block}"),
        )
    };
    for (block, expected) in [
        (
            "        service: backup\n",
            ":12: services[0].requests.fallback.service: no service default/backup",
        ),
        (
            "        service: payments\n",
            ":12: services[0].requests.fallback.service: a service cannot fall back to itself",
        ),
        (
            "        service: x\n        status: 503\n",
            ":12: services[0].requests.fallback: give one of `service`",
        ),
        (
            "        status: 999\n",
            ":12: services[0].requests.fallback.status: 999 is not an HTTP status",
        ),
    ] {
        let err = BadConfig::new(&fallback(block)).refused();
        assert!(err.contains(expected), "{expected}: {err}");
    }
    // HTTP to endpoints this agent reaches directly is taken.
    let (code, out) = BadConfig::new(&declared("http")).run(&["config", "check"]);
    assert_eq!(code, 0, "{out}");
}

/// An mtls service's endpoint on another node is never quietly reached in
/// plaintext: a node that is not under `nodes` (its agent cannot be
/// dialled), or an endpoint without the service account to verify, is
/// refused, naming the line and the field.
#[test]
fn an_mtls_endpoint_that_would_be_downgraded_is_refused() {
    let remote = "    mode: mtls\n    endpoints:\n      - address: 10.9.0.7\n        \
                  port: 9001\n        node: far\n";
    let base = BASE.replace(
        "    endpoints:\n      - address: 127.0.0.1\n        port: 9001\n",
        remote,
    );
    assert_ne!(base, BASE);
    let path = |cfg: &BadConfig| cfg.path.display().to_string();

    let unlisted = BadConfig::new(&base);
    let err = unlisted.refused();
    assert!(
        err.contains(&format!(
            "{}:11: services[0].endpoints[0].node: node `far` is not under `nodes`",
            path(&unlisted)
        )),
        "{err}"
    );
    assert!(err.contains("would be downgraded"), "{err}");

    let listed = BadConfig::new(&format!(
        "{base}nodes:\n  - name: far\n    address: 10.9.0.2\n"
    ));
    let err = listed.refused();
    assert_eq!(
        err.trim(),
        format!(
            "{}:11: services[0].endpoints[0].service_account: an endpoint on node `far` of an \
             mtls service needs the service account it runs as, to verify the peer's identity",
            path(&listed)
        )
    );

    let whole = BadConfig::new(&format!(
        "{}nodes:\n  - name: far\n    address: 10.9.0.2\n",
        base.replace(
            "node: far\n",
            "node: far\n        service_account: ledger\n"
        )
    ));
    let (code, out) = whole.run(&["config", "check"]);
    assert_eq!(code, 0, "{out}");
}
