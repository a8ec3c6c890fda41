//! The tunnels this agent opens to peer agents for its workloads' mTLS
//! connections (`mesh.tunnels.enabled`): one pool per source identity,
//! source network namespace, peer node and destination identity, so an
//! application connection costs a stream, not a TLS handshake.
//!
//! A pool connection presents the source identity's certificate and asks
//! for the destination identity by SNI, exactly as a per-connection mTLS
//! dial does: the peer agent checks both once per pool connection, and
//! authorization once per stream. Two identities never share a connection
//! because the certificate is chosen by the key.
//!
//! The TCP connect and the TLS handshake run on the handshake runtime (the
//! inbound listener's), never on the data-plane workers that copy bytes.

use std::{
    hash::{Hash, Hasher},
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use http::{HeaderMap, HeaderValue};
use rustls_pki_types::ServerName;

use super::upstream::handshake_apart;
use crate::{
    connect::{connect_marked, limit_unsent},
    netns::Netns,
    telemetry::{
        Metrics,
        tunnels::{OpenTunnel, Side},
    },
    tls::{Identity, TlsContext, session::TlsSession},
    tunnel::{
        Dial, Guarded, PeerUsage, Pool, PoolConfig, TunnelError, TunnelStream,
        control::{RESUME_HEADER, STAYS_HEADER, Token},
    },
};

/// What one pool of tunnel connections is for.
#[derive(Debug, Clone)]
pub struct TunnelKey {
    pub source: Identity,
    /// The network namespace the caller's connections leave from (its
    /// pod's), so a tunnel carries one pod's traffic from its own address.
    pub netns: Option<Arc<Netns>>,
    /// The peer node agent's inbound address.
    pub node: SocketAddr,
    pub dest: Identity,
}

impl TunnelKey {
    fn netns_path(&self) -> Option<&std::path::Path> {
        self.netns.as_deref().map(Netns::path)
    }
}

impl PartialEq for TunnelKey {
    fn eq(&self, other: &TunnelKey) -> bool {
        self.source == other.source
            && self.node == other.node
            && self.dest == other.dest
            && self.netns_path() == other.netns_path()
    }
}

impl Eq for TunnelKey {}

impl Hash for TunnelKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.source.hash(state);
        self.node.hash(state);
        self.dest.hash(state);
        self.netns_path().hash(state);
    }
}

/// The ALPN protocol id of a tunnel connection (HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";

/// Unsent bytes a tunnel connection's socket may queue (both ends): see
/// [`limit_unsent`]. Measured with the bench's head-of-line row.
pub const UNSENT_LIMIT: u32 = 32 * 1024;

/// Dials tunnel connections: a marked TCP connect from the caller's
/// namespace and a TLS handshake presenting the source identity.
pub struct MeshDial {
    tls: Arc<TlsContext>,
    mark: u32,
    timeout: Duration,
    /// Where handshakes run; None runs them where the connect is.
    handshakes: Option<tokio::runtime::Handle>,
    metrics: Arc<Metrics>,
}

impl Dial<TunnelKey> for MeshDial {
    /// Counted as an open tunnel connection until h2 drops it.
    type Io = Guarded<TlsSession, OpenTunnel>;

    fn generation(&self, key: &TunnelKey) -> u64 {
        self.tls
            .store
            .get(&key.source)
            .and_then(|c| c.installed.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64)
    }

    async fn dial(&self, key: &TunnelKey) -> io::Result<Self::Io> {
        let Some(config) = self.tls.tunnel_client_config(&key.source) else {
            return Err(io::Error::other(format!(
                "no certificate for the caller's identity {} yet",
                key.source
            )));
        };
        let name = ServerName::try_from(key.dest.server_name())
            .map_err(|_| {
                io::Error::other(format!(
                    "the endpoint's identity {} makes no valid server name",
                    key.dest
                ))
            })?
            .to_owned();
        let (node, mark, timeout) = (key.node, self.mark, self.timeout);
        let netns = key.netns.clone();
        let handshake = async move {
            let tcp = connect_marked(node, mark, timeout, netns.as_deref()).await?;
            limit_unsent(&tcp, UNSENT_LIMIT)?;
            let session = TlsSession::client(config, name, tcp).await?;
            if session.alpn_protocol() != Some(ALPN_H2) {
                return Err(io::Error::other(format!(
                    "the agent at {node} does not speak tunnels (no ALPN h2)"
                )));
            }
            Ok(session)
        };
        let what = format!("tunnel connection to {node}");
        let session = handshake_apart(self.handshakes.as_ref(), timeout, what, handshake).await?;
        let resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let open = self.metrics.tunnels.connection(Side::Client, resumed);
        Ok(Guarded::new(session, open))
    }
}

