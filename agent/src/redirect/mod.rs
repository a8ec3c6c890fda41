//! The kernel side, seen from the agent: load the programs, attach them to
//! the workload cgroup, pin maps and links, keep the maps in sync.
//!
//! Pins live under `agent.pin_dir`:
//! - one file per map (SERVICES, ORIG_BY_COOKIE, ...), reused by the next
//!   agent, so records written while the agent restarts are not lost;
//! - `link_connect4`, `link_connect6`, `link_sluice_sockops`,
//!   `link_getpeername4`, `link_getpeername6`: the attachments. They outlive a
//!   crashed agent (meshed traffic then fails closed: nothing listens on the
//!   outbound port; other traffic is untouched). A new agent attaches its own
//!   programs first and only then detaches the ones it finds pinned, so
//!   there is no moment without a hook. A graceful stop ([`Redirect::detach`])
//!   removes every pin.
//! - `LAYOUT` holds the version of the maps' layout; an agent that finds
//!   another version unpins the old maps and links (holding the links, so
//!   the old programs stay attached), loads fresh maps, and drops the old
//!   links once its own programs are attached.

pub mod bypass;
pub mod capture;
pub mod cgroup;
pub mod entries;
mod error;
pub mod liveness;
mod pinned;
pub mod preflight;
pub mod records;
pub mod tables;

