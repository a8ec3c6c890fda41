//! Sluice's kernel side. Each program reads a map, decides, writes a map;
//! everything that can be decided in userspace is decided there.
//!
//! Flow of one outbound connection:
//! 1. `connect4`: a workload dials a meshed service's virtual address. The
//!    destination is recorded under the socket's cookie and rewritten to the
//!    agent's outbound listener.
//! 2. `sock_ops` (active established): the record moves to a key the agent
//!    can compute from `accept()`: network namespace cookie + client address
//!    and port.
//! 3. The agent takes the record (lookup-and-delete) when it accepts.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::info;
use sluice_maps::{
    MAX_PENDING_RECORDS, MAX_SERVICES, OriginalDst, PeerKey, SETTINGS_LOG, STAT_COUNT, ServiceKey,
    ServiceValue, Settings, Stat, v4_mapped,
};

/// Allow the syscall to proceed (cgroup/connect4 return value).
const ALLOW: i32 = 1;
/// Fail the syscall with EPERM.
const REFUSE: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;

#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);

#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OriginalDst> = LruHashMap::pinned(MAX_PENDING_RECORDS, 0);

#[map]
static ORIG_BY_PEER: LruHashMap<PeerKey, OriginalDst> = LruHashMap::pinned(MAX_PENDING_RECORDS, 0);

#[map]
static SETTINGS: Array<Settings> = Array::pinned(1, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

#[inline(always)]
fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // Per-CPU slot: no other writer can race this increment.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn settings() -> Option<&'static Settings> {
    SETTINGS.get(0).filter(|s| s.listener_port != 0)
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx)
}

fn try_connect4(ctx: &SockAddrContext) -> i32 {
    let Some(settings) = settings() else {
        return ALLOW;
    };
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if !sk.is_null() && unsafe { (*sk).mark } == settings.agent_mark {
        count(Stat::AgentSocket);
        return ALLOW;
    }

    let addr = v4_mapped(sa.user_ip4);
    let port = u16::from_be(sa.user_port as u16);
    let key = ServiceKey {
        addr,
        port,
        _pad: 0,
    };
    if unsafe { SERVICES.get(key) }.is_none() {
        count(Stat::NotMeshed);
        return ALLOW;
    }

    let record = OriginalDst {
        addr,
        port,
        _pad: [0; 6],
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        created_ns: unsafe { bpf_ktime_get_ns() },
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_BY_COOKIE
        .insert(cookie, record, BPF_ANY as u64)
        .is_err()
    {
        // Without the record the agent could not serve the connection:
        // refuse rather than send it anywhere unaccounted.
        count(Stat::RecordFailed);
        return REFUSE;
    }

    sa.user_ip4 = settings.listener_ip4;
    sa.user_port = u32::from(settings.listener_port.to_be());
    count(Stat::Redirected);
    if settings.flags & SETTINGS_LOG != 0 {
        info!(
            ctx,
            "connect4: redirect cookie={} cgroup={} port={}", cookie, record.cgroup_id, port
        );
    }
    ALLOW
}

// Named apart from its section: a `#[sock_ops]` fn called `sockops` clashes
// with the section name in bpf-linker.
#[sock_ops]
pub fn sluice_sockops(ctx: SockOpsContext) -> u32 {
    // Only IPv4 is redirected (no connect6 program yet), so only IPv4
    // connections can have a record.
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && ctx.family() == AF_INET {
        rekey_established(&ctx);
    }
    0
}

fn rekey_established(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(record) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let key = PeerKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr: v4_mapped(ctx.local_ip4()),
        // sock_ops reports the local port in host byte order.
        port: ctx.local_port() as u16,
        _pad: [0; 6],
    };
    if ORIG_BY_PEER.insert(key, record, BPF_ANY as u64).is_ok() {
        count(Stat::Established);
    } else {
        count(Stat::RecordFailed);
    }
    let _ = ORIG_BY_COOKIE.remove(cookie);
    if let Some(settings) = settings()
        && settings.flags & SETTINGS_LOG != 0
    {
        info!(
            ctx,
            "sock_ops: established cookie={} client_port={}", cookie, key.port
        );
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";
