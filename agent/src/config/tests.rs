//! Tests about a whole config: the base every config test starts from,
//! its defaults, and the reference that must name every field. Each
//! section's own rules are tested beside it.

use super::*;

/// A valid config; tests change a line or two of it.
pub(super) const GOOD: &str = "\
node:
  name: local
workloads:
  - name: checkout
    namespace: payments
    service_account: checkout
services:
  - name: payments
    address: 10.96.0.10
    port: 8080
    endpoints:
      - address: 127.0.0.1
        port: 9001
      - address: 127.0.0.1
        port: 9002
        weight: 3
        workload: checkout
";

/// The problems of `text`, which must parse and must not validate.
pub(super) fn problems(text: &str) -> Vec<Problem> {
    Config::parse(text, "t.yaml")
        .expect("parses")
        .validate()
        .expect_err("must be invalid")
}

#[test]
fn good_config_parses_with_defaults() {
    let c = Config::parse(GOOD, "t.yaml").unwrap();
    c.validate().unwrap();
    assert_eq!(c.agent.outbound, "127.0.0.1:15001".parse().unwrap());
    assert_eq!(c.node.cgroup_root.value, "sluice");
    assert_eq!(c.workloads[0].cgroup(), "checkout");
    assert_eq!(c.services[0].endpoints[0].weight.value, 1);
    assert_eq!(c.services[0].endpoints[1].weight.value, 3);
    assert_eq!(c.services[0].port.referenced.line(), 10);
}

/// The reference must name every field serde accepts. The field lists
/// come from serde itself: an unknown key in each section makes it
/// answer "expected one of ...".
#[test]
fn reference() {
    let reference = include_str!("../../../config/REFERENCE.md");
    let sections = [
        ("top level", format!("{GOOD}zz_unknown: 1\n")),
        (
            "node",
            GOOD.replace("  name: local\n", "  name: local\n  zz_unknown: 1\n"),
        ),
        ("agent", format!("{GOOD}agent:\n  zz_unknown: 1\n")),
        (
            "workloads",
            GOOD.replace(
                "    namespace: payments\n    service_account",
                "    zz_unknown: 1\n    namespace: payments\n    service_account",
            ),
        ),
        (
            "services",
            GOOD.replace("    port: 8080\n", "    port: 8080\n    zz_unknown: 1\n"),
        ),
        (
            "endpoints",
            GOOD.replace(
                "        port: 9001\n",
                "        port: 9001\n        zz_unknown: 1\n",
            ),
        ),
    ];
    for (section, text) in sections {
        let err = Config::parse(&text, "t.yaml").unwrap_err().to_string();
        let (_, fields) = err
            .split_once("expected one of ")
            .unwrap_or_else(|| panic!("{section}: {err}"));
        let fields: Vec<&str> = fields.split(", ").map(|f| f.trim_matches('`')).collect();
        assert!(fields.len() >= 2, "{section}: {err}");
        for field in fields {
            assert!(
                reference.contains(&format!("| `{field}` |"))
                    || reference.contains(&format!("## `{field}`")),
                "config/REFERENCE.md does not describe {section} field `{field}`"
            );
        }
    }
}
