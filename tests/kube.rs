//! Discovery from a Kubernetes API server, as root. The API server is the
//! fake one in tests/support/kubeapi.rs (real HTTP, real list and watch
//! responses); the agent talks to it through kube-rs with a kubeconfig, as
//! it would to a real one. Pods are simulated for real: each a network
//! namespace on a veth pair plus a cgroup named after its uid, as the
//! kubelet names them, with a process inside.

use std::{net::SocketAddr, path::PathBuf, process::Stdio, time::Duration};

use crate::{
    l7::{Answer, HttpBackend, paced_gets_python, two_callers_at_once},
    support::{
        install::{ShippedNodes, agents_slice},
        kubeapi::{FakeApiServer, Resource, write_kubeconfig},
        pods::*,
        *,
    },
};
use serde_json::{Value, json};

const NODE: &str = "n1";
const CLUSTER_IP: &str = "127.77.12.10";

fn service_vip() -> SocketAddr {
    format!("{CLUSTER_IP}:8080").parse().unwrap()
}

fn namespace(name: &str, mode: &str) -> Value {
    json!({
        "kind": "Namespace", "apiVersion": "v1",
        "metadata": { "name": name, "uid": format!("ns-{name}"), "annotations": { "sluice.io/mode": mode } },
        "spec": { "finalizers": ["kubernetes"] },
        "status": { "phase": "Active" }
    })
}

fn service() -> Value {
    json!({
        "kind": "Service", "apiVersion": "v1",
        "metadata": { "name": "checkout", "namespace": "shop", "uid": "svc-checkout" },
        "spec": {
            "type": "ClusterIP", "clusterIP": CLUSTER_IP, "clusterIPs": [CLUSTER_IP],
            "ports": [{ "name": "http", "port": 8080, "protocol": "TCP", "targetPort": 8080 }],
            "selector": { "app": "checkout" }
        },
        "status": { "loadBalancer": {} }
    })
}

/// The slice of `checkout` with these (pod index, ready) endpoints.
fn slice(pods: &[Pod], endpoints: &[(usize, bool)]) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|&(i, ready)| {
            json!({
                "addresses": [pods[i].ip.to_string()],
                "conditions": { "ready": ready, "serving": ready, "terminating": false },
                "nodeName": pods[i].node,
                "zone": "z1",
                "targetRef": { "kind": "Pod", "namespace": "shop", "name": pods[i].name, "uid": pods[i].uid }
            })
        })
        .collect();
    json!({
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": "checkout-abcde", "namespace": "shop", "uid": "slice-checkout",
            "labels": { "kubernetes.io/service-name": "checkout" }
        },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": eps
    })
}

/// A simulated pod as the kubelet lays it out: its namespace on the node,
/// a pod cgroup named after its uid with a pause process in one container
/// cgroup below it, an app container cgroup for its calls, and a backend
/// on its address.
struct Pod {
    name: String,
    node: String,
    uid: String,
    ip: std::net::IpAddr,
    /// The pod's cgroup, killed and removed with the pod.
    cgroup: CgroupTree,
    /// The app container's cgroup, relative to the node's cgroup root.
    app: String,
    /// The pod's cgroup relative to the node's cgroup root, and its layout.
    pod_cgroup: String,
    layout: Layout,
    _holder: ChildGuard,
    /// None while stopped.
    backend: Option<Backend>,
    /// The pod's network namespace (the node owns and removes it).
    netns: PathBuf,
}

impl Pod {
    /// Stops the pod's backend: its address refuses connections.
    fn stop_backend(&mut self) {
        self.backend = None;
    }

    /// A new backend on the pod's address (the caller keeps it running).
    fn new_backend(&self) -> Backend {
        let addr = SocketAddr::new(self.ip, 8080);
        let name = self.name.clone();
        netns::run_in(self.netns.clone(), move || Backend::start_on(&name, addr))
    }

    /// A new container cgroup of this pod (another container, or one
    /// restarted: the kubelet gives it a new cgroup, so a new id).
    fn new_container(&self, n: usize) -> String {
        self.layout.container(&self.pod_cgroup, n)
    }

    fn object(&self) -> Value {
        json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": { "name": self.name, "namespace": "shop", "uid": self.uid, "labels": { "app": "checkout" } },
            "spec": {
                "nodeName": self.node, "serviceAccountName": "checkout",
                "containers": [{ "name": "app", "image": "checkout:1" }]
            },
            "status": { "phase": "Running", "podIP": self.ip.to_string(), "podIPs": [{ "ip": self.ip.to_string() }] }
        })
    }
}

