//! Live connections, for `sluice conns` and the admin API, and the way out
//! for those that move to the next agent in an upgrade. Sharded so that
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

use tokio::sync::{mpsc, oneshot};

use super::moved::Moved;
use crate::{
    catalog::{Service, Workload},
    telemetry::ByteCounters,
    tls::Identity,
};

const SHARDS: usize = 16;

/// One proxied connection while it lives. Holds references, not copies:
/// listing a connection allocates nothing but its entry.
#[derive(Debug)]
pub struct LiveConnection {
    pub id: u64,
    pub caller: Caller,
    pub callee: Callee,
    /// The client's end of the accepted connection.
    pub client: SocketAddr,
    /// The address the agent connected to.
    pub endpoint: SocketAddr,
    /// `mutual_tls` or `plaintext`.
    pub security: &'static str,
    pub started: SystemTime,
    pub bytes: ByteCounters,
}

/// Who opened a connection.
#[derive(Debug)]
pub enum Caller {
    /// A workload on this node (outbound); None when its cgroup is not a
    /// known workload's.
    Workload(Option<Arc<Workload>>),
    /// A workload on another node, by the identity its agent proved
    /// (inbound mTLS).
    Peer(Identity),
    /// A client outside the mesh, in plaintext to a permissive workload
    /// (inbound capture).
    Outside,
}

/// Where a connection goes.
#[derive(Debug)]
pub enum Callee {
    /// An endpoint (by index) of a service (outbound).
    Service {
        service: Arc<Service>,
        endpoint: usize,
    },
    /// A workload on this node (inbound).
    Workload(Arc<Workload>),
    /// A request service (outbound): each request of the connection goes
    /// to an endpoint of its own.
    Requests(Arc<Service>),
}

/// The far end of a connection as the audit trail names it.
pub struct AuditedCallee<'a> {
    pub identity: Option<&'a Identity>,
    /// A local workload, `namespace/name`.
    pub workload: Option<String>,
}

impl Caller {
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Caller::Workload(w) => w.as_deref().map(|w| &w.identity),
            Caller::Peer(id) => Some(id),
            Caller::Outside => None,
        }
    }

    /// The local workload, `namespace/name`.
    pub fn workload_name(&self) -> Option<String> {
        match self {
            Caller::Workload(w) => w.as_deref().map(Workload::qualified_name),
            Caller::Peer(_) | Caller::Outside => None,
        }
    }

    /// (name, namespace) for the connections view: the workload's, or the
    /// peer identity's service account and namespace.
    pub fn names(&self) -> (&str, &str) {
        match self {
            Caller::Workload(Some(w)) => (&w.name, &w.namespace),
            Caller::Workload(None) | Caller::Outside => ("unknown", "unknown"),
            Caller::Peer(id) => (&id.service_account, &id.namespace),
        }
    }
}

impl Callee {
    /// The destination for the connections view: `namespace/name` of the
    /// service, or of the local workload.
    pub fn name(&self) -> String {
        match self {
            Callee::Service { service, .. } | Callee::Requests(service) => service.qualified_name(),
            Callee::Workload(w) => w.qualified_name(),
        }
    }

    /// The destination party and the service, for the audit trail.
    pub fn audited(&self) -> (AuditedCallee<'_>, Option<String>) {
        match self {
            Callee::Service { service, endpoint } => {
                let e = &service.endpoints[*endpoint];
                (
                    AuditedCallee {
                        identity: e.identity.as_ref(),
                        workload: e.workload.clone(),
                    },
                    Some(service.qualified_name()),
                )
            }
            Callee::Workload(w) => (
                AuditedCallee {
                    identity: Some(&w.identity),
                    workload: Some(w.qualified_name()),
                },
                None,
            ),
            // Its requests' endpoints are in the access log.
            Callee::Requests(service) => (
                AuditedCallee {
                    identity: None,
                    workload: None,
                },
                Some(service.qualified_name()),
            ),
        }
    }
}

/// Every live connection.
#[derive(Debug)]
pub struct Connections {
    shards: [Mutex<HashMap<u64, Entry>>; SHARDS],
    next: AtomicU64,
    /// Set once connections move to the next agent: one listed after it
    /// is told at once.
    moving: std::sync::atomic::AtomicBool,
    /// Suspended connections on their way to the next agent.
    outbox: mpsc::UnboundedSender<Moved>,
    taken: Mutex<Option<mpsc::UnboundedReceiver<Moved>>>,
}

#[derive(Debug)]
struct Entry {
    connection: Arc<LiveConnection>,
    /// Tells a connection that can move to stop where it stands.
    mover: Option<oneshot::Sender<()>>,
}

