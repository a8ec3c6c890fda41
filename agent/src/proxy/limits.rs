//! Bounds on what peers can hold on the inbound port before they have
//! proven anything: handshakes in flight and open connections, per node and
//! per source address. A connection over a bound is reset at once and
//! counted (`overloaded`), so a flood costs the agent a bounded amount of
//! memory and CPU and never starves the connections already admitted.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::config::mesh::InboundLimitsConfig;

/// Shards of the per-source table: an accept locks one of them briefly.
const SHARDS: usize = 16;

/// Which bound a connection ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Handshakes,
    HandshakesPerSource,
    Connections,
    ConnectionsPerSource,
}

impl Over {
    pub fn name(self) -> &'static str {
        match self {
            Over::Handshakes => "max_handshakes",
            Over::HandshakesPerSource => "max_handshakes_per_source",
            Over::Connections => "max_connections",
            Over::ConnectionsPerSource => "max_connections_per_source",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct PerSource {
    handshakes: usize,
    connections: usize,
}

/// Counts of the inbound port, shared by its accept loop and connections.
#[derive(Debug)]
pub struct InboundLimits {
    bounds: InboundLimitsConfig,
    handshakes: AtomicUsize,
    connections: AtomicUsize,
    /// Most connections open at once since the last [`Self::take_peak`].
    peak: AtomicUsize,
    hasher: RandomState,
    sources: [Mutex<HashMap<IpAddr, PerSource>>; SHARDS],
}

/// One admitted connection's place; released when dropped.
#[derive(Debug)]
pub struct Admitted {
    limits: Arc<InboundLimits>,
    source: IpAddr,
    handshaking: bool,
}

impl InboundLimits {
    pub fn new(bounds: InboundLimitsConfig) -> Arc<InboundLimits> {
        Arc::new(InboundLimits {
            bounds,
            handshakes: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            hasher: RandomState::new(),
            sources: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        })
    }

    fn shard(&self, source: IpAddr) -> &Mutex<HashMap<IpAddr, PerSource>> {
        &self.sources[self.hasher.hash_one(source) as usize % SHARDS]
    }

    /// Takes a connection and a handshake place for `source`, or says
    /// which bound is full.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Admitted, Over> {
        let b = &self.bounds;
        if self.connections.load(Ordering::Relaxed) >= b.max_connections {
            return Err(Over::Connections);
        }
        if self.handshakes.load(Ordering::Relaxed) >= b.max_handshakes {
            return Err(Over::Handshakes);
        }
        {
            let mut shard = self.shard(source).lock().unwrap_or_else(|p| p.into_inner());
            let entry = shard.entry(source).or_default();
            if entry.connections >= b.max_connections_per_source {
                return Err(Over::ConnectionsPerSource);
            }
            if entry.handshakes >= b.max_handshakes_per_source {
                return Err(Over::HandshakesPerSource);
            }
            entry.connections += 1;
            entry.handshakes += 1;
        }
        let open = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(open, Ordering::Relaxed);
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        Ok(Admitted {
            limits: self.clone(),
            source,
            handshaking: true,
        })
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Handshakes in flight now.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }

    /// The most connections open at once since the last call.
    pub fn take_peak(&self) -> usize {
        self.peak.swap(self.connections(), Ordering::Relaxed)
    }

    fn release(&self, source: IpAddr, handshake: bool, connection: bool) {
        let mut shard = self.shard(source).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = shard.get_mut(&source) {
            if handshake {
                entry.handshakes = entry.handshakes.saturating_sub(1);
            }
            if connection {
                entry.connections = entry.connections.saturating_sub(1);
            }
            if entry.connections == 0 && entry.handshakes == 0 {
                shard.remove(&source);
            }
        }
        drop(shard);
        if handshake {
            self.handshakes.fetch_sub(1, Ordering::Relaxed);
        }
        if connection {
            self.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Admitted {
    /// The handshake is over (either way): its place is free for another.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.limits.release(self.source, true, false);
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.limits.release(self.source, self.handshaking, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Arc<InboundLimits> {
        InboundLimits::new(InboundLimitsConfig {
            max_handshakes: 3,
            max_handshakes_per_source: 2,
            max_connections: 4,
            max_connections_per_source: 3,
        })
    }

    #[test]
    fn per_source_and_node_bounds_hold_and_places_come_back() {
        let l = limits();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mut a1 = l.admit(a).unwrap();
        let a2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Over::HandshakesPerSource);
        let b1 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err(), Over::Handshakes);
        a1.handshake_done();
        let mut a3 = l.admit(a).unwrap();
        a3.handshake_done();
        assert_eq!(l.admit(a).unwrap_err(), Over::Connections);
        drop((a1, a2, a3, b1));
        assert_eq!((l.connections(), l.handshakes()), (0, 0));
        assert!(l.sources.iter().all(|s| s.lock().unwrap().is_empty()));
        assert_eq!(l.take_peak(), 4);
        assert_eq!(l.take_peak(), 0);
    }
}