use std::{
    fs::File,
    net::SocketAddrV4,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use log::{info, warn};
use sluice_maps::{
    LAYOUT_VERSION, SERVICE_KERNEL, SETTINGS_LOG, SETTINGS_SOCKMAP, ServiceKey, Settings,
};

pub use entries::KernelEntry;
pub use error::{ErrorChain, RedirectError};
use error::{map_err, pin_err};
pub use pinned::{ProgramStats, RecordMaps, pinned_record_counts, remove_pins, set_pinned_log};
use pinned::{replace_old_link, retire_incompatible_pins};
pub use records::{PeerRecords, Redirected};

/// The compiled eBPF object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf"));

/// The programs and where they attach, in attach order. Each IPv4 hook has
/// its IPv6 twin with the same decisions, attached to the same cgroup.
const PROGRAMS: [&str; 5] = [
    "connect4",
    "connect6",
    "sluice_sockops",
    "getpeername4",
    "getpeername6",
];
/// The programs only the kernel fast path needs: without them, kernel-mode
/// services fall back to the proxy (and a workload sees the agent's
/// listener as its peer).
const KERNEL_MODE_PROGRAMS: [&str; 2] = ["getpeername4", "getpeername6"];
/// The sockmap bypass's program; attached to the SOCKETS map, not to a
/// cgroup.
const BYPASS_PROGRAM: &str = "sluice_sk_msg";

/// What the programs need to know, written to the SETTINGS map.
#[derive(Debug, Clone, Copy)]
pub struct ProgramSettings {
    pub outbound: SocketAddrV4,
    pub agent_mark: u32,
    pub log: bool,
    /// Put redirected sockets into SOCKETS (the sockmap bypass).
    pub sockmap: bool,
    /// Level of the hooked cgroup in the hierarchy (the root is 0).
    pub cgroup_root_level: u32,
}

impl From<ProgramSettings> for Settings {
    fn from(s: ProgramSettings) -> Self {
        Settings {
            listener_ip4: u32::from_ne_bytes(s.outbound.ip().octets()),
            listener_port: s.outbound.port(),
            _pad: 0,
            agent_mark: s.agent_mark,
            flags: if s.log { SETTINGS_LOG } else { 0 }
                | if s.sockmap { SETTINGS_SOCKMAP } else { 0 },
            cgroup_root_level: s.cgroup_root_level,
        }
    }
}

/// The loaded programs and their maps. Dropping it leaves the pinned links
/// attached (crash-like); call [`Redirect::detach`] for a clean stop.
pub struct Redirect {
    pin_dir: PathBuf,
    ebpf: Ebpf,
    links: Vec<PinnedLink>,
    tables: tables::Tables,
    settings: Array<MapData, Settings>,
    /// Whether `mode: kernel` can be served by the kernel on this node.
    kernel_mode: bool,
    /// The sockmap bypass, when the kernel took its program.
    bypass: Option<bypass::Bypass>,
    /// Links of an incompatible older layout, taken out of the pin
    /// directory at load; dropped (detached) once this agent's programs are
    /// attached, so that there is no moment without a hook.
    retired: Vec<FdLink>,
    /// The cgroups whose marked sockets the connect hook lets through.
    agent_cgroups: HashMap<MapData, u64, u32>,
    capture: capture::CaptureMaps,
    liveness: liveness::Liveness,
}

impl Redirect {
    /// Loads the programs and maps, reusing maps pinned in `pin_dir`.
    /// Nothing is attached yet.
    pub fn load(pin_dir: &Path) -> Result<Redirect, RedirectError> {
        let retired = retire_incompatible_pins(pin_dir);
        let fresh = !pin_dir.exists();
        let loaded = Self::load_inner(pin_dir, retired);
        if loaded.is_err() && fresh {
            // Nothing of ours may stay behind when we could not start.
            remove_pins(pin_dir);
        }
        loaded
    }

    fn load_inner(pin_dir: &Path, retired: Vec<FdLink>) -> Result<Redirect, RedirectError> {
        std::fs::create_dir_all(pin_dir).map_err(|error| RedirectError::PinDir {
            path: pin_dir.to_owned(),
            error,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .map_err(|e| RedirectError::Load(ErrorChain::of(&e)))?;
        let mut kernel_mode = true;
        for name in PROGRAMS {
            let program = ebpf
                .program_mut(name)
                .ok_or(RedirectError::MissingMap(name))?;
            let loaded = match program {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                _ => return Err(RedirectError::MissingMap(name)),
            };
            match loaded {
                Ok(()) => {}
                Err(e) if KERNEL_MODE_PROGRAMS.contains(&name) => {
                    warn!(
                        "the kernel fast path is unavailable: the kernel refused {name} ({}); \
                         services with mode: kernel are served by the proxy",
                        ErrorChain::of(&e)
                    );
                    kernel_mode = false;
                }
                Err(e) => {
                    return Err(RedirectError::Program {
                        program: name,
                        error: ErrorChain::of(&e),
                    });
                }
            }
        }
        let mut layout: Array<MapData, u32> =
            Array::try_from(take_map(&mut ebpf, sluice_maps::LAYOUT)?)
                .map_err(map_err(sluice_maps::LAYOUT))?;
        layout
            .set(0, LAYOUT_VERSION, 0)
            .map_err(map_err(sluice_maps::LAYOUT))?;
        let services = take_map(&mut ebpf, sluice_maps::SERVICES)?;
        let services = HashMap::try_from(services).map_err(map_err(sluice_maps::SERVICES))?;
        let backends = take_map(&mut ebpf, sluice_maps::BACKENDS)?;
        let backends = HashMap::try_from(backends).map_err(map_err(sluice_maps::BACKENDS))?;
        let settings = take_map(&mut ebpf, sluice_maps::SETTINGS)?;
        let settings = Array::try_from(settings).map_err(map_err(sluice_maps::SETTINGS))?;
        let capture_available = match ebpf.program_mut(capture::PROGRAM) {
            Some(aya::programs::Program::SkLookup(p)) => match p.load() {
                Ok(()) => true,
                Err(e) => {
                    warn!(
                        "inbound capture is unavailable: the kernel refused {} ({})",
                        capture::PROGRAM,
                        ErrorChain::of(&e)
                    );
                    false
                }
            },
            _ => false,
        };
        let capture = capture::CaptureMaps::take(&mut ebpf, pin_dir, capture_available)?;
        let agent_cgroups = HashMap::try_from(take_map(&mut ebpf, sluice_maps::AGENT_CGROUPS)?)
            .map_err(map_err(sluice_maps::AGENT_CGROUPS))?;
        let liveness = liveness::Liveness::attach(&mut ebpf, pin_dir)?;
        let bypass = match bypass::Bypass::load(&mut ebpf, BYPASS_PROGRAM) {
            Ok(b) => Some(b),
            Err(e) => {
                warn!("the sockmap bypass is unavailable: {e}");
                None
            }
        };
        Ok(Redirect {
            pin_dir: pin_dir.to_owned(),
            ebpf,
            links: Vec::new(),
            tables: tables::Tables::new(services, backends),
            settings,
            kernel_mode,
            bypass,
            retired,
            agent_cgroups,
            capture,
            liveness,
        })
    }

    /// Makes this process the agent the connect hook serves through, from
    /// now on: the kill window is watched for it.
    pub fn serve_as_this_process(&mut self) -> Result<(), RedirectError> {
        self.liveness.serve_as(std::process::id())
    }

    /// Lets the marked sockets of processes in cgroup `id` (this agent's)
    /// through the connect hook.
    pub fn register_agent(&mut self, id: u64) -> Result<(), RedirectError> {
        self.agent_cgroups
            .insert(id, 1, 0)
            .map_err(map_err(sluice_maps::AGENT_CGROUPS))
    }

    /// Forgets cgroup `id` as an agent's (its agent has gone).
    pub fn unregister_agent(&mut self, id: u64) {
        let _ = self.agent_cgroups.remove(&id);
    }

    /// The capture maps.
    pub fn capture(&mut self) -> &mut capture::CaptureMaps {
        &mut self.capture
    }

    /// Attaches inbound capture to the network namespace `netns`.
    pub fn attach_capture(
        &mut self,
        cookie: u64,
        netns: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), RedirectError> {
        self.capture.attach(&mut self.ebpf, cookie, netns)
    }

    /// The sockmap bypass, for the accept path; `None` when the kernel
    /// refused it.
    pub fn bypass(&self) -> Option<bypass::Bypass> {
        self.bypass.clone()
    }

    /// Whether kernel-mode services are balanced by the kernel here.
    pub fn kernel_mode(&self) -> bool {
        self.kernel_mode
    }

    /// Takes the ring buffer of kernel-balanced connect outcomes.
    pub fn take_kernel_events(&mut self) -> Result<aya::maps::RingBuf<MapData>, RedirectError> {
        let map = take_map(&mut self.ebpf, sluice_maps::KERNEL_EVENTS)?;
        aya::maps::RingBuf::try_from(map).map_err(map_err(sluice_maps::KERNEL_EVENTS))
    }

    /// Hands the aya-log ring buffer to a reader; `None` if the object has
    /// no log map.
    pub fn take_logger<L: log::Log>(&mut self, logger: L) -> Option<aya_log::EbpfLogger<L>> {
        match aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger) {
            Ok(logger) => Some(logger),
            Err(e) => {
                warn!("eBPF log events are unavailable: {e}");
                None
            }
        }
    }

    /// Takes the map of records keyed by peer, for the accept path.
    pub fn take_peer_records(&mut self) -> Result<PeerRecords, RedirectError> {
        let map = take_map(&mut self.ebpf, sluice_maps::ORIG_BY_PEER)?;
        PeerRecords::new(map).ok_or_else(|| {
            map_err(sluice_maps::ORIG_BY_PEER)(aya::maps::MapError::InvalidMapType { map_type: 0 })
        })
    }

    /// Takes the map of records keyed by socket cookie, for sweeping.
    pub fn take_cookie_records(&mut self) -> Result<Map, RedirectError> {
        take_map(&mut self.ebpf, sluice_maps::ORIG_BY_COOKIE)
    }

    /// Takes the per-CPU counters.
    pub fn take_stats(&mut self) -> Result<ProgramStats, RedirectError> {
        let map = take_map(&mut self.ebpf, sluice_maps::STATS)?;
        Ok(ProgramStats {
            map: PerCpuArray::try_from(map).map_err(map_err(sluice_maps::STATS))?,
        })
    }

    /// Writes the programs' settings. Until this is called the programs
    /// pass every connection through.
    pub fn configure(&mut self, settings: ProgramSettings) -> Result<(), RedirectError> {
        self.settings
            .set(0, Settings::from(settings), 0)
            .map_err(map_err(sluice_maps::SETTINGS))
    }

    /// Makes SERVICES and BACKENDS equal to `wanted`; returns how many
    /// backend tables were switched. Without the kernel fast path,
    /// kernel-mode services are left to the proxy.
    pub fn sync_services(&mut self, wanted: &[KernelEntry]) -> Result<usize, RedirectError> {
        self.sync_entries(wanted, true)
    }

    /// Writes `changed` and drops the services at `removed`, leaving every
    /// other entry alone: what a watch event changed, without walking the
    /// whole map.
    pub fn update_services(
        &mut self,
        changed: &[KernelEntry],
        removed: &[ServiceKey],
    ) -> Result<usize, RedirectError> {
        for key in removed {
            self.tables.remove(*key);
        }
        self.sync_entries(changed, false)
    }

    /// Like [`Self::sync_services`] for some services only: the periodic
    /// update of the backend tables as endpoints are ejected and restored.
    pub fn refresh_tables(&mut self, some: &[KernelEntry]) -> Result<usize, RedirectError> {
        self.sync_entries(some, false)
    }

    fn sync_entries(
        &mut self,
        wanted: &[KernelEntry],
        complete: bool,
    ) -> Result<usize, RedirectError> {
        if self.kernel_mode {
            return self.tables.sync(wanted, complete);
        }
        let proxied: Vec<KernelEntry> = wanted
            .iter()
            .map(|e| {
                let mut e = e.clone();
                if e.flags & SERVICE_KERNEL != 0 {
                    e.flags &= !SERVICE_KERNEL;
                    e.members.clear();
                }
                e
            })
            .collect();
        self.tables.sync(&proxied, complete)
    }

    /// Attaches the programs to the cgroup at `cgroup` and pins the links,
    /// replacing (after attaching) any links a previous agent left pinned.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), RedirectError> {
        let cgroup_file = File::open(cgroup).map_err(|error| RedirectError::Cgroup {
            path: cgroup.to_owned(),
            error,
        })?;
        // With BPF links, `Single` still lets other links (another agent,
        // another tool) share the cgroup; the kernel refuses the multi flag
        // on cgroup links.
        for name in PROGRAMS {
            if KERNEL_MODE_PROGRAMS.contains(&name) && !self.kernel_mode {
                continue;
            }
            let attach_err = |e| RedirectError::Attach {
                program: name,
                cgroup: cgroup.to_owned(),
                error: ErrorChain::of(&e),
            };
            let program = self
                .ebpf
                .program_mut(name)
                .ok_or(RedirectError::MissingMap(name))?;
            let fd_link: FdLink = match program {
                aya::programs::Program::CgroupSockAddr(p) => {
                    let p: &mut CgroupSockAddr = p;
                    let id = p
                        .attach(&cgroup_file, CgroupAttachMode::Single)
                        .map_err(attach_err)?;
                    let link = p.take_link(id).map_err(attach_err)?;
                    link.try_into()
                        .map_err(|e: aya::programs::links::LinkError| {
                            pin_err("link", self.pin_dir.clone(), e)
                        })?
                }
                aya::programs::Program::SockOps(p) => {
                    let p: &mut SockOps = p;
                    let id = p
                        .attach(&cgroup_file, CgroupAttachMode::Single)
                        .map_err(attach_err)?;
                    let link = p.take_link(id).map_err(attach_err)?;
                    link.try_into()
                        .map_err(|e: aya::programs::links::LinkError| {
                            pin_err("link", self.pin_dir.clone(), e)
                        })?
                }
                _ => return Err(RedirectError::MissingMap(name)),
            };
            let pin_path = self.link_pin_path(name);
            if pin_path.exists() {
                replace_old_link(&pin_path);
            }
            let pinned = fd_link
                .pin(&pin_path)
                .map_err(|e| pin_err("link", pin_path.clone(), e))?;
            self.links.push(pinned);
        }
        if !self.retired.is_empty() {
            info!(
                "detached {} links of the incompatible older agent",
                self.retired.len()
            );
            self.retired.clear();
        }
        info!(
            "attached {} to cgroup {} (links pinned in {})",
            PROGRAMS
                .iter()
                .filter(|p| !KERNEL_MODE_PROGRAMS.contains(p) || self.kernel_mode)
                .copied()
                .collect::<Vec<_>>()
                .join(", "),
            cgroup.display(),
            self.pin_dir.display()
        );
        Ok(())
    }

    fn link_pin_path(&self, program: &str) -> PathBuf {
        self.pin_dir.join(format!("link_{program}"))
    }

    /// Detaches the programs and removes every pin: the node is left as if
    /// Sluice had never run.
    pub fn detach(self) {
        let Redirect {
            pin_dir,
            links,
            capture,
            ..
        } = self;
        capture.detach_all();
        for link in links {
            match link.unpin() {
                // Dropping the last reference to the link detaches it.
                Ok(fd_link) => drop(fd_link),
                Err(e) => warn!("cannot unpin a link in {}: {e}", pin_dir.display()),
            }
        }
        remove_pins(&pin_dir);
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, RedirectError> {
    ebpf.take_map(name).ok_or(RedirectError::MissingMap(name))
}
