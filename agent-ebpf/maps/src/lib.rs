//! The contract between Sluice's eBPF programs and its agent.
//!
//! Every map the programs share with userspace is named and typed here, once.
//! Both sides compile this crate: the programs for the bpf target (no_std),
//! the agent with the `user` feature, which adds `aya::Pod`.
//!
//! Conventions, so that both sides build the same bytes:
//! - Addresses are IPv6-sized, `[u32; 4]` in network byte order as the kernel
//!   stores them; an IPv4 address is written v4-mapped (`::ffff:a.b.c.d`).
//! - Ports are in host byte order.
//! - Every struct is `#[repr(C)]` with explicit padding fields, so no byte of
//!   a key is uninitialised (the kernel hashes all of them).
#![no_std]

/// Name of the map of meshed services: [`ServiceKey`] -> [`ServiceValue`].
/// Written by the agent from its catalog, read by `connect4` and `connect6`
/// (an IPv4 service under its v4-mapped address, so one key serves an IPv4
/// socket and an IPv6 socket dialling `::ffff:a.b.c.d`).
pub const SERVICES: &str = "SERVICES";
/// Name of the map of redirected sockets not yet established:
/// socket cookie (`u64`) -> [`OriginalDst`]. Written by `connect4` and
/// `connect6`, moved to
/// [`ORIG_BY_PEER`] by `sock_ops`; left-overs (refused connects) age out of
/// this LRU map or are swept by the agent.
pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
/// Name of the map of redirected connections waiting for the agent's
/// `accept()`: [`PeerKey`] -> [`OriginalDst`]. Written by `sock_ops`, taken
/// (looked up and deleted at once) by the agent.
pub const ORIG_BY_PEER: &str = "ORIG_BY_PEER";
/// Name of the one-slot array holding [`Settings`], written by the agent.
pub const SETTINGS: &str = "SETTINGS";
/// Name of the per-CPU array of `u64` counters indexed by [`Stat`], written
/// by the programs, summed by the agent.
pub const STATS: &str = "STATS";
/// Name of the map of kernel-balanced backends: [`BackendKey`] ->
/// [`Backend`]. Written by the agent (one table per service and
/// generation), read by `connect4`/`connect6` for kernel-mode services and
/// for fail-open services while the agent is down. A backend has the
/// family of its service's virtual address (config validation).
pub const BACKENDS: &str = "BACKENDS";
/// Name of the per-CPU array of rotation cursors, indexed by service id
/// modulo [`MAX_SERVICES`]. Only the programs touch it.
pub const CURSORS: &str = "CURSORS";
/// Name of the map of sockets whose connect the kernel balanced: socket
/// cookie (`u64`) -> [`KernelConn`]. Written by `connect4`/`connect6`, read
/// by `getpeername4`/`getpeername6` and `sock_ops`, removed by `sock_ops`
/// when the socket closes.
pub const KERNEL_CONNS: &str = "KERNEL_CONNS";
/// Name of the map of the virtual addresses that sockets redirected to the
/// agent dialled: socket cookie (`u64`) -> [`ServiceKey`]. Written by
/// `connect4`/`connect6`, read by `getpeername4`/`getpeername6` (so a
/// workload sees the address it dialled, not the agent's listener),
/// removed by `sock_ops` when the socket closes (LRU besides).
pub const DIALLED: &str = "DIALLED";
/// Name of the ring buffer of [`KernelEvent`]s: outcomes of kernel-balanced
/// connects, for outlier detection and metrics.
pub const KERNEL_EVENTS: &str = "KERNEL_EVENTS";
/// Name of the SOCKHASH of loopback sockets whose bytes may skip the TCP
/// stack: [`SockKey`] -> socket. `sock_ops` adds a workload's redirected
/// socket, the agent adds the socket it accepted for it; the kernel drops
/// entries when sockets close.
pub const SOCKETS: &str = "SOCKETS";
/// Name of the map of sockets that decided, at their first message, whether
/// their bytes to the agent skip the TCP stack: [`SockKey`] -> 1 (bypass)
/// or 0 (TCP for the connection's whole life, so bytes stay in order).
pub const BYPASS: &str = "BYPASS";
/// Name of the one-slot array holding the layout version of the pinned
/// objects ([`LAYOUT_VERSION`]), written by the agent that created them.
pub const LAYOUT: &str = "LAYOUT";

