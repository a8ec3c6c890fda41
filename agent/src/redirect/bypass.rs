//! The sockmap bypass seen from the agent: the `sk_msg` program is attached
//! to the SOCKETS map once, and each socket the agent accepts for a
//! redirected connection is added to the map right after `accept()`,
//! before the agent writes anything to it.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::Arc,
};

use aya::{
    Ebpf,
    maps::{MapData, SockHash},
    programs::SkMsg,
};
use sluice_maps::SockKey;

use sluice_maps::key_addr;

use super::ErrorChain;

/// BPF_MAP_UPDATE_ELEM from linux/bpf.h (aya's `insert` wants `&mut`).
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;

/// A handle on SOCKETS for the accept path; cheap to clone.
#[derive(Clone)]
pub struct Bypass {
    map: Arc<OwnedFd>,
}

impl Bypass {
    /// Loads the `sk_msg` program and attaches it to SOCKETS. The
    /// attachment belongs to the map: it lives as long as the pinned map
    /// does, through agent restarts, and goes with it.
    pub(super) fn load(ebpf: &mut Ebpf, program: &str) -> Result<Bypass, String> {
        let map = ebpf
            .map(sluice_maps::SOCKETS)
            .ok_or_else(|| format!("the eBPF object has no map {}", sluice_maps::SOCKETS))?;
        let map: SockHash<&MapData, SockKey> =
            SockHash::try_from(map).map_err(|e| ErrorChain::of(&e).to_string())?;
        let map_fd = map
            .fd()
            .try_clone()
            .map_err(|e| format!("cannot clone the SOCKETS fd: {e}"))?;
        let owned = map
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| format!("cannot clone the SOCKETS fd: {e}"))?;
        let prog: &mut SkMsg = ebpf
            .program_mut(program)
            .ok_or_else(|| format!("the eBPF object has no program {program}"))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| ErrorChain::of(&e).to_string())?;
        prog.load()
            .map_err(|e| format!("the kernel refused {program}: {}", ErrorChain::of(&e)))?;
        let id = prog
            .attach(&map_fd)
            .map_err(|e| format!("cannot attach {program}: {}", ErrorChain::of(&e)))?;
        // Keep the attachment when this process ends: it is the map's.
        let link = prog
            .take_link(id)
            .map_err(|e| format!("cannot keep {program} attached: {}", ErrorChain::of(&e)))?;
        std::mem::forget(link);
        Ok(Bypass {
            map: Arc::new(owned),
        })
    }

    /// Adds the agent's end of a redirected connection: the socket
    /// `accepted` on `listener`, talking to `peer` in the namespace with
    /// cookie `netns`.
    pub fn offer(
        &self,
        accepted: &impl AsRawFd,
        listener: SocketAddr,
        peer: SocketAddr,
        netns: u64,
    ) -> io::Result<()> {
        let key = SockKey {
            netns_cookie: netns,
            local: key_addr(listener.ip()),
            remote: key_addr(peer.ip()),
            local_port: listener.port(),
            remote_port: peer.port(),
            _pad: 0,
        };
        let mut fd = accepted.as_raw_fd() as u32;
        // SAFETY: a live key of the map's key type and a u32 socket fd, the
        // SOCKHASH's value.
        unsafe {
            super::records::map_elem(
                BPF_MAP_UPDATE_ELEM,
                self.map.as_raw_fd(),
                (&key as *const SockKey).cast(),
                (&mut fd as *mut u32).cast(),
            )
        }
    }
}