/// Starts pod `i` of `node` in `layout`: its cgroup below `kubepods`, the
/// pause process in a container cgroup of it inside the pod's namespace,
/// a backend on the pod's IP.
fn start_pod(
    config: &AgentConfig,
    node: &Node,
    i: usize,
    node_name: &str,
    name: &str,
    layout: Layout,
) -> Pod {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let uid = format!(
        "5a1ce000-0000-4000-8000-{:012x}",
        (std::process::id() as usize) << 16 | n
    );
    // Burstable and guaranteed pods in turn: they sit at different depths.
    let qos = if n.is_multiple_of(2) {
        Qos::Burstable
    } else {
        Qos::Guaranteed
    };
    let pod = layout.pod(qos, &uid);
    let (netns, ip) = &node.pods[i];
    let holder = pause(config, netns, &layout.container(&pod, 0));
    let backend = Some(Backend::start_in(name, SocketAddr::new(*ip, 8080), netns));
    Pod {
        name: name.to_owned(),
        node: node_name.to_owned(),
        uid,
        ip: *ip,
        cgroup: CgroupTree::adopt(config.cgroup_root_path().join(&pod)),
        app: layout.container(&pod, 1),
        pod_cgroup: pod,
        layout,
        _holder: holder,
        backend,
        netns: netns.path(),
    }
}

struct Cluster {
    // Field order is drop order: pods before the node they live on.
    pods: Vec<Pod>,
    api: FakeApiServer,
    config: AgentConfig,
    node: Node,
}

impl Cluster {
    fn new(pods: usize, layout: Layout) -> Cluster {
        Self::with_health_check(pods, layout, None)
    }

    /// With `health_check` for the discovered services.
    fn with_health_check(
        pods: usize,
        layout: Layout,
        health_check: Option<HealthCheck>,
    ) -> Cluster {
        let node = Node::new(pods);
        let api = node.node.run(FakeApiServer::start);
        let config = AgentConfig::with(|c| {
            let mut config = discovering(c);
            if let Some(kubernetes) = &mut config.kubernetes {
                kubernetes.pod_cgroups = Some(layout.kubepods().to_owned());
                kubernetes.health_check = health_check;
            }
            config.audit = Some(Audit {
                output: c.audit_path(),
                requests: false,
            });
            config
        });
        api.write_kubeconfig(&config.dir.join("kubeconfig"));
        let kubepods = config.cgroup_root_path().join(layout.kubepods());
        std::fs::create_dir_all(&kubepods).unwrap();
        let list = (0..pods)
            .map(|i| start_pod(&config, &node, i, NODE, &format!("checkout-{i}"), layout))
            .collect();
        Cluster {
            pods: list,
            api,
            config,
            node,
        }
    }

    /// Namespace `shop` meshed in `mode`, the `checkout` Service and its
    /// slice with these (pod index, ready) endpoints, on the API server.
    fn publish(&self, mode: &str, endpoints: &[(usize, bool)]) {
        self.api
            .set_object(Resource::Namespaces, namespace("shop", mode));
        self.api.set_object(Resource::Services, service());
        self.set_endpoints(endpoints);
    }

    /// Sets the `checkout` slice to these (pod index, ready) endpoints.
    fn set_endpoints(&self, endpoints: &[(usize, bool)]) {
        self.api
            .set_object(Resource::EndpointSlices, slice(&self.pods, endpoints));
    }

    /// Waits up to `timeout` until `n` calls from pod 0 are answered as
    /// `expected` says; panics with `agent`'s log if they are not.
    fn await_calls(
        &self,
        agent: &Agent,
        n: usize,
        timeout: Duration,
        expected: impl Fn(&[String]) -> bool,
    ) {
        assert!(
            wait_until(timeout, || expected(&self.calls(0, n))),
            "{:?}\n{}",
            self.calls(0, n),
            agent.log()
        );
    }

    /// `n` calls from pod `from` to the service, one connection each.
    fn calls(&self, from: usize, n: usize) -> Vec<String> {
        calls_from(
            &self.config,
            &self.node.pods[from].0,
            &self.pods[from],
            service_vip(),
            n,
        )
    }
}

/// `n` calls from `pod` (in `netns`) to `vip`, one connection each; each
/// line names the backend that answered, or FAILED.
fn calls_from(
    config: &AgentConfig,
    netns: &Netns,
    pod: &Pod,
    vip: SocketAddr,
    n: usize,
) -> Vec<String> {
    calls_in(config, netns, &pod.app, vip, n)
}