/// Name of the set of cgroups the agent's own processes run in: cgroup id
/// (`u64`) -> 1. Written by each agent for itself at start and again every
/// few seconds (an upgrade has two for a moment), read by the connect
/// hooks: a socket carrying the agent's mark is let through only when it is
/// opened from one of these cgroups, so a workload that sets the mark
/// itself is redirected like any other.
pub const AGENT_CGROUPS: &str = "AGENT_CGROUPS";
/// Name of the one-slot array of [`AgentLife`]: which agent process serves
/// the node now, and whether it has been killed. Written by the agent when
/// it starts serving; `killed` set by the tracepoint programs.
pub const AGENT_LIFE: &str = "AGENT_LIFE";
/// Name of the map of captured inbound destinations: [`CaptureKey`] ->
/// [`CaptureValue`]. Written by the agent from its catalog (one entry per
/// meshed workload address), read by `sluice_capture` (sk_lookup).
pub const CAPTURE: &str = "CAPTURE";
/// Name of the SOCKMAP of the agent's capture listeners, two per network
/// namespace that holds a captured workload: the IPv4 one at
/// [`CaptureValue::listener`], the IPv6 one (`[::1]`, same port) at
/// [`capture_slot_v6`] of it (the kernel lets an IPv6 connect be steered to
/// an IPv6 socket only). Written by the agent; the kernel drops an
/// entry when its socket closes, which is how the program knows the agent
/// is gone.
pub const CAPTURE_LISTENERS: &str = "CAPTURE_LISTENERS";
/// Every pinned map, for cleanup and for the layout check.
pub const PINNED_MAPS: [&str; 17] = [
    SERVICES,
    ORIG_BY_COOKIE,
    ORIG_BY_PEER,
    SETTINGS,
    STATS,
    BACKENDS,
    CURSORS,
    KERNEL_CONNS,
    KERNEL_EVENTS,
    SOCKETS,
    BYPASS,
    LAYOUT,
    AGENT_CGROUPS,
    CAPTURE,
    CAPTURE_LISTENERS,
    DIALLED,
    AGENT_LIFE,
];

/// Version of the maps' layout. Bump it whenever a map's type, size or the
/// meaning of a field changes: an agent finding pins of another version
/// replaces them instead of reusing them.
pub const LAYOUT_VERSION: u32 = 5;

/// Capacity of [`SERVICES`].
pub const MAX_SERVICES: u32 = 65_536;
/// Slots of one service's backend table (one generation). Weights are
/// scaled down to fit when their reduced sum is larger.
pub const MAX_SLOTS: u32 = 1024;
/// Capacity of [`BACKENDS`], over all services and both generations.
pub const MAX_BACKEND_SLOTS: u32 = 262_144;
/// Capacity of [`KERNEL_CONNS`]: open kernel-balanced connections tracked
/// for getpeername and outcomes (LRU: the oldest are forgotten first).
pub const MAX_KERNEL_CONNS: u32 = 262_144;
/// Capacity of [`DIALLED`]: open redirected connections whose workload
/// may ask for its peer's name (LRU: the oldest are forgotten first).
pub const MAX_DIALLED: u32 = 262_144;
/// Capacity of [`SOCKETS`] (two per bypassed connection) and [`BYPASS`].
pub const MAX_BYPASS_SOCKETS: u32 = 131_072;
/// Size in bytes of [`KERNEL_EVENTS`].
pub const KERNEL_EVENTS_BYTES: u32 = 256 * 1024;

/// Capacity of [`AGENT_CGROUPS`] (an LRU map): agents on one node at once
/// (an upgrade has two), plus entries of agents gone, which age out.
pub const MAX_AGENT_CGROUPS: u32 = 64;
/// Capacity of [`CAPTURE`]: captured workload addresses on one node.
pub const MAX_CAPTURES: u32 = 16_384;
/// Network namespaces with a captured workload on one node (pods, and the
/// node's own): [`CAPTURE_LISTENERS`] holds two slots for each.
pub const MAX_CAPTURE_LISTENERS: u32 = 4096;
/// Capacity of [`CAPTURE_LISTENERS`].
pub const CAPTURE_SLOTS: u32 = 2 * MAX_CAPTURE_LISTENERS;

