//! IPv6 and dual stack, as root: real programs on a real cgroup, a real
//! agent, clients in the workload cgroup. `connect6` makes the decisions
//! `connect4` makes: an IPv6 virtual address is redirected to the agent (or
//! balanced by the kernel) over IPv6 backends, an IPv6 socket dialling the
//! v4-mapped form of an IPv4 virtual address is treated as an IPv4 socket
//! dialling it, and `getpeername()` shows the address the client dialled.

mod support;

use std::{collections::HashMap, net::SocketAddr};

use sluice_maps::Stat;
use support::*;

/// IPv6 virtual address in the documentation prefix: never routed here, so
/// a call that the hook missed fails instead of leaving the machine.
const VIP6: &str = "[2001:db8:77::10]:8080";

/// A backend on IPv6 loopback.
fn backend6(name: &str) -> Backend {
    Backend::start_on(name, "[::1]:0".parse().unwrap())
}

/// Python (bash's /dev/tcp cannot choose the socket family) making `n`
/// calls to `ip`:`port` from sockets of `family` (`AF_INET` or `AF_INET6`),
/// one connection each; prints `<peer as getpeername shows it> <reply>`.
fn calls_from(family: &str, ip: &str, port: u16, n: usize) -> String {
    format!(
        "python3 -c '
import socket
for i in range({n}):
    s = socket.socket(socket.{family}, socket.SOCK_STREAM)
    s.connect((\"{ip}\", {port}))
    peer = s.getpeername()
    s.sendall(b\"call %d\\n\" % (i + 1))
    reply = s.makefile().readline().strip()
    print(\"%s:%d %s\" % (peer[0], peer[1], reply))
    s.close()
'"
    )
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

fn counts(of: impl Iterator<Item = String>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for x in of {
        *counts.entry(x).or_default() += 1;
    }
    counts
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
    let config = AgentConfig::new(&[ServiceDef::new("ledger6", VIP6, &addrs)]);
    let agent = Agent::start(&config);

    let script = calls_from("AF_INET6", &vip.ip().to_string(), vip.port(), 10);
    let replies = lines(&agent.run_as_client(&script));

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
        wait_until(std::time::Duration::from_secs(5), || agent.record_counts()
            == (0, 0)),
        "records left: {:?}",
        agent.record_counts()
    );
}

#[test]
fn an_ipv6_virtual_address_is_balanced_by_the_kernel_over_two_ipv6_backends() {
    let vip: SocketAddr = VIP6.parse().unwrap();
    let backends = [backend6("k6a"), backend6("k6b")];
    let addrs = [backends[0].addr, backends[1].addr];
    let service = ServiceDef::new("ledger6", VIP6, &addrs).with("    mode: kernel\n");
    let config = AgentConfig::new(&[service]);
    let agent = Agent::start(&config);

    let script = calls_from("AF_INET6", &vip.ip().to_string(), vip.port(), 10);
    let replies = lines(&agent.run_as_client(&script));

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
        ServiceDef::new(
            "payments",
            &proxied.to_string(),
            &[backends[0].addr, backends[1].addr],
        ),
        ServiceDef::new(
            "ledger",
            &kernel.to_string(),
            &[kbackends[0].addr, kbackends[1].addr],
        )
        .with("    mode: kernel\n"),
    ]);
    let agent = Agent::start(&config);

    // The IPv4 service's key serves the v4-mapped form: connect6 decides as
    // connect4 would, and the client sees the address as it wrote it.
    let script = calls_from("AF_INET6", "::ffff:127.77.8.10", 8080, 4);
    let replies = lines(&agent.run_as_client(&script));
    assert_balanced_and_shown(
        &replies,
        "::ffff:127.77.8.10:8080",
        &[&backends[0], &backends[1]],
        4,
    );
    assert_eq!(agent.stat(Stat::Redirected), 4);

    let script = calls_from("AF_INET6", "::ffff:127.77.8.11", 8080, 4);
    let replies = lines(&agent.run_as_client(&script));
    assert_balanced_and_shown(
        &replies,
        "::ffff:127.77.8.11:8080",
        &[&kbackends[0], &kbackends[1]],
        4,
    );
    assert_eq!(agent.stat(Stat::KernelBalanced), 4);

    // And an IPv4 socket sees the virtual address too (proxy mode), not
    // the agent's listener.
    let script = calls_from("AF_INET", "127.77.8.10", 8080, 2);
    let replies = lines(&agent.run_as_client(&script));
    assert_balanced_and_shown(&replies, "127.77.8.10:8080", &[], 2);
    assert_eq!(agent.stat(Stat::Redirected), 6);
}
