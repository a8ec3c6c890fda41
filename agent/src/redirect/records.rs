//! The redirect records the hooks leave for the agent: taking one per
//! accepted connection, counting and sweeping them.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use sluice_maps::{OriginalDst, PeerKey, addr_from_key, key_addr};

/// BPF_MAP_LOOKUP_AND_DELETE_ELEM from linux/bpf.h; aya does not expose it
/// for hash maps.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The `map_elem` variant of `union bpf_attr`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// One `BPF_MAP_*_ELEM` command on `map`, as a raw syscall: one call, no
/// lock and no allocation, for the commands the accept path needs in a form
/// aya does not offer.
///
/// # Safety
/// `key` and `value` must point at live buffers of the map's key and value
/// sizes.
pub(super) unsafe fn map_elem(
    cmd: libc::c_long,
    map: i32,
    key: *const u8,
    value: *mut u8,
) -> io::Result<()> {
    let attr = MapElemAttr {
        map_fd: map as u32,
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags: 0,
    };
    // SAFETY: attr is a valid bpf_attr prefix; the caller vouches for the
    // buffers it points at.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const MapElemAttr,
            size_of::<MapElemAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Looks `key` up and deletes it in one syscall, so two agents (an old and
/// a new one during a restart) can never both take the same record.
fn lookup_and_delete<K, V: Copy>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::uninit();
    // SAFETY: a live key and a value buffer of the map's value size (the
    // caller's types come from the shared map contract).
    let rc = unsafe {
        map_elem(
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            map.as_raw_fd(),
            (key as *const K).cast(),
            value.as_mut_ptr().cast(),
        )
    };
    match rc {
        // SAFETY: the kernel filled the value on success.
        Ok(()) => Ok(Some(unsafe { value.assume_init() })),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(err) => Err(err),
    }
}

/// The key under which `sock_ops` filed the record of a connection whose
/// client end is `peer`, in the network namespace `netns_cookie`.
pub fn peer_key(netns_cookie: u64, peer: SocketAddr) -> PeerKey {
    PeerKey {
        netns_cookie,
        addr: key_addr(peer.ip()),
        port: peer.port(),
        _pad: [0; 6],
    }
}

/// A redirected connection's record, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirected {
    /// What the workload dialled.
    pub original_dst: SocketAddr,
    /// cgroup v2 id of the calling process.
    pub cgroup_id: u64,
    /// Its ancestors just below the hooked cgroup (a pod's, for a process
    /// in one of the pod's containers).
    pub ancestors: [u64; sluice_maps::CALLER_LEVELS],
}

impl From<OriginalDst> for Redirected {
    fn from(r: OriginalDst) -> Self {
        Redirected {
            original_dst: addr_from_key(r.addr, r.port),
            cgroup_id: r.cgroup_id,
            ancestors: r.ancestors,
        }
    }
}

/// Records keyed by peer, read by the accept path. Shared by all listeners;
/// taking a record needs only the map's fd, no lock.
pub struct PeerRecords {
    map: Map,
}

impl PeerRecords {
    /// Wraps the `ORIG_BY_PEER` map; `None` if it is not a hash map.
    pub fn new(map: Map) -> Option<Self> {
        match map {
            Map::LruHashMap(_) | Map::HashMap(_) => Some(PeerRecords { map }),
            _ => None,
        }
    }

    /// Takes (reads and deletes) the record of the connection from `peer`.
    pub fn take(&self, netns_cookie: u64, peer: SocketAddr) -> io::Result<Option<Redirected>> {
        let key = peer_key(netns_cookie, peer);
        Ok(
            lookup_and_delete::<PeerKey, OriginalDst>(map_data(&self.map).fd().as_fd(), &key)?
                .map(Into::into),
        )
    }

    /// The underlying map, for counting and sweeping.
    pub fn map(&self) -> &Map {
        &self.map
    }
}

fn map_data(map: &Map) -> &MapData {
    match map {
        Map::LruHashMap(d) | Map::HashMap(d) => d,
        // PeerRecords::new and the callers of count/sweep only pass the
        // record maps, which the contract crate defines as LRU hashes.
        other => unreachable!("record map has unexpected type {other:?}"),
    }
}

/// Number of records in a record map (either kind).
pub fn count<K: aya::Pod>(map: &Map) -> usize {
    match HashMap::<&MapData, K, OriginalDst>::try_from(map) {
        Ok(m) => m.keys().filter(Result::is_ok).count(),
        Err(_) => 0,
    }
}

/// `CLOCK_MONOTONIC` now, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Deletes records older than `max_age`: connects that were refused or
/// never accepted. Returns how many it removed.
pub fn sweep<K: aya::Pod + Copy>(map: &Map, max_age: Duration) -> usize {
    let Ok(m) = HashMap::<&MapData, K, OriginalDst>::try_from(map) else {
        return 0;
    };
    let cutoff = monotonic_ns().saturating_sub(max_age.as_nanos() as u64);
    let stale: Vec<K> = m
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| v.created_ns < cutoff)
        .map(|(k, _)| k)
        .collect();
    stale
        .iter()
        .filter(|k| {
            matches!(
                lookup_and_delete::<K, OriginalDst>(map_data(map).fd().as_fd(), *k),
                Ok(Some(_))
            )
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_form_round_trips_and_matches_the_kernel_side() {
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let key = peer_key(7, peer);
        // What connect4/sock_ops build from the kernel's network-order u32.
        let kernel = sluice_maps::v4_mapped(u32::from_ne_bytes([127, 0, 0, 1]));
        assert_eq!(key.addr, kernel);
        assert_eq!(addr_from_key(key.addr, 40000), peer);
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(addr_from_key(key_addr(v6.ip()), 80), v6);
    }
}
