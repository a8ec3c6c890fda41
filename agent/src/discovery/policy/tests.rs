//! Tests of the policy module as a whole: the resource against its CRD,
//! and the shipped examples; and the policies and pods the other tests
//! build.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Value, json};

use super::*;
use crate::config::{Authorization, Decision};

/// The trust domain of every test policy.
pub(super) const TD: &str = "cluster.local";

/// A policy as the API server would return it (generation 3).
pub(super) fn policy(namespace: &str, name: &str, spec: Value) -> SluicePolicy {
    serde_json::from_value(json!({
        "apiVersion": "sluice.io/v1alpha1",
        "kind": "SluicePolicy",
        "metadata": { "namespace": namespace, "name": name, "generation": 3 },
        "spec": spec,
    }))
    .unwrap()
}

/// A pod with these labels.
pub(super) fn pod(namespace: &str, name: &str, labels: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "namespace": namespace, "name": name, "labels": labels },
    }))
    .unwrap()
}

/// An authorization's default and patterns, to compare.
pub(super) fn rules(authorization: &Authorization) -> (Decision, Vec<&str>, Vec<&str>) {
    (
        authorization.default,
        authorization.allow.iter().map(|p| p.as_str()).collect(),
        authorization.deny.iter().map(|p| p.as_str()).collect(),
    )
}

/// A (namespace, name) key.
pub(super) fn key(namespace: &str, name: &str) -> (String, String) {
    (namespace.to_owned(), name.to_owned())
}

#[test]
fn the_resource_is_what_the_crd_declares() {
    use kube::Resource;
    assert_eq!(SluicePolicy::api_version(&()), "sluice.io/v1alpha1");
    assert_eq!(SluicePolicy::plural(&()), "sluicepolicies");
    assert_eq!(
        SluicePolicy::url_path(&(), Some("shop")),
        "/apis/sluice.io/v1alpha1/namespaces/shop/sluicepolicies"
    );
    // What `discovery::reflect` asks of a watched kind.
    fn watchable<K>()
    where
        K: Resource<DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + Send
            + Sync
            + serde::de::DeserializeOwned
            + 'static,
    {
    }
    watchable::<SluicePolicy>();
    let text = serde_json::to_value(policy("shop", "p", json!({}))).unwrap();
    assert_eq!(text["apiVersion"], "sluice.io/v1alpha1");
    assert_eq!(text["kind"], "SluicePolicy");

    #[derive(Deserialize)]
    struct Crd {
        spec: CrdSpec,
    }
    #[derive(Deserialize)]
    struct CrdSpec {
        group: String,
        scope: String,
        names: Names,
        versions: Vec<Version>,
    }
    #[derive(Deserialize)]
    struct Names {
        kind: String,
        plural: String,
    }
    #[derive(Deserialize)]
    struct Version {
        name: String,
    }
    let crd: Crd =
        serde_saphyr::from_str(&read(&examples_dir().join("../policy-crd.yaml"))).unwrap();
    assert_eq!(crd.spec.group, GROUP);
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.kind, KIND);
    assert_eq!(crd.spec.names.plural, PLURAL);
    let versions: Vec<&str> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(versions, [VERSION]);
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/kubernetes/examples")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// The shipped examples: each valid one compiles with no problem, each
/// invalid one yields a problem whose field its first-line comment names.
#[test]
fn the_examples_compile_and_the_invalid_ones_are_refused_by_field() {
    let valid = yaml_files(&examples_dir());
    assert!(!valid.is_empty());
    for path in &valid {
        let policy: SluicePolicy = serde_saphyr::from_str(&read(path)).unwrap();
        let compiled = compile::<Pod>(std::slice::from_ref(&policy), &[], TD);
        assert!(
            compiled.problems.is_empty(),
            "{}: {:?}",
            path.display(),
            compiled.problems
        );
    }
    let frontend: SluicePolicy =
        serde_saphyr::from_str(&read(&examples_dir().join("policy-allow-frontend.yaml"))).unwrap();
    let pods = [
        pod("shop", "checkout-1", json!({ "app": "checkout" })),
        pod("shop", "cart-1", json!({ "app": "cart" })),
    ];
    let compiled = compile(&[frontend], &pods, TD);
    let by_pod: HashMap<_, _> = compiled.by_pod.iter().map(|(k, a)| (k, rules(a))).collect();
    assert_eq!(
        by_pod,
        HashMap::from([(
            &key("shop", "checkout-1"),
            (
                Decision::Deny,
                vec!["spiffe://cluster.local/ns/shop/sa/frontend"],
                vec![],
            )
        )])
    );

    let invalid = yaml_files(&examples_dir().join("invalid"));
    assert!(invalid.len() >= 4);
    for path in &invalid {
        let text = read(path);
        let policy: SluicePolicy = serde_saphyr::from_str(&text).unwrap();
        let compiled = compile::<Pod>(&[policy], &[], TD);
        let first_line = text.lines().next().unwrap();
        assert!(first_line.starts_with("# Invalid: "), "{}", path.display());
        let problem = compiled
            .problems
            .first()
            .unwrap_or_else(|| panic!("{}: accepted", path.display()));
        assert!(
            first_line.contains(&format!("{} ", problem.field)),
            "{}: the comment does not name {}",
            path.display(),
            problem.field
        );
    }
}