/// The slot of a namespace's IPv6 capture listener, given its IPv4 one's.
#[inline(always)]
pub const fn capture_slot_v6(listener: u32) -> u32 {
    listener + MAX_CAPTURE_LISTENERS
}
/// Capacity of each record map. A record lives from `connect()` until the
/// agent's `accept()`, so this bounds connections in that window per node.
pub const MAX_PENDING_RECORDS: u32 = 65_536;

/// Builds the key form of an IPv4 address given in network byte order, as
/// the kernel hands it over (`user_ip4`, `local_ip4`).
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    // `0000:ffff` in the third word, in network byte order on either endianness.
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_be]
}

/// Whether a key-form address is an IPv4 one (v4-mapped).
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// Key of [`SERVICES`]: the virtual address a workload dials.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

/// Value of [`SERVICES`]. The agent replaces a value in one map update, so
/// a program reads either the old or the new one, never a mix: that is
/// what makes a backend table switch atomic.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// The agent's number for the service, stable while the agent runs.
    pub id: u32,
    /// Bit set of [`SERVICE_KERNEL`] and [`SERVICE_FAIL_OPEN`].
    pub flags: u32,
    /// Filled slots of the backend table in generation [`Self::generation`];
    /// 0: no table (kernel mode then refuses the connect).
    pub slots: u32,
    /// Which of the two tables in [`BACKENDS`] is live (0 or 1). The agent
    /// writes the other one, then flips this.
    pub generation: u32,
}

/// [`ServiceValue::flags`] bit: the kernel balances this service itself
/// (`mode: kernel`); the agent is not in the path.
pub const SERVICE_KERNEL: u32 = 1;
/// [`ServiceValue::flags`] bit: when the agent's outbound listener is gone,
/// connect straight to a backend of the table (or, with no table, to the
/// original destination) instead of failing.
pub const SERVICE_FAIL_OPEN: u32 = 2;

/// Key of [`BACKENDS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub service: ServiceKey,
    /// `generation << 31 | index`, index below [`MAX_SLOTS`].
    pub slot: u32,
}

impl BackendKey {
    #[inline(always)]
    pub const fn new(service: ServiceKey, generation: u32, index: u32) -> BackendKey {
        BackendKey {
            service,
            slot: (generation << 31) | index,
        }
    }
}

/// Value of [`BACKENDS`]: where one slot sends the connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

/// Value of [`KERNEL_CONNS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelConn {
    /// The virtual address the application dialled (getpeername shows it).
    pub service: ServiceKey,
    /// The backend the kernel chose.
    pub backend: Backend,
    /// cgroup v2 id of the calling task: the source workload.
    pub cgroup_id: u64,
    /// Its ancestors below the hooked cgroup; see [`OriginalDst::ancestors`].
    pub ancestors: [u64; CALLER_LEVELS],
}

/// One entry of [`KERNEL_EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEvent {
    pub conn: KernelConn,
    /// One of the `EVENT_*` constants.
    pub kind: u32,
    /// Smoothed RTT in microseconds when the event is
    /// [`EVENT_ESTABLISHED`]; retransmission count for [`EVENT_RTO`].
    pub value: u32,
}

/// The connect completed.
pub const EVENT_ESTABLISHED: u32 = 1;
/// The connect failed (refused, reset or timed out in SYN_SENT).
pub const EVENT_CONNECT_FAILED: u32 = 2;
/// A retransmission timeout fired on an established connection.
pub const EVENT_RTO: u32 = 3;
/// A process outside the agent's cgroups connected with the agent's mark
/// (a bypass attempt, redirected like any other connect); the event's
/// `conn.service` is the address it dialled, `conn.cgroup_id` its cgroup.
pub const EVENT_MARK_SPOOFED: u32 = 4;

/// What `connect4`/`connect6` record about a redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    /// The address the workload dialled.
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: [u8; 6],
    /// cgroup v2 id of the calling task: how the agent knows the workload.
    pub cgroup_id: u64,
    /// The calling task's ancestor cgroups at the levels just below the
    /// hooked cgroup ([`Settings::cgroup_root_level`] + 1, + 2, ...; 0 past
    /// the task's own level). A pod's processes live in container cgroups
    /// below the pod's (the kubelet's layout), so the pod is one of these.
    pub ancestors: [u64; CALLER_LEVELS],
    /// `bpf_ktime_get_ns()` at connect: lets the agent sweep stale records.
    pub created_ns: u64,
}

