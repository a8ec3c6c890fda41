//! IPv6 and dual stack, as root: real programs on a real cgroup, a real
//! agent, clients in the workload cgroup. `connect6` makes the decisions
//! `connect4` makes: an IPv6 virtual address is redirected to the agent (or
//! balanced by the kernel) over IPv6 backends, an IPv6 socket dialling the
//! v4-mapped form of an IPv4 virtual address is treated as an IPv4 socket
//! dialling it, and `getpeername()` shows the address the client dialled.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::support::{
    install::{ShippedNodes, agents_slice},
    kubeapi::Resource,
    pods::*,
    *,
};
use serde_json::{Value, json};
use sluice_maps::Stat;

/// IPv6 virtual address in the documentation prefix: never routed here, so
/// a call that the hook missed fails instead of leaving the machine.
const VIP6: &str = "[2001:db8:77::10]:8080";

/// A backend on IPv6 loopback.
fn backend6(name: &str) -> Backend {
    Backend::start_on(name, "[::1]:0".parse().unwrap())
}

/// `n` calls to `ip`:`port`, one connection each, from a socket of the
/// address's family (IPv6 for a v4-mapped address too); each line is
/// `<peer as getpeername shows it> <reply>`, or `FAILED <error kind>`.
fn calls_from(ip: &str, port: u16, n: usize) -> Calls {
    Calls::new(SocketAddr::new(ip.parse().unwrap(), port), n)
        .show_peer()
        .show_error()
}

/// (peer shown, backend name) of each reply line.
fn peers_and_backends(replies: &[String]) -> Vec<(String, String)> {
    replies
        .iter()
        .map(|r| {
            let mut words = r.split_whitespace();
            let peer = words.next().unwrap_or("").to_owned();
            let backend = words.next().unwrap_or("").to_owned();
            (peer, backend)
        })
        .collect()
}

/// Calls to `vip` from IPv6 sockets alternate over `backends` and every
/// client sees `shown` as its peer.
fn assert_balanced_and_shown(replies: &[String], shown: &str, backends: &[&Backend], n: usize) {
    assert_eq!(replies.len(), n, "{replies:?}");
    let got = peers_and_backends(replies);
    for (peer, _) in &got {
        assert_eq!(peer, shown, "{replies:?}");
    }
    let by = counts(got.into_iter().map(|(_, b)| b));
    for b in backends {
        assert_eq!(by.get(&b.name), Some(&(n / backends.len())), "{by:?}");
        assert_eq!(b.accepted(), n / backends.len(), "{} accepted", b.name);
    }
}

#[test]
fn an_ipv6_virtual_address_is_proxied_over_two_ipv6_backends() {
    let vip: SocketAddr = VIP6.parse().unwrap();
    let backends = [backend6("v6a"), backend6("v6b")];
    let addrs = [backends[0].addr, backends[1].addr];
    let config = AgentConfig::new(&[service("ledger6", VIP6, &addrs)]);
    let agent = Agent::start(&config);

    let replies = agent.run_client("client", calls_from(&vip.ip().to_string(), vip.port(), 10));

    assert_balanced_and_shown(
        &replies,
        "2001:db8:77::10:8080",
        &[&backends[0], &backends[1]],
        10,
    );
    assert_eq!(agent.stat(Stat::Redirected), 10);
    assert_eq!(agent.stat(Stat::Established), 10);
    assert_eq!(agent.stat(Stat::KernelBalanced), 0);
    // Every record was found from accept()'s (v4) peer address and taken.
    assert!(
        wait_until(Duration::from_secs(5), || agent.record_counts() == (0, 0)),
        "records left: {:?}",
        agent.record_counts()
    );
}

#[test]
fn an_ipv6_virtual_address_is_balanced_by_the_kernel_over_two_ipv6_backends() {
    let vip: SocketAddr = VIP6.parse().unwrap();
    let backends = [backend6("k6a"), backend6("k6b")];
    let addrs = [backends[0].addr, backends[1].addr];
    let config = AgentConfig::new(&[service("ledger6", VIP6, &addrs).mode(Mode::Kernel)]);
    let agent = Agent::start(&config);

    // One CPU: the kernel walks the table with a cursor per CPU, so the
    // order is exact only on one.
    let calls = calls_from(&vip.ip().to_string(), vip.port(), 10).on_cpu(0);
    let replies = agent.run_client("client", calls);

    assert_balanced_and_shown(
        &replies,
        "2001:db8:77::10:8080",
        &[&backends[0], &backends[1]],
        10,
    );
    assert_eq!(agent.stat(Stat::KernelBalanced), 10);
    assert_eq!(agent.stat(Stat::Redirected), 0, "the proxy was never asked");
}

