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
/// Written by the agent from its catalog, read by `connect4`.
pub const SERVICES: &str = "SERVICES";
/// Name of the map of redirected sockets not yet established:
/// socket cookie (`u64`) -> [`OriginalDst`]. Written by `connect4`, moved to
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

/// Capacity of [`SERVICES`].
pub const MAX_SERVICES: u32 = 65_536;
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

/// Key of [`SERVICES`]: the virtual address a workload dials.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

/// Value of [`SERVICES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// The agent's number for the service, stable while the agent runs.
    pub id: u32,
    /// Reserved for per-service modes (kernel fast path, on_agent_down).
    pub flags: u32,
}

/// What `connect4` records about a redirected connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    /// The address the workload dialled.
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: [u8; 6],
    /// cgroup v2 id of the calling task: how the agent knows the workload.
    pub cgroup_id: u64,
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

/// Runtime settings of the programs, slot 0 of [`SETTINGS`].
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
}

/// [`Settings::flags`] bit: emit aya-log events from the programs.
pub const SETTINGS_LOG: u32 = 1;

/// Index into [`STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// connect4 rewrote a connect to the agent.
    Redirected = 0,
    /// connect4 saw a destination that is not a meshed service.
    NotMeshed = 1,
    /// connect4 skipped a socket carrying the agent's mark.
    AgentSocket = 2,
    /// connect4 could not store the record and refused the connect.
    RecordFailed = 3,
    /// sock_ops moved a record from cookie to peer key.
    Established = 4,
}

/// Number of [`Stat`] slots.
pub const STAT_COUNT: u32 = 5;

impl Stat {
    /// Every counter, in index order.
    pub const ALL: [Stat; STAT_COUNT as usize] = [
        Stat::Redirected,
        Stat::NotMeshed,
        Stat::AgentSocket,
        Stat::RecordFailed,
        Stat::Established,
    ];

    /// Stable name for display and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::Redirected => "redirected",
            Stat::NotMeshed => "not_meshed",
            Stat::AgentSocket => "agent_socket",
            Stat::RecordFailed => "record_failed",
            Stat::Established => "established",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and every byte is a named field.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for OriginalDst {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for Settings {}
}