/// Key of [`ORIG_BY_PEER`]: the client's end of the connection as the
/// agent's `accept()` sees it, plus the network namespace it lives in (two
/// pods may use the same loopback address and port at the same moment).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// `bpf_get_netns_cookie()`; the agent reads `SO_NETNS_COOKIE`.
    pub netns_cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Key of [`CAPTURE`]: a local destination of inbound connections. A pod is
/// captured whole as `(pod address, port 0)`; a workload in the node's own
/// network namespace by `(0.0.0.0, port)`, so that every address of the
/// node is covered. The program tries the exact key, then port 0, then
/// address 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CaptureKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

/// Value of [`CAPTURE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CaptureValue {
    /// Index of the IPv4 capture listener in [`CAPTURE_LISTENERS`], below
    /// [`MAX_CAPTURE_LISTENERS`]; the IPv6 one is at [`capture_slot_v6`].
    pub listener: u32,
    /// Bit set of [`CAPTURE_STRICT`].
    pub flags: u32,
}

/// [`CaptureValue::flags`] bit: the workload takes mutual TLS only. With no
/// capture listener (agent down) its inbound connects are refused rather
/// than passed to the workload in plaintext.
pub const CAPTURE_STRICT: u32 = 1;

/// Ancestor levels recorded for a caller below the hooked cgroup: enough
/// for the kubelet's deepest pod (`kubepods/<qos>/pod<uid>`, a container
/// below it) with room for a parent cgroup above `kubepods`.
pub const CALLER_LEVELS: usize = 4;

/// Runtime settings of the programs, slot 0 of [`SETTINGS`]. The outbound
/// listener is IPv4; `connect6` sends a socket dialling an IPv6 address to
/// the agent's IPv6 twin of it (`[::1]`, same port) where the agent listens
/// there, and otherwise (and for v4-mapped destinations) to its v4-mapped
/// form (`::ffff:127.0.0.1`).
/// A zero `listener_port` means "not configured": the programs pass
/// everything through untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// The agent's outbound listener, IPv4 in network byte order.
    pub listener_ip4: u32,
    pub listener_port: u16,
    pub _pad: u16,
    /// SO_MARK carried by the agent's own sockets; never redirected.
    pub agent_mark: u32,
    /// Bit set of [`SETTINGS_LOG`] and future switches.
    pub flags: u32,
    /// Level of the hooked cgroup (`node.cgroup_root`) in the cgroup v2
    /// hierarchy: the root is 0, `kubepods.slice` 1.
    pub cgroup_root_level: u32,
}

/// The agent process that serves the node ([`AGENT_LIFE`]).
///
/// Between a SIGKILL and the moment the kernel has closed the killed
/// process's sockets (a few to a hundred milliseconds), its outbound
/// listener still exists: a connect sent there would be reset. The
/// tracepoint programs set `killed` the moment a SIGKILL is generated for
/// `tgid` (or its main thread exits), and the connect hook then treats the
/// agent as down.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentLife {
    /// Thread group id (the process id) of the serving agent; 0: none yet.
    pub tgid: u32,
    /// 1 once that process has been killed or is exiting.
    pub killed: u32,
}

/// Offsets in the `signal/signal_generate` tracepoint's record that the
/// programs read (see its `format` file in tracefs): the signal, and the
/// target task's pid. The agent checks them against the running kernel's
/// before it attaches.
pub const SIGNAL_GENERATE_SIG_OFFSET: usize = 8;
pub const SIGNAL_GENERATE_PID_OFFSET: usize = 36;

/// [`Settings::flags`] bit: emit aya-log events from the programs.
pub const SETTINGS_LOG: u32 = 1;
/// [`Settings::flags`] bit: put redirected sockets into [`SOCKETS`] so that
/// bytes between a workload and the agent skip the loopback TCP stack.
pub const SETTINGS_SOCKMAP: u32 = 2;

/// Key of [`SOCKETS`] and [`BYPASS`]: one end of a loopback connection as
/// seen from its own socket, addresses in key form (a socket that runs
/// IPv4, an IPv6 one sent to a v4-mapped address included, by its IPv4
/// addresses, v4-mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns_cookie: u64,
    pub local: [u32; 4],
    pub remote: [u32; 4],
    /// Ports in host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}

