//! Live connections, for `sluice conns` and the admin API. Sharded so that
//! registering a connection never contends on one lock.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use crate::{
    catalog::{Service, Workload},
    telemetry::ByteCounters,
};

const SHARDS: usize = 16;

/// One proxied connection while it lives. Holds references, not copies:
/// listing a connection allocates nothing but its entry.
#[derive(Debug)]
pub struct LiveConnection {
    pub id: u64,
    pub source: Option<Arc<Workload>>,
    pub service: Arc<Service>,
    pub endpoint: SocketAddr,
    /// `mutual_tls` or `plaintext`.
    pub security: &'static str,
    pub started: SystemTime,
    pub bytes: ByteCounters,
}

/// Every live connection.
#[derive(Debug, Default)]
pub struct Connections {
    shards: [Mutex<HashMap<u64, Arc<LiveConnection>>>; SHARDS],
    next: AtomicU64,
}

/// Keeps a connection listed until dropped.
#[derive(Debug)]
pub struct Listed<'a> {
    registry: &'a Connections,
    pub connection: Arc<LiveConnection>,
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        let id = self.connection.id;
        if let Ok(mut shard) = self.registry.shards[id as usize % SHARDS].lock() {
            shard.remove(&id);
        }
    }
}

impl Connections {
    /// Lists a connection; `make` receives its id.
    pub fn add(&self, make: impl FnOnce(u64) -> LiveConnection) -> Listed<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(make(id));
        if let Ok(mut shard) = self.shards[id as usize % SHARDS].lock() {
            shard.insert(id, connection.clone());
        }
        Listed {
            registry: self,
            connection,
        }
    }

    /// A copy of the list, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<LiveConnection>> {
        let mut all: Vec<Arc<LiveConnection>> = self
            .shards
            .iter()
            .filter_map(|s| {
                s.lock()
                    .ok()
                    .map(|s| s.values().cloned().collect::<Vec<_>>())
            })
            .flatten()
            .collect();
        all.sort_by_key(|c| c.id);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{catalog::Catalog, config::Config};

    #[test]
    fn listed_until_dropped() {
        let config = Config::parse(
            "node:\n  name: n\nservices:\n  - name: s\n    address: 127.0.0.9\n    port: 80\n    \
             endpoints:\n      - address: 127.0.0.1\n        port: 1\n",
            "t.yaml",
        )
        .unwrap();
        let catalog = Catalog::from_config(&config, &[], None);
        let service = catalog.services().next().unwrap().clone();
        let registry = Connections::default();
        let make = |id| LiveConnection {
            id,
            source: None,
            service: service.clone(),
            endpoint: "127.0.0.1:1".parse().unwrap(),
            security: "plaintext",
            started: SystemTime::now(),
            bytes: ByteCounters::default(),
        };
        let a = registry.add(make);
        let b = registry.add(make);
        assert_eq!(registry.snapshot().len(), 2);
        drop(a);
        let left = registry.snapshot();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, b.connection.id);
    }
}