#[test]
fn an_ipv6_socket_dialling_a_v4_mapped_virtual_address_is_redirected() {
    let proxied: SocketAddr = "127.77.8.10:8080".parse().unwrap();
    let kernel: SocketAddr = "127.77.8.11:8080".parse().unwrap();
    let backends = [Backend::start("p1"), Backend::start("p2")];
    let kbackends = [Backend::start("k1"), Backend::start("k2")];
    let config = AgentConfig::new(&[
        service(
            "payments",
            &proxied.to_string(),
            &[backends[0].addr, backends[1].addr],
        ),
        service(
            "ledger",
            &kernel.to_string(),
            &[kbackends[0].addr, kbackends[1].addr],
        )
        .mode(Mode::Kernel),
    ]);
    let agent = Agent::start(&config);

    // The IPv4 service's key serves the v4-mapped form: connect6 decides as
    // connect4 would, and the client sees the address as it wrote it.
    let replies = agent.run_client("client", calls_from("::ffff:127.77.8.10", 8080, 4));
    assert_balanced_and_shown(
        &replies,
        "::ffff:127.77.8.10:8080",
        &[&backends[0], &backends[1]],
        4,
    );
    assert_eq!(agent.stat(Stat::Redirected), 4);

    let calls = calls_from("::ffff:127.77.8.11", 8080, 4).on_cpu(0);
    let replies = agent.run_client("client", calls);
    assert_balanced_and_shown(
        &replies,
        "::ffff:127.77.8.11:8080",
        &[&kbackends[0], &kbackends[1]],
        4,
    );
    assert_eq!(agent.stat(Stat::KernelBalanced), 4);

    // And an IPv4 socket sees the virtual address too (proxy mode), not
    // the agent's listener.
    let replies = agent.run_client("client", calls_from("127.77.8.10", 8080, 2));
    assert_balanced_and_shown(&replies, "127.77.8.10:8080", &[], 2);
    assert_eq!(agent.stat(Stat::Redirected), 6);
}

/// With the agent killed, an IPv6 service follows its `on_agent_down` as
/// an IPv4 one does: `fail_open` goes around the agent to its IPv6
/// endpoints from the kernel's table, `fail_closed` (mtls) refuses.
#[test]
fn with_the_agent_killed_ipv6_fails_open_or_closed_as_configured() {
    let (open_vip, closed_vip) = ("[2001:db8:77::40]:8080", "[2001:db8:77::41]:8080");
    let (open, closed) = (backend6("open6"), backend6("closed6"));
    let config = AgentConfig::new(&[
        service("catalog6", open_vip, &[open.addr])
            .mode(Mode::Plaintext)
            .on_agent_down(OnAgentDown::FailOpen),
        service("payments6", closed_vip, &[closed.addr]),
    ]);
    let mut agent = Agent::start(&config);
    agent.kill();

    let replies = agent.run_client("client", calls_from("2001:db8:77::40", 8080, 6));
    assert_balanced_and_shown(&replies, "2001:db8:77::40:8080", &[&open], 6);
    assert!(agent.stat(Stat::FailOpen) >= 6);
    let replies = agent.run_client("client", calls_from("2001:db8:77::41", 8080, 3));
    assert!(
        replies.iter().all(|r| r.starts_with("FAILED")),
        "{replies:?}"
    );
    assert_eq!(closed.accepted(), 0);
    // The pins and links the killed agent left go with the config.
}