impl Default for Connections {
    fn default() -> Connections {
        let (outbox, taken) = mpsc::unbounded_channel();
        Connections {
            shards: Default::default(),
            next: AtomicU64::new(0),
            moving: Default::default(),
            outbox,
            taken: Mutex::new(Some(taken)),
        }
    }
}

/// Keeps a connection listed until dropped.
#[derive(Debug)]
pub struct Listed<'a> {
    registry: &'a Connections,
    pub connection: Arc<LiveConnection>,
    /// Fires when the connection is to move to the next agent (a
    /// connection listed as movable only).
    pub moving: Option<oneshot::Receiver<()>>,
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
    /// Lists a connection; `make` receives its id. A `movable` one gets a
    /// signal that fires when connections move to the next agent.
    pub fn add(&self, make: impl FnOnce(u64) -> LiveConnection, movable: bool) -> Listed<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(make(id));
        let (mut mover, moving) = match movable {
            true => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        if let Ok(mut shard) = self.shards[id as usize % SHARDS].lock() {
            // Under the shard's lock, which start_moving takes after it
            // sets the flag: either it finds this entry, or this sees it.
            if self.moving.load(Ordering::SeqCst)
                && let Some(tx) = mover.take()
            {
                let _ = tx.send(());
            }
            let connection = connection.clone();
            shard.insert(id, Entry { connection, mover });
        }
        Listed {
            registry: self,
            connection,
            moving,
        }
    }

    /// Tells every movable connection, listed now or later, to stop where
    /// it stands and move to the next agent (by [`Self::move_out`]).
    pub fn start_moving(&self) {
        self.moving.store(true, Ordering::SeqCst);
        for shard in &self.shards {
            if let Ok(mut shard) = shard.lock() {
                for entry in shard.values_mut() {
                    if let Some(tx) = entry.mover.take() {
                        let _ = tx.send(());
                    }
                }
            }
        }
    }

    /// Hands a suspended connection to whoever sends them to the next
    /// agent.
    pub fn move_out(&self, moved: Moved) {
        // The receiver lives as long as the agent; a send cannot fail
        // before the process ends.
        let _ = self.outbox.send(moved);
    }

    /// The suspended connections, for the one who sends them on (once).
    pub fn take_outbox(&self) -> Option<mpsc::UnboundedReceiver<Moved>> {
        self.taken.lock().ok()?.take()
    }

    /// A copy of the list, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<LiveConnection>> {
        let mut all: Vec<Arc<LiveConnection>> = self
            .shards
            .iter()
            .filter_map(|s| {
                s.lock()
                    .ok()
                    .map(|s| s.values().map(|e| e.connection.clone()).collect::<Vec<_>>())
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
            caller: Caller::Workload(None),
            callee: Callee::Service {
                service: service.clone(),
                endpoint: 0,
            },
            client: "127.0.0.1:40000".parse().unwrap(),
            endpoint: "127.0.0.1:1".parse().unwrap(),
            security: "plaintext",
            started: SystemTime::now(),
            bytes: ByteCounters::default(),
        };
        let a = registry.add(make, false);
        let b = registry.add(make, true);
        assert_eq!(registry.snapshot().len(), 2);
        drop(a);
        let left = registry.snapshot();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, b.connection.id);
    }

    #[test]
    fn movable_connections_are_told_to_move_whether_listed_before_or_after() {
        let registry = Connections::default();
        let make = |id| LiveConnection {
            id,
            caller: Caller::Outside,
            callee: Callee::Workload(Arc::new(crate::catalog::Workload {
                name: "w".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
                cgroup: "/sys/fs/cgroup/w".into(),
                cgroup_id: 1,
                identity: Identity::new("td", "ns", "sa"),
                policy: None,
                netns: None,
                rate_limit: None,
            })),
            client: "127.0.0.1:40000".parse().unwrap(),
            endpoint: "127.0.0.1:1".parse().unwrap(),
            security: "plaintext",
            started: SystemTime::now(),
            bytes: ByteCounters::default(),
        };
        let mut before = registry.add(make, true);
        let fixed = registry.add(make, false);
        assert!(fixed.moving.is_none());
        let waiting = before.moving.as_mut().unwrap();
        assert!(waiting.try_recv().is_err(), "not yet");
        registry.start_moving();
        assert_eq!(before.moving.as_mut().unwrap().try_recv(), Ok(()));
        let mut after = registry.add(make, true);
        assert_eq!(after.moving.as_mut().unwrap().try_recv(), Ok(()));
        assert_eq!(registry.snapshot().len(), 3);
        assert!(registry.take_outbox().is_some());
        assert!(registry.take_outbox().is_none(), "taken once");
    }
}
