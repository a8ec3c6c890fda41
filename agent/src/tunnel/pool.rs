//! Tunnel connections shared by the application connections of one key
//! (in the agent: source identity, destination node, destination
//! identity), so that many connections cost one handshake.
//!
//! Each connection takes at most `max_streams_per_connection` streams, and
//! never more than the peer's SETTINGS_MAX_CONCURRENT_STREAMS as last
//! received: a full connection is never waited on (HTTP/2 would queue the
//! stream behind the others, as istio/ztunnel#864 found); another is
//! dialled. Dials of one key happen one at a time, so a burst of connects
//! to a new peer makes one connection, not one each; a dial that fails
//! fails the connects that waited for it instead of each trying again.
//! A connection that got GOAWAY or ended takes no new stream and leaves
//! the pool; its open streams finish (GOAWAY) or fail (ended). One idle
//! for `idle_timeout` is closed by [`Pool::sweep`].

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::HeaderMap;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};

use super::{TunnelClient, TunnelConfig, TunnelError, TunnelStream};

/// Makes the transport of a new tunnel connection for a key: in the agent,
/// a marked TCP connect to the peer node and a TLS handshake presenting
/// the key's source identity. The caller bounds its time.
pub trait Dial<K>: Send + Sync {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Which credentials the connections of `key` are made with now (in
    /// the agent: when the source identity's certificate was installed).
    /// A pooled connection made under another takes no new stream; its
    /// open streams finish on it. Rotation so drains the old connections
    /// without failing a stream.
    fn generation(&self, _key: &K) -> u64 {
        0
    }

    fn dial(&self, key: &K) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// How a pool sizes and keeps its connections.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Streams one connection takes before another is dialled (the peer's
    /// own limit is respected below this).
    pub max_streams_per_connection: usize,
    /// A connection without a stream for this long is closed.
    pub idle_timeout: Duration,
    pub tunnel: TunnelConfig,
    /// This agent's node, named on each connection's control stream so
    /// that its streams can be paused for a move (see `control`); None
    /// opens no control stream.
    pub node: Option<String>,
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            max_streams_per_connection: 100,
            idle_timeout: Duration::from_secs(60),
            tunnel: TunnelConfig::default(),
            node: None,
        }
    }
}

/// What a pool holds for one key, as the admin view shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUsage {
    pub connections: usize,
    /// Of those, the ones that take no new stream (the peer's GOAWAY, or
    /// closed): their open streams finish on them.
    pub closing: usize,
    /// Of those, the ones whose peer agent speaks moves (their control
    /// stream is open): their streams move in an upgrade of either end.
    pub movable: usize,
    pub streams: usize,
    /// The key's last failed dial: how long ago, and why.
    pub last_failure: Option<(Duration, String)>,
}

/// One pooled connection and how many streams it carries.
#[derive(Debug)]
struct Pooled {
    client: TunnelClient,
    /// [`Dial::generation`] when it was dialled.
    generation: u64,
    streams: AtomicUsize,
    /// When its last stream ended (or it was made).
    idle_since: Mutex<Instant>,
    /// Dropped with the connection: ends its control stream, which would
    /// otherwise hold it open.
    control: Option<tokio::sync::oneshot::Sender<()>>,
}

/// A stream's place on a pooled connection, given back when the stream is
/// dropped.
#[derive(Debug)]
pub(super) struct Slot(Arc<Pooled>);

impl Slot {
    pub(super) fn client(&self) -> TunnelClient {
        self.0.client.clone()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.0.idle_since) = Instant::now();
        }
    }
}

/// The connections of one key.
#[derive(Debug)]
struct Peer<K> {
    /// The key, shared with the streams' holders.
    key: Arc<K>,
    connections: Mutex<Vec<Arc<Pooled>>>,
    /// Held while a connection is dialled: one dial at a time per key.
    dialing: tokio::sync::Mutex<()>,
    /// When the last dial failed, and why.
    failed: Mutex<Option<(Instant, String)>>,
}

impl<K> Peer<K> {
    fn new(key: K) -> Peer<K> {
        Peer {
            key: Arc::new(key),
            connections: Mutex::default(),
            dialing: tokio::sync::Mutex::default(),
            failed: Mutex::default(),
        }
    }