/// An IPv6 socket with and without IPV6_V6ONLY dialling `vip`: one line
/// each, `<v6only> <local address> <peer shown> <reply>` or
/// `<v6only> FAILED <errno name>`.
fn v6only_and_not(vip: SocketAddr) -> String {
    format!(
        "python3 -c '
import errno, socket
for only in (0, 1):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, only)
    s.settimeout(5)
    try:
        s.connect((\"{ip}\", {port}))
    except OSError as e:
        print(only, \"FAILED\", errno.errorcode.get(e.errno, e))
        continue
    s.sendall(b\"hi\\n\")
    peer = s.getpeername()
    print(only, s.getsockname()[0], \"%s:%d\" % peer[:2], s.makefile().readline().strip())
'",
        ip = vip.ip(),
        port = vip.port()
    )
}

/// How an IPv6 socket reaches the agent: at `[::1]`, the outbound port's
/// IPv6 twin, where the namespace has IPv6 loopback, so an IPV6_V6ONLY
/// socket is served too; else at the v4-mapped `::ffff:127.0.0.1`, which a
/// V6ONLY socket cannot reach (ENETUNREACH at once: it never hangs and
/// never leaves the mesh). The kernel mode sends it to an IPv6 endpoint
/// either way.
#[test]
fn an_ipv6_socket_reaches_the_agent_at_ipv6_loopback_or_else_v4_mapped() {
    let vip: SocketAddr = "[2001:db8:77::50]:8080".parse().unwrap();
    let kvip: SocketAddr = "[2001:db8:77::51]:8080".parse().unwrap();
    let (p, k) = (backend6("p6"), backend6("k6"));
    let config = AgentConfig::new(&[
        service("proxied6", &vip.to_string(), &[p.addr]),
        service("kernel6", &kvip.to_string(), &[k.addr]).mode(Mode::Kernel),
    ]);
    let agent = Agent::start(&config);
    let replies = lines(&agent.run_as_client(&v6only_and_not(vip)));
    assert_eq!(
        replies,
        [
            "0 ::1 2001:db8:77::50:8080 p6 hi",
            "1 ::1 2001:db8:77::50:8080 p6 hi"
        ]
    );
    let replies = lines(&agent.run_as_client(&v6only_and_not(kvip)));
    assert_eq!(
        replies,
        [
            "0 ::1 2001:db8:77::51:8080 k6 hi",
            "1 ::1 2001:db8:77::51:8080 k6 hi"
        ]
    );
    assert_eq!(agent.stat(Stat::Redirected), 2);
    assert_eq!(agent.stat(Stat::KernelBalanced), 2);
    drop(agent);

    // A node whose loopback has no IPv6: the agent cannot listen on [::1]
    // and IPv6 sockets go to the v4-mapped listener. The endpoint is on
    // the other end of the veth, over IPv6.
    let pair = NodePair::new();
    sh(&format!(
        "ip netns exec {a} sysctl -qw net.ipv6.conf.lo.disable_ipv6=1 && \
         ip -n {a} -6 addr add fd00:5e::1/64 dev {a_if} nodad && \
         ip -n {b} -6 addr add fd00:5e::2/64 dev $(ip -n {b} -o link show type veth | \
         cut -d: -f2 | cut -d@ -f1 | tr -d \" \") nodad",
        a = pair.a.name(),
        b = pair.b.name(),
        a_if = pair.a_if
    ))
    .unwrap();
    let remote = Backend::start_in("r6", "[fd00:5e::2]:0".parse().unwrap(), &pair.b);
    let config = AgentConfig::new(&[service("proxied6", &vip.to_string(), &[remote.addr])]);
    let agent = Agent::start_in_netns(&config, &pair.a);
    let replies = lines(&agent.run_as_client(&v6only_and_not(vip)));
    assert_eq!(
        replies,
        [
            "0 ::ffff:127.0.0.1 2001:db8:77::50:8080 r6 hi",
            "1 FAILED ENETUNREACH"
        ]
    );
    assert_eq!(remote.accepted(), 1);
    assert!(
        agent.log().contains("no IPv6 outbound listener"),
        "{}",
        agent.log()
    );
}

/// An upgrade hands the `[::1]` listener over with the rest: the new
/// agent serves IPV6_V6ONLY sockets there once the old one has gone.
#[test]
fn an_upgrade_hands_over_the_ipv6_outbound_listener() {
    let vip: SocketAddr = "[2001:db8:77::60]:8080".parse().unwrap();
    let b = backend6("u6");
    let config = AgentConfig::new(&[service("up6", &vip.to_string(), &[b.addr])]);
    let mut old = Agent::start(&config);
    let mut new = Agent::start(&config);
    assert!(old.wait(Duration::from_secs(20)).success(), "{}", old.log());
    assert!(
        !new.log().contains("no IPv6 outbound listener"),
        "{}",
        new.log()
    );
    let replies = lines(&new.run_as_client(&v6only_and_not(vip)));
    assert_eq!(
        replies,
        [
            "0 ::1 2001:db8:77::60:8080 u6 hi",
            "1 ::1 2001:db8:77::60:8080 u6 hi"
        ]
    );
    new.sigterm();
    assert!(new.wait(Duration::from_secs(15)).success());
}

/// An IPv6 socket carrying the agent's mark, opened outside the agent's
/// cgroups, is redirected like any other (connect6 checks the cgroup as
/// connect4 does) and the attempt is audited with what it dialled.
#[test]
fn an_ipv6_socket_with_the_agents_mark_is_still_redirected() {
    let b = backend6("meshed6");
    let config = AgentConfig::audited(&[service("payments6", VIP6, &[b.addr])]);
    let audit = config.audit_path();
    let agent = Agent::start(&config);
    let calls = calls_from("2001:db8:77::10", 8080, 1).mark(0x51ce);

    let replies = agent.run_client("client", calls);

    assert_eq!(replies, ["2001:db8:77::10:8080 meshed6 call 1"]);
    assert_eq!(agent.stat(Stat::MarkSpoofed), 1);
    assert_eq!(agent.stat(Stat::Redirected), 1);
    assert_eq!(agent.stat(Stat::AgentSocket), 0);
    let attempts = audit_lines(&audit, "mark_spoofed", 1);
    let attempt = attempts.first().expect("the attempt is audited");
    assert_eq!(attempt["destination"]["address"], VIP6);
}

/// With the sockmap bypass on, an IPv6 client's connection to the agent
/// skips the loopback stack as an IPv4 client's does, both ways it can
/// reach the agent: at `[::1]` (dialling an IPv6 service) and at the
/// v4-mapped listener (dialling an IPv4 service as `::ffff:a.b.c.d`).
/// 4 MiB each way with a half-close arrive intact. The endpoints are on
/// node B, so node A's loopback carries only the client-to-agent leg.
#[test]
fn the_sockmap_bypass_carries_an_ipv6_clients_bytes() {
    let pair = NodePair::new();
    sh(&format!(
        "ip -n {} -6 addr add fd00:5d::1/64 dev {} nodad && \
         ip -n {} -6 addr add fd00:5d::2/64 dev $(ip -n {} -o link show type veth | \
         cut -d: -f2 | cut -d@ -f1 | tr -d ' ') nodad",
        pair.a.name(),
        pair.a_if,
        pair.b.name(),
        pair.b.name()
    ))
    .unwrap();
    let echo6 = SocketAddr::new("fd00:5d::2".parse().unwrap(), free_port().unwrap());
    let echo4 = SocketAddr::new(pair.b_addr, free_port().unwrap());
    let servers = [eof_echo(&pair.b, echo6, 1), eof_echo(&pair.b, echo4, 1)];
    let services = [
        service("blob6", "[2001:db8:77::70]:8080", &[echo6]).mode(Mode::Plaintext),
        service("blob4", "127.77.6.71:8080", &[echo4]).mode(Mode::Plaintext),
    ];
    let config = AgentConfig::with(|c| {
        let mut config = c.base(&services);
        config.agent.sockmap = Some(true);
        config
    });
    let mut agent = Agent::start_in_netns(&config, &pair.a);

    for (i, ip) in ["2001:db8:77::70", "::ffff:127.77.6.71"].iter().enumerate() {
        let before = loopback_bytes(&pair.a);
        // 4 MiB each way, sent once the agent has its socket, from an IPv6
        // socket (the address is one).
        let blob = Client::Blob {
            to: SocketAddr::new(ip.parse().unwrap(), 8080),
            bytes: 4 << 20,
            delay: Duration::from_millis(300),
        };
        let out = agent.run_client("client", blob);
        let over_lo = loopback_bytes(&pair.a) - before;
        assert_eq!(out, ["intact"], "{ip}");
        assert_eq!(agent.stat(Stat::BypassSocket), i as u64 + 1, "{ip}");
        assert!(
            over_lo < 1 << 20,
            "{ip}: 8 MiB crossed the agent leg, yet {over_lo} bytes went over loopback"
        );
    }
    assert!(agent.stat(Stat::BypassMessage) >= 4);
    agent.sigterm();
    assert!(agent.wait(Duration::from_secs(15)).success());
    for s in servers {
        s.join().unwrap();
    }
}

/// A simulated pod with an address of each family: its namespace (one of
/// a [`Node`]'s), a pod cgroup with a pause process in one container and
/// an app container for its calls, and a backend on `[::]:8080`, which
/// takes IPv4 and IPv6 alike.
struct DualPod {
    name: String,
    node: &'static str,
    uid: String,
    ip4: IpAddr,
    ip6: IpAddr,
    /// The app container's cgroup, relative to the node's cgroup root.
    app: String,
    /// The pod's cgroup, killed and removed with the pod: the pause
    /// process lives on when its holder is killed.
    _cgroup: CgroupTree,
    _holder: ChildGuard,
    _backend: Backend,
}

impl DualPod {
    fn object(&self, service_account: &str) -> Value {
        json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": { "name": self.name, "namespace": "shop", "uid": self.uid, "labels": { "app": "checkout" } },
            "spec": {
                "nodeName": self.node, "serviceAccountName": service_account,
                "containers": [{ "name": "app", "image": "checkout:1" }]
            },
            "status": {
                "phase": "Running", "podIP": self.ip4.to_string(),
                "podIPs": [{ "ip": self.ip4.to_string() }, { "ip": self.ip6.to_string() }]
            }
        })
    }
}

/// Gives pod `i` of `node` the IPv6 address `fd00:5c:<prefix>::2/64` on
/// its veth (the node's end `::1`), routed both ways; returns it.
fn add_ipv6(node: &Node, i: usize, prefix: u16) -> IpAddr {
    let (pod, ip4) = &node.pods[i];
    let pod_if = pod.ip(&["-o", "link", "show", "type", "veth"]).unwrap();
    let pod_if = pod_if
        .split(": ")
        .nth(1)
        .unwrap()
        .split('@')
        .next()
        .unwrap();
    let gw4 = ip4.to_string().rsplit_once('.').unwrap().0.to_owned() + ".1";
    let node_if = node.node.ip(&["-o", "addr", "show", "to", &gw4]).unwrap();
    let node_if = node_if.split_whitespace().nth(1).unwrap();
    let (n, p) = (node.node.name(), pod.name());
    // nodad: usable at once, no duplicate address detection to wait out.
    sh(&format!(
        "ip -n {n} -6 addr add fd00:5c:{prefix:x}::1/64 dev {node_if} nodad && \
         ip -n {p} -6 addr add fd00:5c:{prefix:x}::2/64 dev {pod_if} nodad && \
         ip -n {p} -6 route add default via fd00:5c:{prefix:x}::1"
    ))
    .unwrap();
    format!("fd00:5c:{prefix:x}::2").parse().unwrap()
}

/// The EndpointSlice of `checkout` for one family: every pod, ready.
fn dual_slice(pods: &[DualPod], family: &str) -> Value {
    let eps: Vec<Value> = pods
        .iter()
        .map(|p| {
            let ip = if family == "IPv4" { p.ip4 } else { p.ip6 };
            json!({
                "addresses": [ip.to_string()],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "nodeName": p.node,
                "targetRef": { "kind": "Pod", "namespace": "shop", "name": p.name, "uid": p.uid }
            })
        })
        .collect();
    json!({
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": format!("checkout-{}", family.to_ascii_lowercase()), "namespace": "shop",
            "uid": format!("slice-checkout-{family}"),
            "labels": { "kubernetes.io/service-name": "checkout" }
        },
        "addressType": family,
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": eps
    })
}

/// Two dual-stack nodes, two pods each, one API server and the shipped
/// ConfigMap on both. The `checkout` Service has a cluster IP of each
/// family; a pod on node A calls the IPv6 one from an IPv6 socket: the
/// calls spread over all four pods' IPv6 addresses, those to node B over
/// mutual TLS between the agents, and the client sees the cluster IP as
/// its peer. Plaintext IPv6 from outside straight to a (strict) pod of
/// node B is refused by the capture hook.
#[test]
fn dual_stack_nodes_balance_an_ipv6_cluster_ip_and_cross_nodes_over_mtls() {
    let (a_node, b_node) = (Node::new(2), Node::new(2));
    let tag = std::process::id() % 100_000;
    let (a_if, b_if) = ("dsa", "dsb");
    let (a_addr, b_addr) = ("198.18.251.1", "198.18.251.2");
    netns::veth(&a_node.node, a_if, &b_node.node, b_if).unwrap();
    let (a, b) = (a_node.node.name(), b_node.node.name());
    sh(&format!(
        "ip -n {a} addr add {a_addr}/24 dev {a_if} && ip -n {b} addr add {b_addr}/24 dev {b_if} && \
         ip -n {a} -6 addr add fd00:5c:ff::1/64 dev {a_if} nodad && \
         ip -n {b} -6 addr add fd00:5c:ff::2/64 dev {b_if} nodad && \
         ip netns exec {a} sysctl -qw net.ipv6.conf.all.forwarding=1 && \
         ip netns exec {b} sysctl -qw net.ipv6.conf.all.forwarding=1"
    ))
    .unwrap();
    // A's agent dials B's from A's pods' addresses: B routes back to them.
    for (_, ip) in &a_node.pods {
        let subnet = ip.to_string().rsplit_once('.').unwrap().0.to_owned() + ".0/24";
        sh(&format!("ip -n {b} route add {subnet} via {a_addr}")).unwrap();
    }
    let mut ip6 = Vec::new();
    for (node, first, other, via) in [
        (&a_node, 0xa0, b, "fd00:5c:ff::1"),
        (&b_node, 0xb0, a, "fd00:5c:ff::2"),
    ] {
        for i in 0..2 {
            let prefix = first + i as u16;
            ip6.push(add_ipv6(node, i, prefix));
            sh(&format!(
                "ip -n {other} -6 route add fd00:5c:{prefix:x}::/64 via {via}"
            ))
            .unwrap();
        }
    }

    let nodes = ShippedNodes::new(&a_node.node, a_addr, ["checkout", "checkout-b"]);
    let (api, a_cfg, b_cfg) = (&nodes.api, &nodes.a, &nodes.b);

    let layout = Layout::Cgroupfs;
    let mut pods = Vec::new();
    for (n, (cfg, node, node_name)) in [(a_cfg, &a_node, "node-a"), (b_cfg, &b_node, "node-b")]
        .into_iter()
        .enumerate()
    {
        std::fs::create_dir_all(cfg.cgroup_root_path().join(layout.kubepods())).unwrap();
        for i in 0..2 {
            let uid = format!("d5a1ce00-0000-4000-8000-{:08x}{n}{i:03}", tag);
            let pod_cgroup = layout.pod(Qos::Burstable, &uid);
            let (netns, ip4) = &node.pods[i];
            let holder = pause(cfg, netns, &layout.container(&pod_cgroup, 0));
            let name = format!("checkout-{}{i}", &node_name[5..]);
            let backend = Backend::start_in(&name, "[::]:8080".parse().unwrap(), netns);
            pods.push(DualPod {
                name,
                node: node_name,
                uid,
                ip4: *ip4,
                ip6: ip6[n * 2 + i],
                app: layout.container(&pod_cgroup, 1),
                _cgroup: CgroupTree::adopt(cfg.cgroup_root_path().join(&pod_cgroup)),
                _holder: holder,
                _backend: backend,
            });
        }
    }
    let (vip4, vip6) = ("127.77.13.10", "fd00:96::13:10");
    api.set_object(
        Resource::Namespaces,
        json!({
            "kind": "Namespace", "apiVersion": "v1",
            "metadata": { "name": "shop", "uid": "ns-shop", "annotations": { "sluice.io/mode": "mtls" } },
            "spec": { "finalizers": ["kubernetes"] }, "status": { "phase": "Active" }
        }),
    );
    api.set_object(
        Resource::Services,
        json!({
            "kind": "Service", "apiVersion": "v1",
            "metadata": { "name": "checkout", "namespace": "shop", "uid": "svc-checkout" },
            "spec": {
                "type": "ClusterIP", "clusterIP": vip4, "clusterIPs": [vip4, vip6],
                "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                "ports": [{ "name": "http", "port": 8080, "protocol": "TCP", "targetPort": 8080 }],
                "selector": { "app": "checkout" }
            },
            "status": { "loadBalancer": {} }
        }),
    );
    api.set_object(Resource::EndpointSlices, dual_slice(&pods, "IPv4"));
    api.set_object(Resource::EndpointSlices, dual_slice(&pods, "IPv6"));
    for p in &pods {
        let account = if p.node == "node-b" {
            "checkout-b"
        } else {
            "checkout"
        };
        api.set_object(Resource::Pods, p.object(account));
    }
    api.set_object(
        Resource::EndpointSlices,
        agents_slice(&[("node-a", a_addr), ("node-b", b_addr)]),
    );

    let agent_a = nodes.start("node-a", &a_node.node);
    let agent_b = nodes.start("node-b", &b_node.node);
    let services = |agent: &Agent| -> Vec<String> {
        let out = agent.sluice(&["services", "-o", "json"]);
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|s| format!("{} {}", s["name"].as_str().unwrap_or("?"), s["address"]))
            .collect()
    };
    for agent in [&agent_a, &agent_b] {
        agent.assert_ready();
        assert!(
            wait_until(Duration::from_secs(10), || services(agent).len() == 2),
            "{:?}\n{}",
            services(agent),
            agent.log()
        );
    }

    // Eight calls from pod a0 to the IPv6 cluster IP, from IPv6 sockets.
    let replies = run_in_pod(
        a_cfg,
        &a_node.pods[0].0,
        &pods[0].app,
        calls_from(vip6, 8080, 8),
    );
    let got = peers_and_backends(&replies);
    for (peer, _) in &got {
        assert_eq!(*peer, format!("{vip6}:8080"), "{replies:?}");
    }
    assert_eq!(
        distinct(got.iter().map(|(_, backend)| backend.as_str())),
        ["checkout-a0", "checkout-a1", "checkout-b0", "checkout-b1"],
        "{replies:?}\nA:\n{}\nB:\n{}",
        agent_a.log(),
        agent_b.log()
    );
    // The calls to node B went over mutual TLS and arrived at its agent.
    let metrics = agent_a.metrics();
    let mtls = metrics.sum(
        "sluice_tcp_connections_opened_total",
        &[
            ("connection_security_policy", "mutual_tls"),
            ("destination_service", "checkout-ipv6"),
        ],
    );
    assert!(mtls >= 2.0, "{metrics:?}");
    let status = agent_b.sluice(&["status", "-o", "json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(status["inbound_accepted"].as_u64() >= Some(2), "{status}");

    // Plaintext IPv6 from node A's namespace, outside every workload,
    // straight to pod b0's address: steered to node B's IPv6 capture
    // listener in b0 and refused there (counted, as IPv4 is).
    let target = SocketAddr::new(pods[2].ip6, 8080);
    let captured = agent_b.stat(Stat::Captured);
    let got = plain_call(&a_node.node, target);
    // The agent accepts and resets: the reset may even beat connect()'s
    // return.
    assert!(
        got == "closed" || got.starts_with("reset") || got == "refused: connection reset",
        "{got}"
    );
    assert_eq!(agent_b.stat(Stat::Captured), captured + 1);
    let metrics = agent_b.metrics();
    assert_eq!(
        metrics.sum("sluice_inbound_refusals_total", &[("reason", "plaintext")]),
        1.0,
        "{metrics:?}"
    );

    // With node B's agent gone, the hook refuses it by itself.
    let mut agent_b = agent_b;
    agent_b.kill();
    let before = agent_b.stat(Stat::CaptureRefused);
    assert_eq!(
        plain_call(&a_node.node, target),
        "refused: connection refused"
    );
    assert!(agent_b.stat(Stat::CaptureRefused) > before);
}
