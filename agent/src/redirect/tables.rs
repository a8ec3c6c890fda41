//! The SERVICES and BACKENDS maps, kept equal to what the catalog and the
//! resilience layer want.
//!
//! Each service has two backend tables in BACKENDS (generation 0 and 1).
//! The live one is named by the service's SERVICES value. A change writes
//! the other table in full, then replaces the SERVICES value (one map
//! update, which a program sees whole or not at all), so a connect never
//! reads a half-written set. The table that just went out of use is only
//! overwritten at the next change.

use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, MapData};
use sluice_maps::{Backend, BackendKey, MAX_SLOTS, ServiceKey, ServiceValue};

use super::KernelEntry;
use super::{RedirectError, map_err};
use crate::lb::bounded_cycle;

/// What was last written for one service.
#[derive(Debug)]
struct Written {
    value: ServiceValue,
    members: Vec<(Backend, u32)>,
    /// Slots written in each generation's table.
    filled: [u32; 2],
}

pub struct Tables {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    written: StdHashMap<ServiceKey, Written>,
    /// Slots a previous agent left, per service and generation: what to
    /// clear when this process first rewrites those tables.
    inherited: StdHashMap<ServiceKey, [u32; 2]>,
}

impl Tables {
    pub fn new(
        services: HashMap<MapData, ServiceKey, ServiceValue>,
        backends: HashMap<MapData, BackendKey, Backend>,
    ) -> Tables {
        let mut inherited: StdHashMap<ServiceKey, [u32; 2]> = StdHashMap::new();
        for key in backends.keys().filter_map(Result::ok) {
            let filled = inherited.entry(key.service).or_default();
            let generation = (key.slot >> 31) as usize;
            let index = key.slot & !(1 << 31);
            filled[generation] = filled[generation].max(index + 1);
        }
        Tables {
            services,
            backends,
            written: StdHashMap::new(),
            inherited,
        }
    }

    /// Makes the maps equal to `wanted`; with `complete`, services not in
    /// `wanted` are removed too. Returns how many services got a new
    /// backend table. A service whose table cannot be written keeps its
    /// previous one (and the error is returned after the others).
    pub fn sync(&mut self, wanted: &[KernelEntry], complete: bool) -> Result<usize, RedirectError> {
        let mut switched = 0;
        let mut first_error = None;
        for entry in wanted {
            match self.sync_one(entry) {
                Ok(true) => switched += 1,
                Ok(false) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if !complete {
            return first_error.map_or(Ok(switched), Err);
        }
        let keep: std::collections::HashSet<ServiceKey> = wanted.iter().map(|e| e.key).collect();
        let stale: Vec<ServiceKey> = self
            .services
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for key in stale {
            self.remove(key);
        }
        first_error.map_or(Ok(switched), Err)
    }

    /// Drops a service and its tables.
    pub fn remove(&mut self, key: ServiceKey) {
        // The service goes first, so no program can still pick from its
        // tables when they go.
        let _ = self.services.remove(&key);
        let filled = self
            .written
            .remove(&key)
            .map(|w| w.filled)
            .or_else(|| self.inherited.remove(&key))
            .unwrap_or_default();
        self.clear_slots(key, 0, 0..filled[0]);
        self.clear_slots(key, 1, 0..filled[1]);
    }

    fn sync_one(&mut self, entry: &KernelEntry) -> Result<bool, RedirectError> {
        let key = entry.key;
        let first_sight = !self.written.contains_key(&key);
        if first_sight {
            // First sight in this process: a previous agent may have left
            // a live table; write into the other generation.
            let value = self.services.get(&key, 0).ok();
            self.written.insert(
                key,
                Written {
                    value: value.unwrap_or(ServiceValue {
                        id: entry.id,
                        flags: entry.flags,
                        slots: 0,
                        generation: 1,
                    }),
                    // Forces a write below unless nothing is wanted.
                    members: value.map_or_else(Vec::new, |_| vec![(NO_BACKEND, 0)]),
                    filled: self.inherited.remove(&key).unwrap_or_default(),
                },
            );
        }
        let written = &self.written[&key];
        let mut value = ServiceValue {
            id: entry.id,
            flags: entry.flags,
            ..written.value
        };
        let switch = written.members != entry.members;
        if switch {
            let generation = written.value.generation ^ 1;
            let cycle = table(&entry.members);
            for (i, &m) in cycle.iter().enumerate() {
                self.backends
                    .insert(
                        BackendKey::new(key, generation, i as u32),
                        entry.members[m as usize].0,
                        0,
                    )
                    .map_err(map_err(sluice_maps::BACKENDS))?;
            }
            let len = cycle.len() as u32;
            let old_filled = written.filled[generation as usize];
            self.clear_slots(key, generation, len..old_filled);
            value.generation = generation;
            value.slots = len;
        }
        if switch || first_sight || value != self.written[&key].value {
            self.services
                .insert(key, value, 0)
                .map_err(map_err(sluice_maps::SERVICES))?;
        }
        let w = self.written.get_mut(&key).expect("inserted above");
        if switch {
            w.filled[value.generation as usize] = value.slots;
            w.members = entry.members.clone();
        }
        w.value = value;
        Ok(switch)
    }

    fn clear_slots(&mut self, key: ServiceKey, generation: u32, range: std::ops::Range<u32>) {
        for i in range {
            // Absent is fine: the range is an upper bound after a restart.
            let _ = self.backends.remove(&BackendKey::new(key, generation, i));
        }
    }
}

/// Stands for "unknown content" in a table inherited from another process.
const NO_BACKEND: Backend = Backend {
    addr: [0; 4],
    port: 0,
    _pad: 0,
};

/// Slot order of a table: indices into `members`, weight-proportional and
/// interleaved, at most [`MAX_SLOTS`] long.
fn table(members: &[(Backend, u32)]) -> Vec<u32> {
    let weights: Vec<u32> = members.iter().map(|(_, w)| *w).collect();
    bounded_cycle(&weights, MAX_SLOTS as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(port: u16) -> Backend {
        Backend {
            addr: [0, 0, 0, 0],
            port,
            _pad: 0,
        }
    }

    #[test]
    fn tables_are_weight_proportional_and_bounded() {
        let t = table(&[(backend(1), 1), (backend(2), 2), (backend(3), 3)]);
        assert_eq!(t.len(), 6);
        for (i, want) in [(0u32, 1), (1, 2), (2, 3)] {
            assert_eq!(t.iter().filter(|&&x| x == i).count(), want);
        }
        // Interleaved: the heaviest never takes three slots in a row.
        assert!(t.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])));

        let big = table(&[(backend(1), 1), (backend(2), 5000), (backend(3), 2500)]);
        assert!(big.len() <= MAX_SLOTS as usize, "{}", big.len());
        let count = |i| big.iter().filter(|&&x| x == i).count() as f64;
        assert!(count(0) >= 1.0, "every endpoint keeps a slot");
        assert!((count(1) / count(2) - 2.0).abs() < 0.01);
    }
}
