//! Sluice's kernel side. Each program reads a map, decides, writes a map;
//! everything that can be decided in userspace is decided there.
//!
//! Flow of one outbound connection:
//! 1. `connect4` / `connect6`: a workload dials a meshed service's virtual
//!    address (IPv4, IPv6, or IPv4 written `::ffff:a.b.c.d` on an IPv6
//!    socket: all one key form). The destination is recorded under the
//!    socket's cookie and rewritten to the agent's outbound listener (for an
//!    IPv6 socket its `[::1]` twin, or its v4-mapped form).
//! 2. `sock_ops` (active established): the record moves to a key the agent
//!    can compute from `accept()`: network namespace cookie + client address
//!    and port.
//! 3. The agent takes the record (lookup-and-delete) when it accepts.
//!
//! `getpeername4` / `getpeername6` show the application the virtual address
//! it dialled, whether the agent or the kernel carries the connection.
//!
//! Kernel mode (a service with the SERVICE_KERNEL flag) skips the agent:
//! the connect hook takes the next slot of the service's backend table and
//! rewrites the destination to that backend; `sock_ops` reports the
//! connect's outcome to the agent through a ring buffer, for outlier
//! detection.
//!
//! Inbound capture: `sluice_capture` (sk_lookup), attached to the network
//! namespace of every captured workload, steers a connect that arrives from
//! outside that namespace to the agent's capture listener there, which
//! refuses plaintext for strict workloads. Connects over the namespace's
//! loopback (the workload itself, and the agent delivering from inside the
//! namespace) go their usual way.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_NO_PREALLOC, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTO_CB, BPF_SOCK_OPS_RTO_CB_FLAG,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        bpf_sock_tuple,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_lookup_tcp,
        bpf_sk_release,
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sk_msg, sock_ops, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash, SockMap},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, TracePointContext},
};
use aya_log_ebpf::info;
use sluice_maps::{
    AgentLife, Backend, BackendKey, CALLER_LEVELS, CAPTURE_SLOTS, CAPTURE_STRICT, CaptureKey,
    CaptureValue, EVENT_CONNECT_FAILED, EVENT_ESTABLISHED, EVENT_MARK_SPOOFED, EVENT_RTO,
    KERNEL_EVENTS_BYTES, KernelConn, KernelEvent, MAX_AGENT_CGROUPS, MAX_BACKEND_SLOTS,
    MAX_BYPASS_SOCKETS, MAX_CAPTURES, MAX_DIALLED, MAX_KERNEL_CONNS, MAX_PENDING_RECORDS,
    MAX_SERVICES, OriginalDst, PeerKey, SERVICE_FAIL_OPEN, SERVICE_KERNEL, SETTINGS_LOG,
    SETTINGS_SOCKMAP, SIGNAL_GENERATE_PID_OFFSET, SIGNAL_GENERATE_SIG_OFFSET, STAT_COUNT,
    ServiceKey, ServiceValue, Settings, SockKey, Stat, capture_slot_v6, is_v4_mapped, v4_mapped,
};

/// Allow the syscall to proceed (cgroup/connect4 return value).
const ALLOW: i32 = 1;
/// Fail the syscall with EPERM.
const REFUSE: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `::1` in key form (network byte order).
const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// `BPF_F_CURRENT_NETNS`: look sockets up in the caller's namespace.
const CURRENT_NETNS: u64 = u64::MAX;
/// TCP states as sock_ops reports them (include/net/tcp_states.h).
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;

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

// Not preallocated: most nodes fill a small part of it.
#[map]
static BACKENDS: HashMap<BackendKey, Backend> =
    HashMap::pinned(MAX_BACKEND_SLOTS, BPF_F_NO_PREALLOC);

#[map]
static CURSORS: PerCpuArray<u32> = PerCpuArray::pinned(MAX_SERVICES, 0);

#[map]
static KERNEL_CONNS: LruHashMap<u64, KernelConn> = LruHashMap::pinned(MAX_KERNEL_CONNS, 0);