/// The agent's outbound tunnel pools.
pub struct Tunnels {
    pool: Pool<TunnelKey, MeshDial>,
    metrics: Arc<Metrics>,
}

impl Tunnels {
    pub fn new(
        tls: Arc<TlsContext>,
        metrics: Arc<Metrics>,
        mark: u32,
        timeout: Duration,
        handshakes: Option<tokio::runtime::Handle>,
        config: PoolConfig,
    ) -> Tunnels {
        let dial = MeshDial {
            tls,
            mark,
            timeout,
            handshakes,
            metrics: metrics.clone(),
        };
        Tunnels {
            pool: Pool::new(dial, config),
            metrics,
        }
    }

    /// A stream to `target` (a workload endpoint on the key's node),
    /// carrying HBONE's `forwarded` header with the caller's address; and
    /// the key as the pool keeps it (one copy shared by its streams).
    pub async fn connect(
        &self,
        key: &TunnelKey,
        target: SocketAddr,
        caller: std::net::IpAddr,
        carries: Carries,
    ) -> Result<(TunnelStream, Arc<TunnelKey>), TunnelError> {
        let mut headers = HeaderMap::new();
        if let Ok(forwarded) = HeaderValue::try_from(format!("for=\"{caller}\"")) {
            headers.insert(http::header::FORWARDED, forwarded);
        }
        if carries == Carries::Requests {
            headers.insert(STAYS_HEADER, HeaderValue::from_static("1"));
        }
        let opened = self.pool.connect_keyed(key, target, headers).await?;
        self.metrics.tunnels.stream_opened(Side::Client);
        Ok(opened)
    }

    /// A stream that takes up a connection the peer agent keeps paused
    /// under `token` (this agent's predecessor paused it): to `target`,
    /// on a connection of `key` (the same identities as before).
    pub async fn rejoin(
        &self,
        key: &TunnelKey,
        target: SocketAddr,
        token: Token,
    ) -> Result<(TunnelStream, Arc<TunnelKey>), TunnelError> {
        let mut headers = HeaderMap::new();
        let token = HeaderValue::try_from(token.to_hex()).expect("hex is a header value");
        headers.insert(RESUME_HEADER, token);
        let opened = self.pool.connect_keyed(key, target, headers).await?;
        self.metrics.tunnels.stream_opened(Side::Client);
        Ok(opened)
    }

    /// Closes idle pool connections until `stop` resolves.
    pub async fn sweep_until(&self, stop: impl Future<Output = ()>) {
        self.pool.sweep_until(stop).await
    }

    /// Lets every pool connection go and waits, at most `within`, for
    /// each to write its last frames; how many did not in time.
    pub async fn close(&self, within: Duration) -> usize {
        self.pool.close(within).await
    }

    /// Every pool and what it holds, for the admin view.
    pub fn snapshot(&self) -> Vec<(TunnelKey, PeerUsage)> {
        self.pool.snapshot()
    }
}

/// What a tunnel stream carries, which decides what becomes of it when
/// the peer agent is upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carries {
    /// A workload's connection, byte for byte: the peer pauses it and its
    /// successor takes it up.
    Connection,
    /// This agent's requests (an upstream HTTP connection of the request
    /// path): it stays in the peer agent that accepted it, and this agent
    /// stops sending requests on it once that peer goes away (its GOAWAY);
    /// the requests in flight are answered there.
    Requests,
}