    fn usage(&self, now: Instant) -> PeerUsage {
        let connections = lock(&self.connections);
        PeerUsage {
            connections: connections.len(),
            closing: connections.iter().filter(|c| !c.client.is_usable()).count(),
            movable: connections
                .iter()
                .filter(|c| c.client.speaks_moves())
                .count(),
            streams: connections
                .iter()
                .map(|c| c.streams.load(Ordering::Acquire))
                .sum(),
            last_failure: lock(&self.failed)
                .as_ref()
                .map(|(at, why)| (now.saturating_duration_since(*at), why.clone())),
        }
    }
}

// Nothing panics while holding these locks; a poisoned one still holds
// consistent data.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Tunnel connections per key `K`, made by `D`.
pub struct Pool<K, D> {
    /// Read by every connect, written only when a key is new or swept: a
    /// read lock, so connects do not wait on one another.
    peers: RwLock<HashMap<K, Arc<Peer<K>>>>,
    dial: D,
    config: PoolConfig,
}

impl<K, D> Pool<K, D>
where
    K: Hash + Eq + Clone + Send + Sync,
    D: Dial<K>,
{
    pub fn new(dial: D, config: PoolConfig) -> Pool<K, D> {
        Pool {
            peers: RwLock::new(HashMap::new()),
            dial,
            config,
        }
    }

    /// A CONNECT stream to `target` on a connection of `key`: an open one
    /// with room, else a new one. A stream the peer cannot have acted on
    /// (GOAWAY raced it, or REFUSED_STREAM) is tried once more on another
    /// connection; a refusal with a status is returned as it is.
    pub async fn connect(
        &self,
        key: &K,
        target: SocketAddr,
        headers: HeaderMap,
    ) -> Result<TunnelStream, TunnelError> {
        let (stream, _) = self.connect_keyed(key, target, headers).await?;
        Ok(stream)
    }

    /// [`Pool::connect`], and the key as the pool keeps it: one shared
    /// copy for every stream of the key.
    pub async fn connect_keyed(
        &self,
        key: &K,
        target: SocketAddr,
        headers: HeaderMap,
    ) -> Result<(TunnelStream, Arc<K>), TunnelError> {
        let peer = self.peer(key);
        let mut avoid = None;
        loop {
            let generation = self.dial.generation(key);
            let slot = match self.checkout(&peer, generation, avoid.as_ref()) {
                Some(slot) => slot,
                None => {
                    self.dial_new(key, &peer, generation, avoid.as_ref())
                        .await?
                }
            };
            let client = slot.0.client.clone();
            match client.open(target, headers.clone()).await {
                Ok(stream) => return Ok((stream.with_slot(slot), peer.key.clone())),
                Err(e) if e.is_retryable() && avoid.is_none() => avoid = Some(slot.0.clone()),
                Err(e) => return Err(e),
            }
        }
    }

    fn peer(&self, key: &K) -> Arc<Peer<K>> {
        if let Some(peer) = read(&self.peers).get(key).cloned() {
            return peer;
        }
        let mut peers = write(&self.peers);
        match peers.get(key) {
            Some(peer) => peer.clone(),
            None => {
                let peer = Arc::new(Peer::new(key.clone()));
                peers.insert(key.clone(), peer.clone());
                peer
            }
        }
    }

    /// The streams a connection may carry now: the control stream, when
    /// there is one, counts against the peer's limit too.
    fn room(&self, pooled: &Pooled) -> usize {
        let control = usize::from(pooled.control.is_some());
        let peer = pooled.client.peer_max_streams().saturating_sub(control);
        self.config.max_streams_per_connection.min(peer)
    }

    /// A slot on the first usable connection with room (filling the
    /// oldest first, so that spare ones go idle and close), dropping the
    /// unusable ones and those of another generation.
    fn checkout(
        &self,
        peer: &Peer<K>,
        generation: u64,
        avoid: Option<&Arc<Pooled>>,
    ) -> Option<Slot> {
        let mut connections = lock(&peer.connections);
        connections.retain(|c| c.generation == generation && c.client.is_usable());
        let pooled = connections.iter().find(|c| {
            avoid.is_none_or(|a| !Arc::ptr_eq(a, c))
                && c.streams.load(Ordering::Acquire) < self.room(c)
        })?;
        // Slots are only taken under this lock, so the room just seen is
        // still there (a stream ending meanwhile only adds to it).
        pooled.streams.fetch_add(1, Ordering::AcqRel);
        Some(Slot(pooled.clone()))
    }

    /// Dials a connection for `key` and takes its first slot, unless one
    /// made while this waited for the key's dial already has room.
    async fn dial_new(
        &self,
        key: &K,
        peer: &Peer<K>,
        generation: u64,
        avoid: Option<&Arc<Pooled>>,
    ) -> Result<Slot, TunnelError> {
        let asked = Instant::now();
        let _dialing = peer.dialing.lock().await;
        if let Some(slot) = self.checkout(peer, generation, avoid) {
            return Ok(slot);
        }
        if let Some((at, why)) = &*lock(&peer.failed)
            && *at >= asked
        {
            return Err(TunnelError::Dial(io::Error::other(format!(
                "the dial this connect waited for failed: {why}"
            ))));
        }
        let made = async {
            let io = self.dial.dial(key).await.map_err(TunnelError::Dial)?;
            TunnelClient::handshake(io, &self.config.tunnel).await
        };
        let client = match made.await {
            Ok(client) => client,
            Err(e) => {
                *lock(&peer.failed) = Some((Instant::now(), e.to_string()));
                return Err(e);
            }
        };
        let control = self.config.node.clone().map(|node| {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let stopped = async move {
                let _ = stopped.await;
            };
            tokio::spawn(client.clone().control(node, stopped));
            stop
        });
        let pooled = Arc::new(Pooled {
            client,
            generation,
            streams: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
            control,
        });
        lock(&peer.connections).push(pooled.clone());
        Ok(Slot(pooled))
    }

    /// Closes the connections idle for `idle_timeout` and forgets the ones
    /// that can take no stream; returns how many left the pool. Run it
    /// every fraction of the idle timeout.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let idle_timeout = self.config.idle_timeout;
        let mut left = 0;
        write(&self.peers).retain(|_, peer| {
            let mut connections = lock(&peer.connections);
            connections.retain(|c| {
                let idle = c.streams.load(Ordering::Acquire) == 0
                    && now.saturating_duration_since(*lock(&c.idle_since)) >= idle_timeout;
                // Dropping the last handle to an idle connection closes it.
                let keep = !idle && c.client.is_usable();
                left += usize::from(!keep);
                keep
            });
            // A key in use (a connect holds it) stays.
            !connections.is_empty() || Arc::strong_count(peer) > 1
        });
        left
    }

    /// Sweeps every quarter of the idle timeout until `stop` resolves.
    pub async fn sweep_until(&self, stop: impl Future<Output = ()>) {
        let every = (self.config.idle_timeout / 4).max(Duration::from_millis(10));
        let sweeping = async {
            loop {
                tokio::time::sleep(every).await;
                self.sweep();
            }
        };
        tokio::select! {
            () = stop => {}
            () = sweeping => {}
        }
    }

    /// Lets every connection go, and waits (at most `within`) until each
    /// has ended: its last frames (a paused stream's END_STREAM) written
    /// and GOAWAY sent. For the end of the process, which would otherwise
    /// cut them off. Returns how many had not ended in time.
    pub async fn close(&self, within: Duration) -> usize {
        let clients: Vec<TunnelClient> = write(&self.peers)
            .drain()
            .flat_map(|(_, peer)| std::mem::take(&mut *lock(&peer.connections)))
            .map(|pooled| pooled.client.clone())
            .collect();
        let ended: Vec<_> = clients.into_iter().map(TunnelClient::into_ended).collect();
        let deadline = Instant::now() + within;
        loop {
            let open = ended.iter().filter(|e| !e.load(Ordering::Acquire)).count();
            if open == 0 || Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// (connections, streams) the pool holds for `key`.
    pub fn usage(&self, key: &K) -> (usize, usize) {
        let Some(peer) = read(&self.peers).get(key).cloned() else {
            return (0, 0);
        };
        let usage = peer.usage(Instant::now());
        (usage.connections, usage.streams)
    }

    /// Every key's usage.
    pub fn snapshot(&self) -> Vec<(K, PeerUsage)> {
        let now = Instant::now();
        read(&self.peers)
            .iter()
            .map(|(key, peer)| (key.clone(), peer.usage(now)))
            .collect()
    }
}