#[map]
static DIALLED: LruHashMap<u64, ServiceKey> = LruHashMap::pinned(MAX_DIALLED, 0);

#[map]
static KERNEL_EVENTS: RingBuf = RingBuf::pinned(KERNEL_EVENTS_BYTES, 0);

#[map]
static SOCKETS: SockHash<SockKey> = SockHash::pinned(MAX_BYPASS_SOCKETS, 0);

#[map]
static BYPASS: LruHashMap<SockKey, u32> = LruHashMap::pinned(MAX_BYPASS_SOCKETS, 0);

/// Written by the agent; the programs never read it, but it lives in the
/// object so that it is created and pinned with the rest.
#[map]
static LAYOUT: Array<u32> = Array::pinned(1, 0);

#[map]
// LRU: an agent that handed over leaves its entry behind; live agents
// write theirs again every few seconds, so only stale ones age out.
static AGENT_CGROUPS: LruHashMap<u64, u32> = LruHashMap::pinned(MAX_AGENT_CGROUPS, 0);

#[map]
static CAPTURE: HashMap<CaptureKey, CaptureValue> = HashMap::pinned(MAX_CAPTURES, 0);

#[map]
static AGENT_LIFE: Array<AgentLife> = Array::pinned(1, 0);

#[map]
static CAPTURE_LISTENERS: SockMap = SockMap::pinned(CAPTURE_SLOTS, 0);

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
    let sa = unsafe { &mut *ctx.sock_addr };
    let dialled = ServiceKey {
        addr: v4_mapped(sa.user_ip4),
        port: u16::from_be(sa.user_port as u16),
        _pad: 0,
    };
    match decide(&ctx, sa, &dialled, false) {
        Verdict::Allow => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Rewrite(addr, port) => {
            // An IPv4 socket can only be sent to an IPv4 address; config
            // validation keeps IPv6 backends out of IPv4 services' tables.
            if !is_v4_mapped(&addr) {
                return REFUSE;
            }
            sa.user_ip4 = addr[3];
            sa.user_port = u32::from(port.to_be());
            ALLOW
        }
    }
}

/// The IPv6 twin of `connect4`, with the same decisions: the key is the
/// 16-byte address as dialled, so an IPv6 virtual address is its own key and
/// `::ffff:a.b.c.d` (an IPv6 socket dialling an IPv4 address, which
/// `connect4` never sees) is the IPv4 service's key.
///
/// To the agent: a socket dialling an IPv6 address goes to the agent's
/// IPv6 twin listener, `[::1]` on the outbound port, where the agent
/// listens in the caller's namespace (an IPV6_V6ONLY socket can reach
/// nothing else, and this hook cannot read that flag); otherwise, and for
/// a v4-mapped destination, to the outbound listener's v4-mapped form
/// (`::ffff:127.0.0.1:15001`), which the kernel runs as IPv4 on the wire
/// (`tcp_v6_connect` hands it to `tcp_v4_connect`).
#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let dialled = ServiceKey {
        addr: read_ip6(&sa.user_ip6),
        port: u16::from_be(sa.user_port as u16),
        _pad: 0,
    };
    match decide(&ctx, sa, &dialled, true) {
        Verdict::Allow => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Rewrite(addr, port) => {
            write_ip6(&mut sa.user_ip6, &addr);
            sa.user_port = u32::from(port.to_be());
            ALLOW
        }
    }
}

/// Reads a context's IPv6 address one 4-byte word at a time: the verifier
/// takes only narrow accesses to these fields, and LLVM would merge plain
/// reads.
#[inline(always)]
fn read_ip6(words: &[u32; 4]) -> [u32; 4] {
    let p = words.as_ptr();
    unsafe {
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    }
}

/// Writes a context's IPv6 address one 4-byte word at a time (see
/// [`read_ip6`]).
#[inline(always)]
fn write_ip6(words: &mut [u32; 4], addr: &[u32; 4]) {
    let p = words.as_mut_ptr();
    unsafe {
        core::ptr::write_volatile(p, addr[0]);
        core::ptr::write_volatile(p.add(1), addr[1]);
        core::ptr::write_volatile(p.add(2), addr[2]);
        core::ptr::write_volatile(p.add(3), addr[3]);
    }
}

