//! Bounds on what peers can hold on the inbound port before they have
//! proven anything: handshakes in flight and open connections, per node and
//! per source address. A connection over a connection bound is reset at
//! once; one that finds the handshake places full waits for one (a burst
//! queues) within the handshake deadline. Either way a flood costs the
//! agent a bounded amount of memory and CPU and never starves the
//! connections already admitted.

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
    /// Woken when a handshake place frees.
    handshake_freed: tokio::sync::Notify,
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
            handshake_freed: tokio::sync::Notify::new(),
            hasher: RandomState::new(),
            sources: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        })
    }

    fn shard(&self, source: IpAddr) -> &Mutex<HashMap<IpAddr, PerSource>> {
        &self.sources[self.hasher.hash_one(source) as usize % SHARDS]
    }

    /// Takes a connection place for `source`, or says which bound is full.
    /// The handshake place is taken apart ([`Admitted::start_handshake`]).
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Admitted, Over> {
        let b = &self.bounds;
        if self.connections.load(Ordering::Relaxed) >= b.max_connections {
            return Err(Over::Connections);
        }
        {
            let mut shard = self.shard(source).lock().unwrap_or_else(|p| p.into_inner());
            let entry = shard.entry(source).or_default();
            if entry.connections >= b.max_connections_per_source {
                return Err(Over::ConnectionsPerSource);
            }
            entry.connections += 1;
        }
        let open = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(open, Ordering::Relaxed);
        Ok(Admitted {
            limits: self.clone(),
            source,
            handshaking: false,
        })
    }

    /// Takes a handshake place for `source` if both bounds allow.
    fn try_handshake(&self, source: IpAddr) -> Result<(), Over> {
        let b = &self.bounds;
        if self.handshakes.load(Ordering::Relaxed) >= b.max_handshakes {
            return Err(Over::Handshakes);
        }
        let mut shard = self.shard(source).lock().unwrap_or_else(|p| p.into_inner());
        let entry = shard.entry(source).or_default();
        if entry.handshakes >= b.max_handshakes_per_source {
            return Err(Over::HandshakesPerSource);
        }
        entry.handshakes += 1;
        drop(shard);
        self.handshakes.fetch_add(1, Ordering::Relaxed);
        Ok(())
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
            self.handshake_freed.notify_waiters();
        }
        if connection {
            self.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Admitted {
    /// Waits, up to `within`, for a handshake place: a burst (a peer's
    /// reconnect storm) queues here rather than being reset, while the
    /// handshakes in flight stay bounded. Says which bound stayed full
    /// when the time ran out.
    pub async fn start_handshake(&mut self, within: std::time::Duration) -> Result<(), Over> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let freed = self.limits.handshake_freed.notified();
            tokio::pin!(freed);
            // Registered before trying, so a place freed in between wakes us.
            freed.as_mut().enable();
            match self.limits.try_handshake(self.source) {
                Ok(()) => {
                    self.handshaking = true;
                    return Ok(());
                }
                Err(over) => {
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(over);
                    }
                }
            }
        }
    }

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

    #[tokio::test(start_paused = true)]
    async fn per_source_and_node_bounds_hold_and_places_come_back() {
        let l = limits();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let wait = std::time::Duration::from_secs(1);
        let mut a1 = l.admit(a).unwrap();
        let mut a2 = l.admit(a).unwrap();
        let mut a3 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Over::ConnectionsPerSource);
        a1.start_handshake(wait).await.unwrap();
        a2.start_handshake(wait).await.unwrap();
        // The source's handshake places are full: a3 waits, then gives up.
        assert_eq!(
            a3.start_handshake(wait).await.unwrap_err(),
            Over::HandshakesPerSource
        );
        let mut b1 = l.admit(b).unwrap();
        b1.start_handshake(wait).await.unwrap();
        assert_eq!(l.admit(b).unwrap_err(), Over::Connections);
        // A place freed while a3 waits is taken at once.
        let waiting = tokio::spawn(async move {
            let r = a3.start_handshake(wait).await;
            (r, a3)
        });
        tokio::task::yield_now().await;
        a1.handshake_done();
        let (taken, mut a3) = waiting.await.unwrap();
        assert_eq!(taken, Ok(()));
        a3.handshake_done();
        drop((a1, a2, a3, b1));
        assert_eq!((l.connections(), l.handshakes()), (0, 0));
        assert!(l.sources.iter().all(|s| s.lock().unwrap().is_empty()));
        assert_eq!(l.take_peak(), 4);
        assert_eq!(l.take_peak(), 0);
    }
}
