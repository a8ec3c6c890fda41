//! The kernel side, seen from the agent: load the programs, attach them to
//! the workload cgroup, pin maps and links, keep the maps in sync.
//!
//! Pins live under `agent.pin_dir`:
//! - one file per map (SERVICES, ORIG_BY_COOKIE, ...), reused by the next
//!   agent, so records written while the agent restarts are not lost;
//! - `link_connect4`, `link_sock_ops`: the attachments. They outlive a
//!   crashed agent (meshed traffic then fails closed: nothing listens on the
//!   outbound port; other traffic is untouched). A new agent attaches its own
//!   programs first and only then detaches the ones it finds pinned, so
//!   there is no moment without a hook. A graceful stop ([`Redirect::detach`])
//!   removes every pin.

pub mod cgroup;
pub mod preflight;
pub mod records;

use std::{
    collections::HashMap as StdHashMap,
    fs::File,
    io,
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
use sluice_maps::{SETTINGS_LOG, STAT_COUNT, ServiceKey, ServiceValue, Settings, Stat};

pub use records::{PeerRecords, Redirected};

/// The compiled eBPF object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf"));

/// The programs and where they attach, in attach order.
const PROGRAMS: [&str; 2] = ["connect4", "sluice_sockops"];

/// Why the redirect could not be installed or changed.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot prepare the pin directory {path}: {error}")]
    PinDir { path: PathBuf, error: io::Error },
    #[error(
        "the kernel refused Sluice's eBPF object; Sluice needs Linux 5.15 or newer with \
         CONFIG_CGROUP_BPF and BTF, and maps pinned by an incompatible version must be removed \
         first (`rm -r` the pin directory). Cause: {0}"
    )]
    Load(ErrorChain),
    #[error(
        "the kernel refused program {program}: this kernel lacks the program type \
         (cgroup_sock_addr or sock_ops) or a helper Sluice needs (Linux 5.15+ with \
         CONFIG_CGROUP_BPF). Cause: {error}"
    )]
    Program {
        program: &'static str,
        error: ErrorChain,
    },
    #[error("cannot attach {program} to cgroup {cgroup}: {error}")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        error: ErrorChain,
    },
    #[error("cannot open cgroup {path}: {error}")]
    Cgroup { path: PathBuf, error: io::Error },
    #[error("cannot pin {what} at {path}: {error}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        error: ErrorChain,
    },
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("map {map}: {error}")]
    Map {
        map: &'static str,
        error: ErrorChain,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> RedirectError {
    move |e| RedirectError::Map {
        map,
        error: ErrorChain::of(&e),
    }
}

/// An error and its causes, rendered once as `outer: cause: cause`. aya's
/// errors keep the errno in their source chain, which is what tells an
/// operator what went wrong.
#[derive(Debug)]
pub struct ErrorChain(String);

impl ErrorChain {
    pub fn of(e: &(dyn std::error::Error + 'static)) -> ErrorChain {
        let mut text = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            let part = c.to_string();
            // Some errors already print their source; do not repeat it.
            if !text.contains(&part) {
                text.push_str(": ");
                text.push_str(&part);
            }
            cause = c.source();
        }
        ErrorChain(text)
    }
}

impl std::fmt::Display for ErrorChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the programs need to know, written to the SETTINGS map.
#[derive(Debug, Clone, Copy)]
pub struct ProgramSettings {
    pub outbound: SocketAddrV4,
    pub agent_mark: u32,
    pub log: bool,
}

impl From<ProgramSettings> for Settings {
    fn from(s: ProgramSettings) -> Self {
        Settings {
            listener_ip4: u32::from_ne_bytes(s.outbound.ip().octets()),
            listener_port: s.outbound.port(),
            _pad: 0,
            agent_mark: s.agent_mark,
            flags: if s.log { SETTINGS_LOG } else { 0 },
        }
    }
}

/// The loaded programs and their maps. Dropping it leaves the pinned links
/// attached (crash-like); call [`Redirect::detach`] for a clean stop.
pub struct Redirect {
    pin_dir: PathBuf,
    ebpf: Ebpf,
    links: Vec<PinnedLink>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    settings: Array<MapData, Settings>,
}

impl Redirect {
    /// Loads the programs and maps, reusing maps pinned in `pin_dir`.
    /// Nothing is attached yet.
    pub fn load(pin_dir: &Path) -> Result<Redirect, RedirectError> {
        let fresh = !pin_dir.exists();
        let loaded = Self::load_inner(pin_dir);
        if loaded.is_err() && fresh {
            // Nothing of ours may stay behind when we could not start.
            remove_pins(pin_dir);
        }
        loaded
    }

    fn load_inner(pin_dir: &Path) -> Result<Redirect, RedirectError> {
        std::fs::create_dir_all(pin_dir).map_err(|error| RedirectError::PinDir {
            path: pin_dir.to_owned(),
            error,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .map_err(|e| RedirectError::Load(ErrorChain::of(&e)))?;
        for name in PROGRAMS {
            let program = ebpf
                .program_mut(name)
                .ok_or(RedirectError::MissingMap(name))?;
            let loaded = match program {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                _ => return Err(RedirectError::MissingMap(name)),
            };
            loaded.map_err(|e| RedirectError::Program {
                program: name,
                error: ErrorChain::of(&e),
            })?;
        }
        let services = take_map(&mut ebpf, sluice_maps::SERVICES)?;
        let services = HashMap::try_from(services).map_err(map_err(sluice_maps::SERVICES))?;
        let settings = take_map(&mut ebpf, sluice_maps::SETTINGS)?;
        let settings = Array::try_from(settings).map_err(map_err(sluice_maps::SETTINGS))?;
        Ok(Redirect {
            pin_dir: pin_dir.to_owned(),
            ebpf,
            links: Vec::new(),
            services,
            settings,
        })
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

    /// Makes the SERVICES map equal to `wanted`: inserts new or changed
    /// entries first, then removes the ones no longer wanted.
    pub fn sync_services(
        &mut self,
        wanted: &StdHashMap<ServiceKey, ServiceValue>,
    ) -> Result<(), RedirectError> {
        for (key, value) in wanted {
            if self.services.get(key, 0).ok().as_ref() != Some(value) {
                self.services
                    .insert(key, value, 0)
                    .map_err(map_err(sluice_maps::SERVICES))?;
            }
        }
        let stale: Vec<ServiceKey> = self
            .services
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted.contains_key(k))
            .collect();
        for key in stale {
            // Already gone is fine: someone else cleaned up.
            let _ = self.services.remove(&key);
        }
        Ok(())
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
        info!(
            "attached {} to cgroup {} (links pinned in {})",
            PROGRAMS.join(", "),
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
        let Redirect { pin_dir, links, .. } = self;
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

/// Detaches a link a previous agent left pinned at `path`.
fn replace_old_link(path: &Path) {
    match PinnedLink::from_pin(path) {
        Ok(old) => match old.unpin() {
            Ok(fd_link) => {
                drop(fd_link);
                info!(
                    "replaced the link a previous agent pinned at {}",
                    path.display()
                );
            }
            Err(e) => warn!("cannot unpin old link {}: {e}", path.display()),
        },
        Err(e) => {
            warn!(
                "cannot open old link {}: {e}; removing the pin",
                path.display()
            );
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Removes the map pins and the directory. Maps stay alive while a program
/// or another process still holds them.
pub fn remove_pins(pin_dir: &Path) {
    for name in [
        sluice_maps::SERVICES,
        sluice_maps::ORIG_BY_COOKIE,
        sluice_maps::ORIG_BY_PEER,
        sluice_maps::SETTINGS,
        sluice_maps::STATS,
    ] {
        let path = pin_dir.join(name);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!("cannot remove pin {}: {e}", path.display());
        }
    }
    if let Err(e) = std::fs::remove_dir(pin_dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(
            "cannot remove pin directory {} (something else is pinned there?): {e}",
            pin_dir.display()
        );
    }
}

fn pin_err(
    what: &'static str,
    path: PathBuf,
    e: impl std::error::Error + Send + Sync + 'static,
) -> RedirectError {
    RedirectError::Pin {
        what,
        path,
        error: ErrorChain::of(&e),
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, RedirectError> {
    ebpf.take_map(name).ok_or(RedirectError::MissingMap(name))
}

/// The programs' per-CPU counters.
pub struct ProgramStats {
    map: PerCpuArray<MapData, u64>,
}

impl ProgramStats {
    /// Opens the counters pinned in `pin_dir` (works without the agent).
    pub fn from_pin(pin_dir: &Path) -> Result<ProgramStats, RedirectError> {
        let data = MapData::from_pin(pin_dir.join(sluice_maps::STATS))
            .map_err(map_err(sluice_maps::STATS))?;
        Ok(ProgramStats {
            map: PerCpuArray::try_from(Map::PerCpuArray(data))
                .map_err(map_err(sluice_maps::STATS))?,
        })
    }

    /// Sum over CPUs of each counter.
    pub fn totals(&self) -> [(Stat, u64); STAT_COUNT as usize] {
        Stat::ALL.map(|stat| {
            let total = self
                .map
                .get(&(stat as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            (stat, total)
        })
    }

    /// One counter's total.
    pub fn total(&self, stat: Stat) -> u64 {
        self.totals()
            .iter()
            .find(|(s, _)| *s == stat)
            .map_or(0, |(_, n)| *n)
    }
}

/// Counts of records left in the pinned record maps (works without the
/// agent): (by cookie, by peer).
pub fn pinned_record_counts(pin_dir: &Path) -> Result<(usize, usize), RedirectError> {
    let open = |name: &'static str| -> Result<Map, RedirectError> {
        let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
        Ok(Map::LruHashMap(data))
    };
    let by_cookie = open(sluice_maps::ORIG_BY_COOKIE)?;
    let by_peer = open(sluice_maps::ORIG_BY_PEER)?;
    Ok((
        records::count::<u64>(&by_cookie),
        records::count::<sluice_maps::PeerKey>(&by_peer),
    ))
}

/// Switches the programs' log events on or off through the pinned SETTINGS
/// map; takes effect at once, with or without the agent running.
pub fn set_pinned_log(pin_dir: &Path, on: bool) -> Result<(), RedirectError> {
    let data = MapData::from_pin(pin_dir.join(sluice_maps::SETTINGS))
        .map_err(map_err(sluice_maps::SETTINGS))?;
    let mut settings: Array<MapData, Settings> =
        Array::try_from(Map::Array(data)).map_err(map_err(sluice_maps::SETTINGS))?;
    let mut current = settings
        .get(&0, 0)
        .map_err(map_err(sluice_maps::SETTINGS))?;
    if on {
        current.flags |= SETTINGS_LOG;
    } else {
        current.flags &= !SETTINGS_LOG;
    }
    settings
        .set(0, current, 0)
        .map_err(map_err(sluice_maps::SETTINGS))
}