/// What a connect hook does with one connect.
enum Verdict {
    Allow,
    Refuse,
    /// Send it to this key-form address and port instead.
    Rewrite([u32; 4], u16),
}

/// The decision both connect hooks share, on the destination in key form;
/// `v6` only names the hook in log events.
fn decide(
    ctx: &SockAddrContext,
    sa: &aya_ebpf::bindings::bpf_sock_addr,
    dialled: &ServiceKey,
    v6: bool,
) -> Verdict {
    let Some(settings) = settings() else {
        return Verdict::Allow;
    };
    if sa.protocol != IPPROTO_TCP {
        return Verdict::Allow;
    }
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let mut spoofed = false;
    if !sk.is_null() && unsafe { (*sk).mark } == settings.agent_mark {
        // CAP_NET_RAW is enough to set a mark, and runtimes grant it to
        // containers: the mark counts only on a socket of the agent's own
        // cgroup, which a workload cannot choose.
        let cgroup = unsafe { bpf_get_current_cgroup_id() };
        if unsafe { AGENT_CGROUPS.get(cgroup) }.is_some() {
            count(Stat::AgentSocket);
            return Verdict::Allow;
        }
        count(Stat::MarkSpoofed);
        spoofed = true;
    }
    if spoofed {
        report_spoofed_mark(dialled, settings);
    }
    let Some(service) = (unsafe { SERVICES.get(dialled) }).copied() else {
        count(Stat::NotMeshed);
        return Verdict::Allow;
    };
    if service.flags & SERVICE_KERNEL != 0 {
        return balance_in_kernel(ctx, dialled, &service, settings, v6);
    }
    // A killed agent's listener lingers until the kernel has torn the
    // process down; a connect sent there would be reset. Each service
    // takes its on_agent_down path instead: fail_closed is refused now.
    let killed = agent_killed();
    let fail_open = service.flags & SERVICE_FAIL_OPEN != 0;
    if killed && !fail_open {
        return Verdict::Refuse;
    }
    if fail_open && (killed || !agent_listening(ctx, settings)) {
        count(Stat::FailOpen);
        if service.slots == 0 {
            // No table: the original destination, as the application asked.
            return Verdict::Allow;
        }
        return balance_in_kernel(ctx, dialled, &service, settings, v6);
    }

    let record = OriginalDst {
        addr: dialled.addr,
        port: dialled.port,
        _pad: [0; 6],
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        ancestors: caller_ancestors(settings),
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
        return Verdict::Refuse;
    }
    // Only for getpeername: the connection works without it.
    let _ = DIALLED.insert(cookie, *dialled, BPF_ANY as u64);
    count(Stat::Redirected);
    if settings.flags & SETTINGS_LOG != 0 {
        let (cgroup, port) = (record.cgroup_id, dialled.port);
        if v6 {
            info!(
                ctx,
                "connect6: redirect cookie={} cgroup={} port={}", cookie, cgroup, port
            );
        } else {
            info!(
                ctx,
                "connect4: redirect cookie={} cgroup={} port={}", cookie, cgroup, port
            );
        }
    }
    let agent = if v6 && !is_v4_mapped(&dialled.addr) && agent_listening6(ctx, settings) {
        LOOPBACK6
    } else {
        v4_mapped(settings.listener_ip4)
    };
    Verdict::Rewrite(agent, settings.listener_port)
}

/// The caller's ancestor cgroups just below the hooked one: where a pod's
/// cgroup is when the caller runs in one of its containers.
#[inline(always)]
fn caller_ancestors(settings: &Settings) -> [u64; CALLER_LEVELS] {
    let first = settings.cgroup_root_level as i32 + 1;
    let at = |i: i32| unsafe { bpf_get_current_ancestor_cgroup_id(first + i) };
    [at(0), at(1), at(2), at(3)]
}

