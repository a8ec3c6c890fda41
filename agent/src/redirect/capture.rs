//! Inbound capture, the kernel side: the `sluice_capture` sk_lookup
//! program attached to each network namespace that holds a captured
//! workload, the CAPTURE map of captured destinations and the SOCKMAP of
//! the agent's capture listeners.
//!
//! Links are pinned as `link_capture_<netns cookie>` so that capture holds
//! while the agent restarts: a strict workload's inbound connects are then
//! refused by the program (its listener is gone from the SOCKMAP), never
//! let through in plaintext.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, SockMap},
    programs::{SkLookup, links::FdLink, links::PinnedLink},
};
use log::warn;
use sluice_maps::{CaptureKey, CaptureValue};

use super::{ErrorChain, RedirectError, map_err, pin_err, replace_old_link, take_map};

/// The sk_lookup program's name in the object.
pub const PROGRAM: &str = "sluice_capture";
const LINK_PREFIX: &str = "link_capture_";

/// The capture maps and the links this agent attached.
pub struct CaptureMaps {
    entries: HashMap<MapData, CaptureKey, CaptureValue>,
    listeners: SockMap<MapData>,
    /// netns cookie -> pinned link.
    links: StdHashMap<u64, PinnedLink>,
    pin_dir: PathBuf,
    /// Whether the kernel took the program (else nothing is attached).
    available: bool,
}

impl CaptureMaps {
    pub(super) fn take(
        ebpf: &mut Ebpf,
        pin_dir: &Path,
        available: bool,
    ) -> Result<CaptureMaps, RedirectError> {
        let entries = HashMap::try_from(take_map(ebpf, sluice_maps::CAPTURE)?)
            .map_err(map_err(sluice_maps::CAPTURE))?;
        let listeners = SockMap::try_from(take_map(ebpf, sluice_maps::CAPTURE_LISTENERS)?)
            .map_err(map_err(sluice_maps::CAPTURE_LISTENERS))?;
        Ok(CaptureMaps {
            entries,
            listeners,
            links: StdHashMap::new(),
            pin_dir: pin_dir.to_owned(),
            available,
        })
    }

    /// Whether inbound capture works on this kernel.
    pub fn available(&self) -> bool {
        self.available
    }

    /// Puts a capture listener at `slot`.
    pub fn set_listener(&mut self, slot: u32, socket: BorrowedFd<'_>) -> Result<(), RedirectError> {
        self.listeners
            .set(slot, &socket.as_raw_fd(), 0)
            .map_err(map_err(sluice_maps::CAPTURE_LISTENERS))
    }

    /// Empties `slot` (its listener closed or moved).
    pub fn clear_listener(&mut self, slot: u32) {
        // Already gone when the socket closed first.
        let _ = self.listeners.clear_index(&slot);
    }

    /// Makes CAPTURE equal to `wanted`.
    pub fn sync(&mut self, wanted: &[(CaptureKey, CaptureValue)]) -> Result<(), RedirectError> {
        let keep: HashSet<CaptureKey> = wanted.iter().map(|(k, _)| *k).collect();
        let stale: Vec<CaptureKey> = self
            .entries
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for (key, value) in wanted {
            if self.entries.get(key, 0).ok().as_ref() != Some(value) {
                self.entries
                    .insert(key, value, 0)
                    .map_err(map_err(sluice_maps::CAPTURE))?;
            }
        }
        for key in stale {
            let _ = self.entries.remove(&key);
        }
        Ok(())
    }

    /// Attaches the capture program to the network namespace `netns`
    /// (cookie `cookie`) and pins the link, replacing a link a previous
    /// agent pinned for the same namespace after this one is attached.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        cookie: u64,
        netns: BorrowedFd<'_>,
    ) -> Result<(), RedirectError> {
        if self.links.contains_key(&cookie) {
            return Ok(());
        }
        let attach_err = |e: &(dyn std::error::Error + 'static)| RedirectError::Attach {
            program: PROGRAM,
            cgroup: PathBuf::from(format!("network namespace {cookie}")),
            error: ErrorChain::of(e),
        };
        let program: &mut SkLookup = ebpf
            .program_mut(PROGRAM)
            .ok_or(RedirectError::MissingMap(PROGRAM))?
            .try_into()
            .map_err(|e| attach_err(&e))?;
        let id = program.attach(netns.as_fd()).map_err(|e| attach_err(&e))?;
        let link: FdLink = program.take_link(id).map_err(|e| attach_err(&e))?.into();
        let pin_path = self.link_path(cookie);
        if pin_path.exists() {
            replace_old_link(&pin_path);
        }
        let pinned = link
            .pin(&pin_path)
            .map_err(|e| pin_err("link", pin_path.clone(), e))?;
        self.links.insert(cookie, pinned);
        Ok(())
    }

    /// Detaches capture from every namespace not in `keep`, including
    /// links pinned by an earlier agent for namespaces that are gone.
    pub fn detach_others(&mut self, keep: &HashSet<u64>) {
        let gone: Vec<u64> = self
            .links
            .keys()
            .filter(|c| !keep.contains(c))
            .copied()
            .collect();
        for cookie in gone {
            if let Some(link) = self.links.remove(&cookie) {
                unpin(link, &self.pin_dir);
            }
        }
        for (cookie, path) in pinned_links(&self.pin_dir) {
            if !keep.contains(&cookie) && !self.links.contains_key(&cookie) {
                replace_old_link(&path);
            }
        }
    }

    /// Detaches every capture link and removes the pins.
    pub fn detach_all(self) {
        let CaptureMaps { links, pin_dir, .. } = self;
        for link in links.into_values() {
            unpin(link, &pin_dir);
        }
        for (_, path) in pinned_links(&pin_dir) {
            replace_old_link(&path);
        }
    }

    fn link_path(&self, cookie: u64) -> PathBuf {
        self.pin_dir.join(format!("{LINK_PREFIX}{cookie}"))
    }
}

fn unpin(link: PinnedLink, pin_dir: &Path) {
    match link.unpin() {
        // Dropping the last reference detaches it.
        Ok(fd_link) => drop(fd_link),
        Err(e) => warn!("cannot unpin a capture link in {}: {e}", pin_dir.display()),
    }
}

/// Capture links pinned in `pin_dir`, by namespace cookie.
fn pinned_links(pin_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let cookie = name.to_str()?.strip_prefix(LINK_PREFIX)?.parse().ok()?;
            Some((cookie, e.path()))
        })
        .collect()
}