/// Like [`calls_from`], from the container cgroup `container`.
fn calls_in(
    config: &AgentConfig,
    netns: &Netns,
    container: &str,
    vip: SocketAddr,
    n: usize,
) -> Vec<String> {
    let replies = run_in_pod(config, netns, container, Calls::new(vip, n));
    answered_by(&replies)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// Waits (up to 5 s) until the agent has `n` workloads, each with its
/// listener open in its pod; panics if it does not.
fn assert_listening(agent: &Agent, n: usize) {
    assert!(
        wait_until(Duration::from_secs(5), || {
            let w = agent.workloads();
            w.len() == n && w.iter().all(|w| w["listener"] == "open")
        }),
        "{:?}\n{}",
        agent.workloads(),
        agent.log()
    );
}

fn count(requests: &[String], needle: &str) -> usize {
    requests.iter().filter(|r| r.contains(needle)).count()
}

#[test]
fn pods_and_services_from_the_api_server_carry_calls_and_follow_changes() {
    let c = Cluster::new(2, Layout::SystemdContainerd);
    // One pod at first.
    c.publish("plaintext", &[(0, true)]);
    c.api.set_object(Resource::Pods, c.pods[0].object());
    let agent = Agent::start_in_netns(&c.config, &c.node.node);
    agent.assert_ready();
    assert!(
        wait_until(Duration::from_secs(5), || agent.workloads().len() == 1),
        "{:?}",
        agent.workloads()
    );
    assert_eq!(c.calls(0, 2), ["checkout-0"; 2]);

    // A pod added: it becomes a workload with its own listener, and an
    // endpoint of the Service.
    c.api.set_object(Resource::Pods, c.pods[1].object());
    c.set_endpoints(&[(0, true), (1, true)]);
    assert_listening(&agent, 2);
    let w = agent.workloads();
    assert_eq!(
        w[0]["identity"],
        "spiffe://cluster.local/ns/shop/sa/checkout"
    );
    // The pods' watch asked only for this node's pods.
    assert!(
        count(&c.api.requests(), "fieldSelector=spec.nodeName%3Dn1") >= 1,
        "{:?}",
        c.api.requests()
    );

    // A pod calls the Service's cluster IP: balanced over both pods. (The
    // pod and its endpoint may arrive in two updates: wait for both.)
    c.await_calls(&agent, 2, Duration::from_secs(5), |who| {
        who.iter().any(|r| r == "checkout-1")
    });
    let replies = c.calls(0, 4);
    let mut who = replies.clone();
    who.sort();
    assert_eq!(
        who,
        ["checkout-0", "checkout-0", "checkout-1", "checkout-1"],
        "{replies:?}"
    );

    // An endpoint marked not ready takes no new calls.
    c.set_endpoints(&[(0, true), (1, false)]);
    c.await_calls(&agent, 4, Duration::from_secs(5), |who| {
        who.iter().all(|r| r == "checkout-0")
    });

    // A cut watch stream, then a 410 Gone: the catalog stays, the agent
    // watches again and lists again.
    let before = c.api.requests();
    for r in Resource::ALL {
        c.api.cut_watches(r);
    }
    assert_eq!(c.calls(1, 3), ["checkout-0"; 3]);
    c.api.expire(Resource::EndpointSlices);
    assert_eq!(c.calls(1, 3), ["checkout-0"; 3]);
    let slices = "GET /apis/discovery.k8s.io/v1/endpointslices?";
    assert!(
        wait_until(Duration::from_secs(10), || {
            let now = c.api.requests();
            now.iter()
                .filter(|r| r.starts_with(slices) && !r.contains("watch="))
                .count()
                > before
                    .iter()
                    .filter(|r| r.starts_with(slices) && !r.contains("watch="))
                    .count()
        }),
        "no re-list after 410: {:?}",
        c.api.requests()
    );
    // ...and still follows changes after it.
    c.set_endpoints(&[(0, true), (1, true)]);
    c.await_calls(&agent, 4, Duration::from_secs(10), |who| {
        who.iter().any(|r| r == "checkout-1")
    });

    // A pod deleted while one of its connections is open: the connection
    // drains, the workload and its listener go.
    let mut held = hold_in_pod(
        &c.config,
        &c.node.pods[1].0,
        &c.pods[1].new_container(2),
        service_vip(),
    );
    let one = held.ask("one");
    c.api.delete_object(Resource::Pods, "shop", &c.pods[1].name);
    c.set_endpoints(&[(0, true)]);
    assert!(
        wait_until(Duration::from_secs(5), || agent.workloads().len() == 1),
        "{:?}",
        agent.workloads()
    );
    assert!(
        agent
            .log()
            .contains("closed the outbound listener in /proc/")
    );
    let two = held.ask("two");
    assert!(
        one.starts_with("checkout-") && two.starts_with("checkout-"),
        "{one}|{two}"
    );
}

/// Node `n1` discovering everything from the API server its kubeconfig
/// (`kubeconfig` in the config's directory) names.
fn discovering(c: &AgentConfig) -> Config {
    let mut config = Config::new(NODE, &c.cgroup_root);
    config.agent = c.agent(&c.dir.join("state"), c.inbound_port);
    config.kubernetes = Some(config::Kubernetes {
        kubeconfig: Some(c.dir.join("kubeconfig")),
        ..config::Kubernetes::default()
    });
    config
}

#[test]
fn an_unreachable_api_server_leaves_the_agent_up_and_not_ready() {
    let port = free_port().unwrap();
    let config = AgentConfig::with(discovering);
    write_kubeconfig(
        &config.dir.join("kubeconfig"),
        &format!("http://127.0.0.1:{port}"),
    );
    let agent = Agent::start(&config);
    let why = agent.not_ready().expect("not ready");
    assert!(
        why.iter()
            .any(|r| r == "kubernetes: services, endpoints and pods not listed yet"),
        "{why:?}"
    );
    // Retries go on with backoff; each resource says so once.
    std::thread::sleep(Duration::from_secs(3));
    let log = agent.log();
    assert_eq!(log.matches("cannot watch services").count(), 1, "{log}");
    assert_eq!(
        log.matches("cannot watch endpointslices").count(),
        1,
        "{log}"
    );
    assert!(
        agent.sluice(&["status"]).status.code() == Some(4),
        "status must say not ready"
    );
}

#[test]
fn a_missing_rbac_right_is_named() {
    let api = FakeApiServer::start();
    api.deny(Resource::Services, "list");
    let config = AgentConfig::with(discovering);
    api.write_kubeconfig(&config.dir.join("kubeconfig"));
    let agent = Agent::start(&config);
    assert!(
        agent.wait_for_log("the API server refused to list services (403 Forbidden)"),
        "{}",
        agent.log()
    );
    assert!(
        agent
            .log()
            .contains("must grant get, list, watch on services")
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.log().matches("refused to list services").count(), 1);
}

/// A SluicePolicy in `shop` that selects pods labelled `tier: ledger`.
fn ledger_policy(generation: i64, default: &str, deny: &[&str]) -> Value {
    json!({
        "kind": "SluicePolicy", "apiVersion": "sluice.io/v1alpha1",
        "metadata": {
            "name": "ledger-callers", "namespace": "shop", "uid": "policy-ledger",
            "generation": generation
        },
        "spec": {
            "selector": { "matchLabels": { "tier": "ledger" } },
            "default": default,
            "deny": deny
        }
    })
}

/// A SluicePolicy denies a caller: new calls are refused and audited with
/// both identities, while a connection opened before keeps flowing. The
/// policy edited to allow lets the next call through, the same connection
/// still open. Edited into an invalid one, it is refused with a status
/// condition naming the field, and its last accepted version stays in force.
#[test]
fn a_policy_object_denies_and_allows_without_touching_open_connections() {
    let c = Cluster::new(2, Layout::SystemdContainerd);
    // Pod 0 calls; the Service's one endpoint is pod 1, the ledger.
    c.publish("mtls", &[(1, true)]);
    c.api.set_object(Resource::Pods, c.pods[0].object());
    let mut ledger = c.pods[1].object();
    ledger["metadata"]["labels"]["tier"] = json!("ledger");
    c.api.set_object(Resource::Pods, ledger);
    let agent = Agent::start_in_netns(&c.config, &c.node.node);
    agent.assert_ready();
    assert_listening(&agent, 2);
    let (netns, app) = (&c.node.pods[0].0, &c.pods[0].app);
    let mut open = hold_in_pod(&c.config, netns, app, service_vip());
    assert!(open.ask("before").starts_with("checkout-1"));

    let caller = "spiffe://cluster.local/ns/shop/sa/checkout";
    c.api
        .set_object(Resource::Policies, ledger_policy(1, "allow", &[caller]));
    // A new call from pod 0 is refused.
    c.await_calls(&agent, 1, Duration::from_secs(10), |who| who == ["FAILED"]);
    let audit = c.config.audit_path();
    let denied = audit_lines(&audit, "denied", 1);
    assert!(!denied.is_empty(), "no denial in {}", audit.display());
    for line in &denied {
        assert_eq!(line["source"]["identity"], caller, "{line}");
        assert_eq!(line["destination"]["identity"], caller, "{line}");
        assert_eq!(line["destination"]["workload"], "shop/checkout-1", "{line}");
        assert!(
            line["rule"]
                .as_str()
                .is_some_and(|r| r.contains(&format!("deny[0] {caller}"))),
            "{line}"
        );
    }
    assert!(open.ask("during").starts_with("checkout-1"));
    // The one agent wrote its verdict on the policy.
    let accepted = |c: &Cluster| {
        c.api
            .object(Resource::Policies, "shop", "ledger-callers")
            .map(|p| p["status"]["conditions"][0].clone())
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(5), || accepted(&c)["status"] == "True"),
        "{}",
        accepted(&c)
    );

    // Edited to allow: the next call passes; the open connection is the
    // same one.
    c.api
        .set_object(Resource::Policies, ledger_policy(2, "allow", &[]));
    c.await_calls(&agent, 1, Duration::from_secs(10), |who| {
        who == ["checkout-1"]
    });
    assert!(open.ask("after").starts_with("checkout-1"));

    // Edited into an invalid one: refused, with the field named; the last
    // accepted version (allow) stays in force.
    c.api
        .set_object(Resource::Policies, ledger_policy(3, "allow", &["ledger"]));
    assert!(
        wait_until(Duration::from_secs(5), || accepted(&c)["status"] == "False"),
        "{}",
        accepted(&c)
    );
    let condition = accepted(&c);
    assert_eq!(condition["reason"], "Invalid");
    assert_eq!(condition["observedGeneration"], 3);
    let message = condition["message"].as_str().unwrap();
    assert!(message.contains("spec.deny[0]"), "{message}");
    assert!(
        message.contains("last accepted version stays in force"),
        "{message}"
    );
    assert_eq!(c.calls(0, 1), ["checkout-1"]);
    assert!(open.ask("still").starts_with("checkout-1"));
}