/// Tells the agent, at once, that a workload tried to pass for it.
fn report_spoofed_mark(dialled: &ServiceKey, settings: &Settings) {
    let event = KernelEvent {
        conn: KernelConn {
            service: *dialled,
            backend: Backend {
                addr: [0; 4],
                port: 0,
                _pad: 0,
            },
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            ancestors: caller_ancestors(settings),
        },
        kind: EVENT_MARK_SPOOFED,
        value: 0,
    };
    if KERNEL_EVENTS
        .output::<KernelEvent>(&event, u64::from(BPF_RB_FORCE_WAKEUP))
        .is_err()
    {
        count(Stat::EventLost);
    }
}

/// Whether the serving agent has been killed (or is exiting), though its
/// sockets may still exist.
#[inline(always)]
fn agent_killed() -> bool {
    AGENT_LIFE.get(0).is_some_and(|life| life.killed != 0)
}

/// Marks the serving agent killed when `tgid` is its process.
#[inline(always)]
fn mark_killed(tgid: u32) {
    if let Some(life) = AGENT_LIFE.get_ptr_mut(0) {
        // SAFETY: a valid slot of the array; a racing write sets the same.
        unsafe {
            if tgid != 0 && (*life).tgid == tgid {
                (*life).killed = 1;
            }
        }
    }
}

/// `signal/signal_generate`: a SIGKILL generated for the serving agent
/// (kill -9, the OOM killer, a runtime stopping its container) closes the
/// kill window the moment it is sent. `pid` is the target task's; a kill
/// of the process targets its main thread, whose pid is the process id.
#[tracepoint]
pub fn sluice_agent_signal(ctx: TracePointContext) -> u32 {
    const SIGKILL: i32 = 9;
    let sig = unsafe { ctx.read_at::<i32>(SIGNAL_GENERATE_SIG_OFFSET) }.unwrap_or(0);
    if sig == SIGKILL {
        let pid = unsafe { ctx.read_at::<i32>(SIGNAL_GENERATE_PID_OFFSET) }.unwrap_or(0);
        mark_killed(pid as u32);
    }
    0
}

/// `sched/sched_process_exit`: the serving agent's main thread is exiting
/// (any other way to die), before its files are closed.
#[tracepoint]
pub fn sluice_agent_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tgid == tid {
        mark_killed(tgid);
    }
    0
}

/// Whether the agent's outbound listener exists in the caller's network
/// namespace. The kernel drops the socket when the agent dies, so this
/// needs no heartbeat.
fn agent_listening(ctx: &SockAddrContext, settings: &Settings) -> bool {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.daddr = settings.listener_ip4;
    tuple.__bindgen_anon_1.ipv4.dport = settings.listener_port.to_be();
    let size = core::mem::size_of_val(unsafe { &tuple.__bindgen_anon_1.ipv4 }) as u32;
    let sk = unsafe { bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk as *mut _) };
    true
}

/// Whether the agent's IPv6 twin of the outbound listener (`[::1]`, same
/// port) exists in the caller's network namespace.
fn agent_listening6(ctx: &SockAddrContext, settings: &Settings) -> bool {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv6.daddr = LOOPBACK6;
    tuple.__bindgen_anon_1.ipv6.dport = settings.listener_port.to_be();
    let size = core::mem::size_of_val(unsafe { &tuple.__bindgen_anon_1.ipv6 }) as u32;
    let sk = unsafe { bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk as *mut _) };
    true
}

