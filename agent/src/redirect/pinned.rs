//! What the agent leaves in bpffs and reads back from it: retiring pins of
//! another layout, replacing an old link, removing every pin at a stop, and
//! the counters and record maps the CLI reads with or without an agent.

use std::{io, path::Path};

use aya::{
    maps::{Array, Map, MapData, PerCpuArray},
    programs::links::{FdLink, PinnedLink},
};
use log::{info, warn};
use sluice_maps::{LAYOUT_VERSION, PINNED_MAPS, SETTINGS_LOG, STAT_COUNT, Settings, Stat};

use super::{RedirectError, map_err, records};

/// When `pin_dir` holds pins of another layout version (or of a version
/// before layouts were recorded), takes the old links out of the directory
/// (they stay attached while the returned handles live) and removes the
/// old map pins, so that fresh maps are created in their place.
pub(super) fn retire_incompatible_pins(pin_dir: &Path) -> Vec<FdLink> {
    let has_maps = PINNED_MAPS.iter().any(|m| pin_dir.join(m).exists());
    if !has_maps {
        return Vec::new();
    }
    let found = MapData::from_pin(pin_dir.join(sluice_maps::LAYOUT))
        .ok()
        .and_then(|data| Array::<MapData, u32>::try_from(Map::Array(data)).ok())
        .and_then(|a| a.get(&0, 0).ok());
    if found == Some(LAYOUT_VERSION) {
        return Vec::new();
    }
    warn!(
        "pinned objects in {} are from an incompatible agent version (layout {}, this agent \
         {LAYOUT_VERSION}); replacing them",
        pin_dir.display(),
        found.map_or_else(|| "unrecorded".to_owned(), |v| v.to_string())
    );
    let mut held = Vec::new();
    if let Ok(entries) = std::fs::read_dir(pin_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with("link_") {
                match PinnedLink::from_pin(&path).map(PinnedLink::unpin) {
                    Ok(Ok(link)) => held.push(link),
                    _ => warn!("cannot take over old link {}", path.display()),
                }
            }
            // Maps stay alive while the old programs use them.
            let _ = std::fs::remove_file(&path);
        }
    }
    held
}

/// Detaches a link a previous agent left pinned at `path`.
pub(super) fn replace_old_link(path: &Path) {
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
    super::liveness::unpin_tracepoints(pin_dir, &[]);
    for name in PINNED_MAPS {
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

/// The programs' per-CPU counters.
pub struct ProgramStats {
    pub(super) map: PerCpuArray<MapData, u64>,
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

/// The two record maps, opened from their pins once (works without the
/// agent), for counting what is left in them.
pub struct RecordMaps {
    by_cookie: Map,
    by_peer: Map,
}

impl RecordMaps {
    pub fn from_pin(pin_dir: &Path) -> Result<RecordMaps, RedirectError> {
        let open = |name: &'static str| -> Result<Map, RedirectError> {
            let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
            Ok(Map::LruHashMap(data))
        };
        Ok(RecordMaps {
            by_cookie: open(sluice_maps::ORIG_BY_COOKIE)?,
            by_peer: open(sluice_maps::ORIG_BY_PEER)?,
        })
    }

    /// Records in each map now: (by cookie, by peer).
    pub fn counts(&self) -> (usize, usize) {
        (
            records::count::<u64>(&self.by_cookie),
            records::count::<sluice_maps::PeerKey>(&self.by_peer),
        )
    }
}

/// Counts of records left in the pinned record maps: (by cookie, by peer).
pub fn pinned_record_counts(pin_dir: &Path) -> Result<(usize, usize), RedirectError> {
    RecordMaps::from_pin(pin_dir).map(|maps| maps.counts())
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