/// A SluicePolicy's request rules and rate limit hold for discovered pods,
/// as the file's do for its workloads: the Service's port declares
/// `appProtocol: http`; the policy selecting the ledger pod refuses
/// `POST /admin/*` with 403 (audited with the policy's rule) and gives each
/// caller identity 100 requests a second: the checkout pod sending 300 a
/// second gets about 200 a second of 429s, while the batch pod (another
/// service account), sending at the same time, gets none.
#[test]
fn a_policys_request_rules_and_rate_limit_hold_for_discovered_pods() {
    let mut c = Cluster::new(3, Layout::SystemdCrio);
    // Pod 1 is the ledger and answers HTTP; pods 0 and 2 call it.
    let mut http = service();
    http["spec"]["ports"][0]["appProtocol"] = json!("http");
    c.api
        .set_object(Resource::Namespaces, namespace("shop", "mtls"));
    c.api.set_object(Resource::Services, http);
    c.set_endpoints(&[(1, true)]);
    c.api.set_object(Resource::Pods, c.pods[0].object());
    let mut ledger = c.pods[1].object();
    ledger["metadata"]["labels"]["tier"] = json!("ledger");
    c.api.set_object(Resource::Pods, ledger);
    let mut batch = c.pods[2].object();
    batch["spec"]["serviceAccountName"] = json!("batch");
    c.api.set_object(Resource::Pods, batch);
    c.pods[1].stop_backend();
    let addr = SocketAddr::new(c.pods[1].ip, 8080);
    let backend = netns::run_in(c.pods[1].netns.clone(), move || {
        HttpBackend::start_on("ledger", Answer::Status(200), addr)
    });
    c.api.set_object(
        Resource::Policies,
        json!({
            "kind": "SluicePolicy", "apiVersion": "sluice.io/v1alpha1",
            "metadata": {
                "name": "ledger-requests", "namespace": "shop", "uid": "policy-ledger-requests",
                "generation": 1
            },
            "spec": {
                "selector": { "matchLabels": { "tier": "ledger" } },
                "default": "allow",
                "requests": [{ "methods": ["POST"], "paths": ["/admin/*"], "decision": "deny" }],
                "rateLimit": { "requestsPerSecond": 100, "burst": 10, "perSource": true }
            }
        }),
    );
    let agent = Agent::start_in_netns(&c.config, &c.node.node);
    agent.assert_ready();
    assert_listening(&agent, 3);

    // The rule: a POST to /admin/ is refused at once by the policy.
    let post = format!(
        "import http.client\nc = http.client.HTTPConnection('{}', {}, timeout=5)\n\
         c.request('POST', '/admin/keys', body=b'')\nprint(c.getresponse().status)",
        service_vip().ip(),
        service_vip().port()
    );
    let (netns, app) = (&c.node.pods[0].0, &c.pods[0].app);
    let status = || {
        let out = in_pod(&c.config, netns, app, &post).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert!(
        wait_until(Duration::from_secs(10), || status() == "403"),
        "{}\n{}",
        status(),
        agent.log()
    );
    let denied = audit_lines(&c.config.audit_path(), "denied", 1);
    assert!(
        denied.iter().any(|l| l["rule"]
            .as_str()
            .is_some_and(|r| r == "sluicepolicy shop/ledger-requests requests[0]")),
        "{denied:?}"
    );
    assert!(
        backend.arrivals().iter().all(|a| !a.starts_with("POST")),
        "{:?}",
        backend.arrivals()
    );

    // The rate limit, per caller identity.
    let (batch_netns, batch_app) = (&c.node.pods[2].0, &c.pods[2].app);
    let (_, refused, _) = two_callers_at_once(
        in_pod(
            &c.config,
            netns,
            app,
            &paced_gets_python(service_vip(), 300),
        ),
        in_pod(
            &c.config,
            batch_netns,
            batch_app,
            &paced_gets_python(service_vip(), 30),
        ),
    );
    let counted = agent.metrics().sum(
        "sluice_rate_limited_requests_total",
        &[("destination_workload", "shop/checkout-1")],
    );
    assert_eq!(counted, refused);
    // What the operator sees: the pod's limit, what it refused, its rules.
    let ledger = agent
        .workloads()
        .into_iter()
        .find(|w| w["name"] == "shop/checkout-1")
        .expect("the ledger pod is a workload");
    let limit = &ledger["rate_limit"];
    assert_eq!(
        (
            &limit["requests_per_second"],
            &limit["burst"],
            &limit["per_source"]
        ),
        (&json!(100), &json!(10), &json!(true)),
        "{ledger}"
    );
    assert_eq!(limit["refused"].as_f64(), Some(refused), "{ledger}");
    assert_eq!(ledger["request_rules"], 1, "{ledger}");
    let table = String::from_utf8_lossy(&agent.sluice(&["workloads"]).stdout).into_owned();
    let line = table
        .lines()
        .find(|l| l.contains("shop/checkout-1"))
        .unwrap_or_default();
    assert!(
        line.contains("100/s burst 10 per caller") && line.contains(&format!(" {refused} ")),
        "{table}"
    );
}

/// Two nodes, two pods each, one API server, and one config for both: the
/// shipped ConfigMap. Node A's kubelet runs the cgroupfs driver, node B's
/// systemd with CRI-O. A pod on node A calls the Service by its cluster IP;
/// calls spread over all four pods, and those to node B go over mutual TLS
/// between the agents, which learnt of each other from their own Service.
/// The identities both ways are the pods' service accounts as the API
/// server states them; the Service carries no identity annotation.
#[test]
fn two_nodes_four_pods_cross_node_calls_go_over_mtls() {
    let (a_node, b_node) = (Node::new(2), Node::new(2));
    // The nodes' own link, and routes back to A's pods for B's replies.
    let (a_addr, b_addr) = ("198.18.250.1", "198.18.250.2");
    netns::veth(&a_node.node, "lna", &b_node.node, "lnb").unwrap();
    a_node
        .node
        .ip(&["addr", "add", &format!("{a_addr}/24"), "dev", "lna"])
        .unwrap();
    b_node
        .node
        .ip(&["addr", "add", &format!("{b_addr}/24"), "dev", "lnb"])
        .unwrap();
    for (_, ip) in &a_node.pods {
        let octets = match ip {
            std::net::IpAddr::V4(v4) => v4.octets(),
            _ => unreachable!(),
        };
        let subnet = format!("198.18.{}.0/24", octets[2]);
        b_node
            .node
            .ip(&["route", "add", &subnet, "via", a_addr])
            .unwrap();
    }

    // Each node holds the keys of its own pods' service accounts only: A's
    // pods run as `checkout`, B's as `checkout-b`.
    let nodes = ShippedNodes::new(&a_node.node, a_addr, ["checkout", "checkout-b"]);
    let (api, a_cfg, b_cfg) = (&nodes.api, &nodes.a, &nodes.b);

    let mut pods = Vec::new();
    for (cfg, node, node_name, tag, layout) in [
        (a_cfg, &a_node, "node-a", "a", Layout::Cgroupfs),
        (b_cfg, &b_node, "node-b", "b", Layout::SystemdCrio),
    ] {
        std::fs::create_dir_all(cfg.cgroup_root_path().join(layout.kubepods())).unwrap();
        for i in 0..2 {
            pods.push(start_pod(
                cfg,
                node,
                i,
                node_name,
                &format!("checkout-{tag}{i}"),
                layout,
            ));
        }
    }
    let vip: SocketAddr = "127.77.12.20:8080".parse().unwrap();
    let mut svc = service();
    svc["spec"]["clusterIP"] = json!(vip.ip().to_string());
    svc["spec"]["clusterIPs"] = json!([vip.ip().to_string()]);
    api.set_object(Resource::Namespaces, namespace("shop", "mtls"));
    api.set_object(Resource::Services, svc);
    api.set_object(
        Resource::EndpointSlices,
        slice(&pods, &[(0, true), (1, true), (2, true), (3, true)]),
    );
    for p in &pods {
        let mut object = p.object();
        if p.node == "node-b" {
            object["spec"]["serviceAccountName"] = json!("checkout-b");
        }
        api.set_object(Resource::Pods, object);
    }
    api.set_object(
        Resource::EndpointSlices,
        agents_slice(&[("node-a", a_addr), ("node-b", b_addr)]),
    );

    let a = nodes.start("node-a", &a_node.node);
    let b = nodes.start("node-b", &b_node.node);
    for agent in [&a, &b] {
        agent.assert_ready();
        assert_listening(agent, 2);
    }
    // Node A's agent found the cgroupfs root although the shipped config
    // names systemd's, and attached its programs there.
    let status = a.view("/debug/status");
    let kubepods = a_cfg.cgroup_root_path().join("kubepods");
    for program in status["programs"].as_array().expect("programs") {
        assert_eq!(
            program["cgroup"],
            kubepods.display().to_string(),
            "{status}"
        );
    }

    let replies = calls_from(a_cfg, &a_node.pods[0].0, &pods[0], vip, 8);
    assert_eq!(
        distinct(&replies),
        ["checkout-a0", "checkout-a1", "checkout-b0", "checkout-b1"],
        "{replies:?}\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    // B's pods' identities came from the API server, one read per pod,
    // from its watch cache.
    for pod in ["checkout-b0", "checkout-b1"] {
        let get = format!("GET /api/v1/namespaces/shop/pods/{pod}?&resourceVersion=0");
        let reads = api
            .requests()
            .iter()
            .filter(|r| r.starts_with(&format!("GET /api/v1/namespaces/shop/pods/{pod}?")))
            .count();
        assert_eq!(reads, 1, "{get}: {:?}", api.requests());
    }
    // A's two pods dial from the same loopback address and port at once:
    // records are keyed by namespace, so neither takes the other's. Each
    // round takes a port of its own: the last round's connection from the
    // same port to the same listener may still be in TIME_WAIT.
    for round in 0..5 {
        let children: Vec<_> = (0..2)
            .map(|i| {
                let same_port = Calls::new(vip, 1)
                    .text("same-port")
                    .bind_port(41000 + round)
                    .show_error();
                in_pod_client(
                    a_cfg,
                    &a_node.pods[i].0,
                    &pods[i].new_container(3),
                    &same_port.into(),
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn_guarded()
                .unwrap()
            })
            .collect();
        for child in children {
            let out = lines(&child.wait_with_output().unwrap());
            assert!(out.len() == 1 && out[0].ends_with("same-port 1"), "{out:?}");
        }
    }

    // A restarted container (the kubelet gives it a new cgroup below the
    // same pod) keeps the pod's identity: its calls reach B's pods too,
    // which only mTLS with that identity can.
    let restarted = calls_in(a_cfg, &a_node.pods[0].0, &pods[0].new_container(4), vip, 8);
    assert!(
        restarted.iter().all(|r| r.starts_with("checkout-"))
            && restarted.iter().any(|r| r.starts_with("checkout-b")),
        "{restarted:?}"
    );

    // Node A counted its calls to B's pods as mutual TLS; node B's inbound
    // listener accepted them from A's pod identity.
    let metrics = a.metrics();
    let mtls_opened = metrics.sum(
        "sluice_tcp_connections_opened_total",
        &[("connection_security_policy", "mutual_tls")],
    );
    assert!(mtls_opened >= 2.0, "{metrics:?}");
    let status = b.sluice(&["status", "-o", "json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(status["inbound_accepted"].as_u64() >= Some(2), "{status}");
}

/// The health verdicts of the Service's endpoints as the agent holds them,
/// by backend name.
fn verdicts(c: &Cluster, agent: &Agent) -> std::collections::HashMap<String, bool> {
    let endpoints: Vec<Value> =
        serde_json::from_value(agent.view("/debug/endpoints")).unwrap_or_default();
    c.pods
        .iter()
        .filter_map(|p| {
            let addr = SocketAddr::new(p.ip, 8080).to_string();
            let e = endpoints.iter().find(|e| e["address"] == addr.as_str())?;
            Some((p.name.clone(), e["healthy"].as_bool()?))
        })
        .collect()
}

/// 1,000 EndpointSlice updates a second for 10 s (one endpoint toggled
/// between ready and not) while a pod calls the Service: no call fails, a
/// connection opened before stays open, the untouched endpoint stays
/// healthy throughout, and an untouched endpoint whose backend comes back
/// during the churn is found healthy in the health check's own time: its
/// check kept running and counting through every catalog change.
#[test]
fn a_thousand_endpoint_slice_updates_a_second_lose_no_call_and_no_verdict() {
    let health = HealthCheck {
        interval: Some(Duration::from_millis(200)),
        timeout: Some(Duration::from_millis(150)),
        healthy_threshold: Some(2),
        unhealthy_threshold: Some(2),
        jitter: Some(Duration::from_millis(20)),
    };
    let mut c = Cluster::with_health_check(4, Layout::SystemdContainerd, Some(health));
    c.publish("mtls", &[(1, true), (2, true), (3, true)]);
    for p in &c.pods {
        c.api.set_object(Resource::Pods, p.object());
    }
    // Pod 2's backend is down from the start.
    c.pods[2].stop_backend();
    let agent = Agent::start_in_netns(&c.config, &c.node.node);
    agent.assert_ready();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let v = verdicts(&c, &agent);
            v.get("checkout-1") == Some(&true) && v.get("checkout-2") == Some(&false)
        }),
        "{:?}\n{}",
        verdicts(&c, &agent),
        agent.log()
    );

    let (netns, app) = (&c.node.pods[0].0, c.pods[0].app.clone());
    let mut open = hold_in_pod(&c.config, netns, &app, service_vip());
    assert!(open.ask("first").starts_with("checkout-"));
    // Calls every 50 ms for 12 s, across the churn.
    let calls = Calls::new(service_vip(), 1000)
        .pause(Duration::from_millis(50))
        .lasting(Duration::from_secs(12));
    let load = in_pod_client(&c.config, netns, &app, &calls.into())
        .stdout(Stdio::piped())
        .spawn_guarded()
        .unwrap();

    // The churn: 10,000 updates, one a millisecond, on their own thread.
    let started = std::time::Instant::now();
    let churn = {
        let api = &c.api;
        let toggled_on = slice(&c.pods, &[(1, true), (2, true), (3, true)]);
        let toggled_off = slice(&c.pods, &[(1, true), (2, true), (3, false)]);
        std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                for i in 0..10_000u32 {
                    let due = started + Duration::from_micros(1_000 * u64::from(i));
                    if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let next = if i % 2 == 0 {
                        &toggled_off
                    } else {
                        &toggled_on
                    };
                    api.set_object(Resource::EndpointSlices, next.clone());
                }
                started.elapsed()
            });
            // Meanwhile: pod 1 healthy at every look, and pod 2 (whose
            // backend comes back at 3 s) healthy within its checks' time.
            let mut looks = 0;
            let mut restarted = None;
            let mut back_at = None;
            let mut healthy_at = None;
            while !writer.is_finished() {
                let v = verdicts(&c, &agent);
                assert_eq!(v.get("checkout-1"), Some(&true), "{v:?}");
                looks += 1;
                if back_at.is_none() && started.elapsed() >= Duration::from_secs(3) {
                    restarted = Some(c.pods[2].new_backend());
                    back_at = Some(started.elapsed());
                }
                if healthy_at.is_none() && back_at.is_some() && v.get("checkout-2") == Some(&true) {
                    healthy_at = Some(started.elapsed());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (
                writer.join().unwrap(),
                looks,
                back_at,
                healthy_at,
                restarted,
            )
        })
    };
    let (took, looks, back_at, healthy_at, _restarted) = churn;
    assert!(looks >= 20, "{looks} looks at the verdicts");
    let (back_at, healthy_at) = (back_at.unwrap(), healthy_at);
    // Two passes of a 200 ms check (plus jitter) after the backend is
    // back; a check restarted by every update would never get there.
    assert!(
        healthy_at.is_some_and(|t| t - back_at < Duration::from_secs(3)),
        "checkout-2 back at {back_at:?}, healthy at {healthy_at:?} (updates took {took:?})"
    );
    assert!(open.ask("after the churn").starts_with("checkout-"));
    // The changes were applied service by service, not as whole catalogs.
    let metrics = agent.metrics();
    let by_service = metrics.sum("sluice_catalog_updates_total", &[("kind", "services")]);
    let whole = metrics.sum("sluice_catalog_updates_total", &[("kind", "whole")]);
    assert!(
        by_service >= 50.0 && whole <= 5.0,
        "{by_service} by service, {whole} whole"
    );
    let replies = lines(&load.wait_with_output().unwrap());
    let ok = replies
        .iter()
        .filter(|r| r.starts_with("checkout-"))
        .count();
    let failed = replies.len() - ok;
    assert_eq!(failed, 0, "{ok} calls passed, {failed} failed: {replies:?}");
    assert!(ok >= 100, "{ok} calls");
    eprintln!("{ok} calls, none failed; 10,000 slice updates in {took:?}");
}