/// Sends the connect to the next backend of the service's live table.
/// Inlined: BPF calls take at most five arguments, the returned verdict's
/// pointer included.
#[inline(always)]
fn balance_in_kernel(
    ctx: &SockAddrContext,
    key: &ServiceKey,
    service: &ServiceValue,
    settings: &Settings,
    v6: bool,
) -> Verdict {
    if service.slots == 0 {
        // The agent emptied the table: every endpoint is ineligible and the
        // service's panic policy is fail_closed.
        count(Stat::KernelNoBackend);
        return Verdict::Refuse;
    }
    // Per-CPU cursor: no atomics, no contention; each CPU walks the table
    // in order, so proportions hold exactly over every full turn.
    let index = match CURSORS.get_ptr_mut(service.id % MAX_SERVICES) {
        Some(cursor) => unsafe {
            let i = *cursor;
            *cursor = i.wrapping_add(1);
            i % service.slots
        },
        None => 0,
    };
    let slot = BackendKey::new(*key, service.generation & 1, index);
    let Some(backend) = (unsafe { BACKENDS.get(slot) }).copied() else {
        count(Stat::KernelNoBackend);
        return Verdict::Refuse;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let conn = KernelConn {
        service: *key,
        backend,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        ancestors: caller_ancestors(settings),
    };
    // Without this entry getpeername would show the backend and the outcome
    // would go unseen; the connect itself still works, so go on.
    let _ = KERNEL_CONNS.insert(cookie, conn, BPF_ANY as u64);
    count(Stat::KernelBalanced);
    if settings.flags & SETTINGS_LOG != 0 {
        let (from, to) = (key.port, backend.port);
        if v6 {
            info!(
                ctx,
                "connect6: kernel-balanced cookie={} port={} -> port={}", cookie, from, to
            );
        } else {
            info!(
                ctx,
                "connect4: kernel-balanced cookie={} port={} -> port={}", cookie, from, to
            );
        }
    }
    Verdict::Rewrite(backend.addr, backend.port)
}

/// The virtual address a socket's connect dialled, if a connect hook
/// rewrote it (kernel-balanced or sent to the agent).
#[inline(always)]
fn dialled(ctx: &SockAddrContext) -> Option<ServiceKey> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(conn) = unsafe { KERNEL_CONNS.get(cookie) } {
        return Some(conn.service);
    }
    unsafe { DIALLED.get(cookie) }.copied()
}

/// Shows the application the virtual address it dialled, not the backend
/// the kernel chose nor the agent's listener.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(service) = dialled(&ctx)
        && is_v4_mapped(&service.addr)
    {
        sa.user_ip4 = service.addr[3];
        sa.user_port = u32::from(service.port.to_be());
    }
    ALLOW
}

/// `getpeername4` for IPv6 sockets: the address as dialled, an IPv4 one in
/// its v4-mapped form (as the application wrote it).
#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(service) = dialled(&ctx) {
        write_ip6(&mut sa.user_ip6, &service.addr);
        sa.user_port = u32::from(service.port.to_be());
    }
    ALLOW
}

// Named apart from its section: a `#[sock_ops]` fn called `sockops` clashes
// with the section name in bpf-linker.
#[sock_ops]
pub fn sluice_sockops(ctx: SockOpsContext) -> u32 {
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return 0;
    }
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => watch_rewritten(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            if rekey_established(&ctx) {
                offer_bypass(&ctx);
            }
            report_kernel_conn(&ctx, EVENT_ESTABLISHED);
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == TCP_CLOSE {
                if ctx.arg(0) == TCP_SYN_SENT && report_kernel_conn(&ctx, EVENT_CONNECT_FAILED) {
                    count(Stat::KernelConnectFailed);
                }
                let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
                let _ = KERNEL_CONNS.remove(cookie);
                let _ = DIALLED.remove(cookie);
            }
        }
        BPF_SOCK_OPS_RTO_CB => {
            report_kernel_conn(&ctx, EVENT_RTO);
        }
        _ => {}
    }
    0
}

/// Whether an IPv6 sock_ops socket is connected to a v4-mapped address,
/// so runs IPv4 on the wire (its IPv4 fields hold its addresses).
#[inline(always)]
fn remote_v4_mapped(ctx: &SockOpsContext) -> bool {
    is_v4_mapped(&read_ip6(unsafe { &(*ctx.ops).remote_ip6 }))
}

/// The local address of a sock_ops socket in key form. An IPv6 socket
/// connected to a v4-mapped address runs IPv4 on the wire: its local
/// address is the IPv4 one that the agent's `accept()` sees.
#[inline(always)]
fn local_key_addr(ctx: &SockOpsContext) -> [u32; 4] {
    if ctx.family() == AF_INET6 && !remote_v4_mapped(ctx) {
        return read_ip6(unsafe { &(*ctx.ops).local_ip6 });
    }
    v4_mapped(ctx.local_ip4())
}