impl SockKey {
    /// The key of the socket at the other end of the same connection.
    #[inline(always)]
    pub const fn peer(&self) -> SockKey {
        SockKey {
            netns_cookie: self.netns_cookie,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Index into [`STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A connect hook rewrote a connect to the agent.
    Redirected = 0,
    /// A connect hook saw a destination that is not a meshed service.
    NotMeshed = 1,
    /// A connect hook skipped a socket carrying the agent's mark.
    AgentSocket = 2,
    /// A connect hook could not store the record and refused the
    /// connect.
    RecordFailed = 3,
    /// sock_ops moved a record from cookie to peer key.
    Established = 4,
    /// A connect hook balanced a connect in the kernel (kernel mode).
    KernelBalanced = 5,
    /// A connect hook refused a kernel-mode connect: no backend in the
    /// table.
    KernelNoBackend = 6,
    /// The agent was down and a fail-open service's connect went around it.
    FailOpen = 7,
    /// A kernel-balanced connect failed (seen by sock_ops).
    KernelConnectFailed = 8,
    /// An event could not be queued for the agent (ring buffer full).
    EventLost = 9,
    /// sock_ops put a workload's redirected socket into SOCKETS.
    BypassSocket = 10,
    /// sk_msg moved a message straight into the peer socket.
    BypassMessage = 11,
    /// A connect hook saw the agent's mark on a socket of a process outside
    /// the agent's cgroups, and redirected it like any other.
    MarkSpoofed = 12,
    /// sk_lookup steered an inbound connect to the agent's capture listener.
    Captured = 13,
    /// sk_lookup refused an inbound connect to a strict workload: no
    /// capture listener (the agent is down or stopping).
    CaptureRefused = 14,
    /// sk_lookup let an inbound connect reach a permissive workload
    /// directly: no capture listener.
    CapturePassed = 15,
}

/// Number of [`Stat`] slots.
pub const STAT_COUNT: u32 = 16;

impl Stat {
    /// Every counter, in index order.
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::Redirected,
        Stat::NotMeshed,
        Stat::AgentSocket,
        Stat::RecordFailed,
        Stat::Established,
        Stat::KernelBalanced,
        Stat::KernelNoBackend,
        Stat::FailOpen,
        Stat::KernelConnectFailed,
        Stat::EventLost,
        Stat::BypassSocket,
        Stat::BypassMessage,
        Stat::MarkSpoofed,
        Stat::Captured,
        Stat::CaptureRefused,
        Stat::CapturePassed,
    ];

    /// Stable name for display and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Redirected => "redirected",
            Stat::NotMeshed => "not_meshed",
            Stat::AgentSocket => "agent_socket",
            Stat::RecordFailed => "record_failed",
            Stat::Established => "established",
            Stat::KernelBalanced => "kernel_balanced",
            Stat::KernelNoBackend => "kernel_no_backend",
            Stat::FailOpen => "fail_open",
            Stat::KernelConnectFailed => "kernel_connect_failed",
            Stat::EventLost => "event_lost",
            Stat::BypassSocket => "bypass_socket",
            Stat::BypassMessage => "bypass_message",
            Stat::MarkSpoofed => "mark_spoofed",
            Stat::Captured => "captured",
            Stat::CaptureRefused => "capture_refused",
            Stat::CapturePassed => "capture_passed",
        }
    }
}

/// Address keys as the agent writes and reads them.
#[cfg(feature = "user")]
mod addr {
    use core::net::{IpAddr, Ipv6Addr, SocketAddr};

    /// Converts an address to the maps' one address form (IPv4 as v4-mapped
    /// IPv6, in the byte order the programs compare).
    pub fn key_addr(ip: IpAddr) -> [u32; 4] {
        let v6 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let o = v6.octets();
        core::array::from_fn(|i| {
            u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
        })
    }

    /// Converts the map's address form back to an address (v4-mapped -> v4).
    pub fn addr_from_key(addr: [u32; 4], port: u16) -> SocketAddr {
        let mut octets = [0u8; 16];
        for (i, word) in addr.iter().enumerate() {
            octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
        }
        let v6 = Ipv6Addr::from(octets);
        let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
        SocketAddr::new(ip, port)
    }
}
#[cfg(feature = "user")]
pub use addr::{addr_from_key, key_addr};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and every byte is a named field.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for OriginalDst {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for KernelConn {}
    unsafe impl aya::Pod for KernelEvent {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for AgentLife {}
    unsafe impl aya::Pod for CaptureKey {}
    unsafe impl aya::Pod for CaptureValue {}
}