/// The config file broken on disk: its reload is refused (counted), and
/// discovery goes on regardless, over the file as last read: a pod added
/// afterwards takes calls.
#[test]
fn a_broken_config_file_does_not_stop_discovery() {
    let c = Cluster::new(3, Layout::Cgroupfs);
    c.publish("plaintext", &[(1, true)]);
    for p in &c.pods {
        c.api.set_object(Resource::Pods, p.object());
    }
    let agent = Agent::start_in_netns(&c.config, &c.node.node);
    agent.assert_ready();
    c.await_calls(&agent, 1, Duration::from_secs(5), |who| {
        who == ["checkout-1"]
    });

    let refused = || agent.reloads("failure");
    let good = std::fs::read_to_string(&c.config.path).unwrap();
    c.config.write_raw("node: [this is not a node\n");
    assert!(
        wait_until(Duration::from_secs(10), || refused() >= 1.0),
        "{}",
        agent.log()
    );
    // A new endpoint while the file is broken.
    c.set_endpoints(&[(1, true), (2, true)]);
    c.await_calls(&agent, 6, Duration::from_secs(5), |who| {
        distinct(who) == ["checkout-1", "checkout-2"]
    });
    c.config.write_raw(&good);
}

/// A pod whose network namespace cannot be opened (the first process of
/// its cgroup has no namespaces left to open) is left out
/// alone: the other pods are workloads and take calls, and the Service
/// keeps the endpoints that can be reached.
#[test]
fn a_pod_whose_namespace_cannot_be_opened_is_left_out_alone() {
    let c = Cluster::new(3, Layout::Cgroupfs);
    c.publish("plaintext", &[(1, true), (2, true)]);
    for p in &c.pods {
        c.api.set_object(Resource::Pods, p.object());
    }
    // A process in pod 2's own cgroup whose main thread has exited while
    // another runs on: the kernel lists it, and its /proc/PID/ns/net is
    // gone. The locator finds it first.
    let procs = c.pods[2].cgroup.path().join("cgroup.procs");
    let broken = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import ctypes, os, threading, time\n\
             open(\"{}\", \"w\").write(str(os.getpid()))\n\
             threading.Thread(target=time.sleep, args=(60,)).start()\n\
             ctypes.CDLL(None).pthread_exit(None)\n",
            procs.display()
        ))
        .spawn_guarded()
        .unwrap();
    let pid = broken.id().to_string();
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&procs).is_ok_and(|p| p.lines().any(|l| l == pid))
                && std::fs::File::open(format!("/proc/{pid}/ns/net")).is_err()
        }),
        "{pid} is not a process without namespaces in {}",
        procs.display()
    );

    let agent = Agent::start_in_netns(&c.config, &c.node.node);
    agent.assert_ready();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let mut names: Vec<String> = agent
                .workloads()
                .iter()
                .filter_map(|w| w["name"].as_str().map(str::to_owned))
                .collect();
            names.sort();
            names == ["shop/checkout-0", "shop/checkout-1"]
        }),
        "{:?}\n{}",
        agent.workloads(),
        agent.log()
    );
    c.await_calls(&agent, 4, Duration::from_secs(5), |who| {
        who == ["checkout-1"; 4]
    });
}