/// The remote address of a sock_ops socket in key form (see
/// [`local_key_addr`]).
#[inline(always)]
fn remote_key_addr(ctx: &SockOpsContext) -> [u32; 4] {
    if ctx.family() == AF_INET6 {
        return read_ip6(unsafe { &(*ctx.ops).remote_ip6 });
    }
    v4_mapped(ctx.remote_ip4())
}

/// `sock_ops` reports ports in mixed forms (remote in network order, in the
/// upper half on some paths); this gives the port in host order.
#[inline(always)]
fn remote_port(raw: u32) -> u16 {
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(be as u16)
}

/// Puts a workload's redirected socket into SOCKETS (when the bypass is
/// switched on), so that the agent's writes to it skip the TCP stack.
fn offer_bypass(ctx: &SockOpsContext) {
    let Some(settings) = settings() else {
        return;
    };
    if settings.flags & SETTINGS_SOCKMAP == 0 {
        return;
    }
    let mut key = SockKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local: local_key_addr(ctx),
        remote: remote_key_addr(ctx),
        local_port: ctx.local_port() as u16,
        remote_port: remote_port(ctx.remote_port()),
        _pad: 0,
    };
    if SOCKETS
        .update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)
        .is_ok()
    {
        count(Stat::BypassSocket);
    }
}

/// Moves each message between a workload and the agent straight into the
/// receiving socket's queue. The agent's side always may: its peer was in
/// SOCKETS before the agent accepted. The workload's side decides once, at
/// its first message: if the agent's socket is not in SOCKETS yet, earlier
/// bytes may already wait in the agent's TCP queue, and later ones must
/// not overtake them, so the connection keeps TCP in that direction.
#[sk_msg]
pub fn sluice_sk_msg(ctx: SkMsgContext) -> u32 {
    const SK_PASS: u32 = 1;
    const BPF_F_INGRESS: u64 = 1;
    let md = unsafe { &*ctx.msg };
    // Key form, as sock_ops and the agent write it: an IPv6 socket
    // connected to a v4-mapped address is keyed by its IPv4 addresses.
    let remote6 = read_ip6(&md.remote_ip6);
    let (local, remote) = if md.family == AF_INET6 && !is_v4_mapped(&remote6) {
        (read_ip6(&md.local_ip6), remote6)
    } else {
        (v4_mapped(md.local_ip4), v4_mapped(md.remote_ip4))
    };
    let own = SockKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.msg as *mut _) },
        local,
        remote,
        local_port: md.local_port as u16,
        remote_port: remote_port(md.remote_port),
        _pad: 0,
    };
    let mut peer = own.peer();
    // The agent's end: its outbound listener, or the listener's IPv6 twin.
    let from_agent = settings().is_some_and(|s| {
        own.local_port == s.listener_port
            && (own.local == v4_mapped(s.listener_ip4) || own.local == LOOPBACK6)
    });
    if !from_agent {
        match unsafe { BYPASS.get(own) } {
            Some(&0) => return SK_PASS,
            Some(_) => {}
            None => {
                let first = SOCKETS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS) as u32 == SK_PASS;
                let _ = BYPASS.insert(own, u32::from(first), BPF_ANY as u64);
                if first {
                    count(Stat::BypassMessage);
                }
                return SK_PASS;
            }
        }
    }
    if SOCKETS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS) as u32 == SK_PASS {
        count(Stat::BypassMessage);
    }
    // Redirected, or (peer gone) through the TCP stack as usual.
    SK_PASS
}

/// Asks for state callbacks on the sockets a connect hook rewrote (RTO
/// callbacks too for kernel-balanced ones), so other sockets pay nothing:
/// their entries go when they close.
fn watch_rewritten(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let extra = if unsafe { KERNEL_CONNS.get(cookie) }.is_some() {
        BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG
    } else if unsafe { DIALLED.get(cookie) }.is_some() {
        BPF_SOCK_OPS_STATE_CB_FLAG
    } else {
        return;
    };
    let _ = ctx.set_cb_flags((ctx.cb_flags() | extra) as i32);
}

/// Queues an outcome of a kernel-balanced connect; false if the socket is
/// not one.
fn report_kernel_conn(ctx: &SockOpsContext, kind: u32) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(conn) = (unsafe { KERNEL_CONNS.get(cookie) }).copied() else {
        return false;
    };
    let value = match kind {
        // srtt_us is kept left-shifted by 3 (eighths of a microsecond).
        EVENT_ESTABLISHED => (unsafe { (*ctx.ops).srtt_us }) >> 3,
        EVENT_RTO => unsafe { (*ctx.ops).total_retrans },
        _ => 0,
    };
    let event = KernelEvent { conn, kind, value };
    // A failure wakes the agent at once (it may eject the endpoint); other
    // outcomes wait for its next periodic read, so that a busy node does
    // not pay a wake-up per connection.
    let wakeup = if kind == EVENT_CONNECT_FAILED {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if KERNEL_EVENTS
        .output::<KernelEvent>(&event, u64::from(wakeup))
        .is_err()
    {
        count(Stat::EventLost);
    }
    true
}

/// Moves the record of a redirected connection to its peer key; true if
/// the socket was one the agent will accept.
fn rekey_established(ctx: &SockOpsContext) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(record) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else {
        return false;
    };
    let key = PeerKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr: local_key_addr(ctx),
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
    true
}

/// Steers an inbound TCP connect to a captured workload, arriving from
/// outside its network namespace, to the agent's capture listener there of
/// the connect's family (the kernel steers an IPv6 connect to an IPv6
/// socket only).
#[sk_lookup]
pub fn sluice_capture(ctx: SkLookupContext) -> u32 {
    const SK_DROP: u32 = 0;
    const SK_PASS: u32 = 1;
    const LOOPBACK_IFINDEX: u32 = 1;
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // From inside this namespace: the workload calling itself, or the
    // agent delivering a connection it has already checked. Such a connect
    // has a loopback source, or its source is the destination itself (the
    // kernel's choice for a local route). Neither can come from outside:
    // the kernel drops a packet arriving on a wire with a local or
    // loopback source address as martian.
    if lookup.ingress_ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    let (local, remote) = match lookup.family {
        AF_INET => (v4_mapped(lookup.local_ip4), v4_mapped(lookup.remote_ip4)),
        AF_INET6 => (read_ip6(&lookup.local_ip6), read_ip6(&lookup.remote_ip6)),
        _ => return SK_PASS,
    };
    let loopback = if is_v4_mapped(&remote) {
        u32::from_be(remote[3]) >> 24 == 127
    } else {
        remote == LOOPBACK6
    };
    if loopback || remote == local {
        return SK_PASS;
    }
    // sk_lookup gives the local port in host byte order.
    let port = lookup.local_port as u16;
    let exact = CaptureKey {
        addr: local,
        port,
        _pad: 0,
    };
    let pod = CaptureKey { port: 0, ..exact };
    let node = CaptureKey {
        addr: v4_mapped(0),
        ..exact
    };
    let found = unsafe { CAPTURE.get(exact) }
        .or_else(|| unsafe { CAPTURE.get(pod) })
        .or_else(|| unsafe { CAPTURE.get(node) })
        .copied();
    let Some(capture) = found else {
        return SK_PASS;
    };
    let slot = if lookup.family == AF_INET6 {
        capture_slot_v6(capture.listener)
    } else {
        capture.listener
    };
    if CAPTURE_LISTENERS.redirect_sk_lookup(&ctx, slot, 0).is_ok() {
        count(Stat::Captured);
        return SK_PASS;
    }
    // No capture listener: the agent is down or stopping (or, for IPv6,
    // could not listen on the namespace's [::1]).
    if capture.flags & CAPTURE_STRICT != 0 {
        // No socket for the connect: the kernel answers with a reset.
        count(Stat::CaptureRefused);
        return SK_DROP;
    }
    count(Stat::CapturePassed);
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual BSD/GPL\0";
