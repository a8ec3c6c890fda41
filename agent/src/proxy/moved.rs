//! Connections that move, open, from one agent to the next in an upgrade.
//! The old agent suspends each movable connection's copy where nothing is
//! half done ([`crate::carry::copy::carry`]) and hands its two sockets and
//! a [`MovedRecord`] to the handover stream; the new agent finds the same
//! service, endpoint or workload in its own catalog and carries on from
//! the bytes in hand. Neither end of the connection sees a thing.

use std::{
    io,
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::Arc,
    time::{Duration, Instant},
};

use log::warn;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use super::{
    ProxyInputs, capture,
    connections::{Callee, Caller, LiveConnection},
    inbound,
    lifecycle::ConnectionLife,
    outbound,
    upstream::Upstream,
};
use crate::{
    carry::copy::{Carried, CopyEnd, Duplex, Limits, Progress, Suspended},
    drain::ConnectionGuard,
    handover::Batch,
    tls::session::{SessionState, TlsSession},
    tunnel::TunnelStream,
};

/// A suspended connection with its sockets.
#[derive(Debug)]
pub struct Moved {
    /// The accepted connection (the workload's, or the outside client's).
    pub client: OwnedFd,
    /// The connection the agent opened.
    pub upstream: OwnedFd,
    pub record: MovedRecord,
}

/// What the next agent needs to carry a connection on: who and what it
/// is, where the copy stood, what was counted. Plain data; it crosses the
/// handover stream as JSON.
#[derive(Debug, Serialize, Deserialize)]
pub struct MovedRecord {
    pub kind: MovedKind,
    /// The client's end of the accepted connection.
    pub client: SocketAddr,
    /// The endpoint (through a peer agent for a mesh connection).
    pub upstream: SocketAddr,
    pub copy: Suspended,
    /// The TLS session of the accepted connection (an inbound one from a
    /// peer agent), or of the one the agent opened (to a peer agent). It
    /// holds the session's secrets: it travels only on the handover
    /// stream, which only this node's agent can reach, and is never
    /// logged.
    pub client_tls: Option<SessionState>,
    pub upstream_tls: Option<SessionState>,
    /// Bytes carried so far, client to upstream and back.
    pub sent: u64,
    pub received: u64,
    /// How long ago the connection was accepted.
    pub age_ms: u64,
}

/// Which handler carried the connection, and what it needs to find again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MovedKind {
    /// A workload's connection to a service (outbound).
    Outbound {
        /// The service's virtual address, and its name to check it is
        /// still the same service.
        vip: SocketAddr,
        namespace: String,
        service: String,
        /// The calling workload's name, when it is a known one.
        caller: Option<String>,
    },
    /// A connection from outside the mesh to a captured workload.
    Captured { workload: String },
    /// A peer agent's mTLS connection to a workload endpoint of this node.
    Inbound {
        /// The caller's SPIFFE ID, as its certificate proved it.
        caller: String,
        workload: String,
        target: SocketAddr,
    },
}

/// One end of a proxied connection, as it leaves for the next agent: its
/// socket, and its TLS session's state if it has one.
pub trait Movable: Duplex + Sized {
    fn into_moving(self) -> impl Future<Output = io::Result<(TcpStream, Option<SessionState>)>>;
}

impl Movable for TcpStream {
    async fn into_moving(self) -> io::Result<(TcpStream, Option<SessionState>)> {
        Ok((self, None))
    }
}

impl Movable for TlsSession {
    async fn into_moving(self) -> io::Result<(TcpStream, Option<SessionState>)> {
        // Writes what was sealed and not yet written: no record is left
        // half sent.
        let (tcp, state) = self.suspend().await?;
        Ok((tcp, Some(state)))
    }
}

impl Movable for TunnelStream {
    async fn into_moving(self) -> io::Result<(TcpStream, Option<SessionState>)> {
        // Its HTTP/2 connection's state is not ours to hand over, so a
        // tunnelled connection is listed as not movable and finishes in
        // the agent that carries it; this is never reached.
        Err(io::Error::other(
            "a stream of a tunnel connection cannot move to another agent",
        ))
    }
}

impl MovedRecord {
    /// When the connection was accepted, on this process's clock.
    pub fn accepted(&self) -> tokio::time::Instant {
        let age = Duration::from_millis(self.age_ms);
        tokio::time::Instant::from_std(Instant::now().checked_sub(age).unwrap_or_else(Instant::now))
    }
}

/// Moved connections as the handover stream carries them (at most
/// [`crate::handover::MAX_BATCH`] at once).
pub fn pack(moved: Vec<Moved>) -> Batch {
    let mut batch = Batch::default();
    let mut records = Vec::with_capacity(moved.len());
    for m in moved {
        batch.fds.push(m.client);
        batch.fds.push(m.upstream);
        records.push(m.record);
    }
    batch.records = serde_json::to_vec(&records).expect("records serialize");
    batch
}

/// The moved connections of a batch; an error names what does not add up
/// (the batch's descriptors are closed with it).
pub fn unpack(batch: Batch) -> Result<Vec<Moved>, String> {
    let records: Vec<MovedRecord> = serde_json::from_slice(&batch.records)
        .map_err(|e| format!("the records of a batch do not read: {e}"))?;
    if batch.fds.len() != 2 * records.len() {
        return Err(format!(
            "a batch of {} records carries {} descriptors, not two each",
            records.len(),
            batch.fds.len()
        ));
    }
    let mut fds = batch.fds.into_iter();
    Ok(records
        .into_iter()
        .map(|record| Moved {
            client: fds.next().expect("counted"),
            upstream: fds.next().expect("counted"),
            record,
        })
        .collect())
}

/// Why a moved connection could not be carried on here.
#[derive(Debug, thiserror::Error)]
pub enum NotResumed {
    #[error("service {namespace}/{service} ({vip}) is not in this agent's catalog")]
    NoService {
        vip: SocketAddr,
        namespace: String,
        service: String,
    },
    #[error("service {service}: endpoint {endpoint} is not in this agent's catalog")]
    NoEndpoint {
        service: String,
        endpoint: SocketAddr,
    },
    #[error("workload {0} is not in this agent's catalog")]
    NoWorkload(String),
    #[error("its sockets: {0}")]
    Socket(std::io::Error),
    #[error("its TLS session: {0}")]
    Tls(std::io::Error),
    #[error("its record does not match its kind (TLS on the wrong side)")]
    Mismatched,
}

/// What a handler that cannot carry a moved connection on hands back: why,
/// and the sockets to reset when it still has them as plain streams.
pub type NotCarried = (NotResumed, Option<(TcpStream, TcpStream)>);

/// Carries a moved connection on until it ends (or moves again), counted
/// by `guard`. One that cannot be carried on is reset on both sides, so
/// neither end waits on it.
pub async fn resume(inputs: Arc<ProxyInputs>, moved: Moved, guard: ConnectionGuard) {
    let Moved {
        client,
        upstream,
        record,
    } = moved;
    let sockets = stream(client).and_then(|c| Ok((c, stream(upstream)?)));
    let (client, upstream) = match sockets {
        Ok(pair) => pair,
        Err(e) => return not_resumed(&inputs, &record, NotResumed::Socket(e), None),
    };
    let mut record = record;
    let tls = (record.client_tls.take(), record.upstream_tls.take());
    let result = match (&record.kind, tls) {
        (MovedKind::Outbound { .. }, (None, upstream_tls)) => {
            let upstream = match upstream_tls {
                None => Upstream::Plain(upstream),
                Some(state) => match TlsSession::resume(upstream, state) {
                    Ok(session) => Upstream::Tls(Box::new(session)),
                    Err(e) => return not_resumed(&inputs, &record, NotResumed::Tls(e), None),
                },
            };
            outbound::resume(&inputs, client, upstream, &record, guard).await
        }
        (MovedKind::Captured { workload }, (None, None)) => {
            capture::resume(&inputs, client, upstream, workload, &record, guard).await
        }
        (MovedKind::Inbound { .. }, (Some(state), None)) => match TlsSession::resume(client, state)
        {
            // Boxed: it holds a TLS session, and every resumed
            // connection's task would otherwise be sized for one.
            Ok(session) => {
                Box::pin(inbound::resume(&inputs, session, upstream, &record, guard)).await
            }
            Err(e) => Err((NotResumed::Tls(e), None)),
        },
        _ => Err((NotResumed::Mismatched, None)),
    };
    if let Err((why, streams)) = result {
        not_resumed(&inputs, &record, why, streams);
    }
}

/// Copies until the connection ends, and returns how; or, when the agent
/// hands its connections over, suspends the copy and sends the connection
/// on, and returns nothing.
// Not an `async fn`: that would keep a second copy of every argument in
// the future, and this future is every connection's.
pub fn carry_or_move<'a, C: Movable + 'a, U: Movable + 'a>(
    inputs: &'a ProxyInputs,
    mut client: C,
    mut upstream: U,
    mut life: ConnectionLife<'a>,
    limits: Limits,
    from: Suspended,
) -> impl Future<Output = Option<CopyEnd>> + 'a {
    let mut progress = Progress::from(from);
    async move {
        let (bytes, moving) = life.copy_parts();
        let carried = progress
            .carry(&mut client, &mut upstream, &limits, bytes, moving)
            .await;
        match carried {
            Carried::Ended(end) => {
                life.close(end.into());
                Some(end)
            }
            Carried::Suspended => {
                let copy = progress.into_suspended();
                // Boxed: it runs once, at a handover, and every
                // connection's task would otherwise carry its space.
                Box::pin(send_on(inputs, client, upstream, life, copy)).await;
                None
            }
        }
    }
}

/// Takes a suspended connection's ends off this agent (a TLS session
/// first writes what it had sealed) and hands them, with their record, to
/// whoever sends them to the next agent.
async fn send_on<C: Movable, U: Movable>(
    inputs: &ProxyInputs,
    client: C,
    upstream: U,
    life: ConnectionLife<'_>,
    copy: Suspended,
) {
    let (sent, received) = life.bytes().totals();
    let kind = kind_of(life.connection());
    let (client, upstream) = match (client.into_moving().await, upstream.into_moving().await) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (client, upstream) => {
            warn!(
                "upgrade: a connection cannot leave its TLS session in a state to move: {:?} {:?}; closed",
                client.err(),
                upstream.err()
            );
            life.close(crate::telemetry::CloseReason::ClientError);
            return;
        }
    };
    let ((client, client_tls), (upstream, upstream_tls)) = (client, upstream);
    // The addresses as listed: the endpoint's, not the peer agent's a
    // mesh connection goes through.
    let (client_addr, endpoint) = life.addresses();
    let record = MovedRecord {
        kind,
        client: client_addr,
        upstream: endpoint,
        copy,
        client_tls,
        upstream_tls,
        sent,
        received,
        age_ms: life.age().as_millis() as u64,
    };
    life.hand_over();
    match (client.into_std(), upstream.into_std()) {
        (Ok(client), Ok(upstream)) => {
            inputs.metrics.handover_connection("sent");
            inputs.connections.move_out(Moved {
                client: client.into(),
                upstream: upstream.into(),
                record,
            });
        }
        (client, upstream) => {
            // Cannot happen for a stream the runtime registered; if it
            // does, both ends learn at once.
            warn!(
                "upgrade: cannot take the connection {} -> {} off the runtime: {:?} {:?}; closed",
                record.client,
                record.upstream,
                client.err(),
                upstream.err()
            );
        }
    }
}

/// What a listed connection is, as the next agent finds it again.
fn kind_of(c: &LiveConnection) -> MovedKind {
    match (&c.caller, &c.callee) {
        (Caller::Workload(caller), Callee::Service { service, .. }) => MovedKind::Outbound {
            vip: service.vip,
            namespace: service.namespace.clone(),
            service: service.name.clone(),
            caller: caller.as_ref().map(|w| w.name.clone()),
        },
        (Caller::Peer(caller), Callee::Workload(w)) => MovedKind::Inbound {
            caller: caller.to_string(),
            workload: w.name.clone(),
            target: c.endpoint,
        },
        (_, Callee::Workload(w)) => MovedKind::Captured {
            workload: w.name.clone(),
        },
        // No handler lists a service callee for any other caller.
        (_, Callee::Service { service, .. }) => MovedKind::Outbound {
            vip: service.vip,
            namespace: service.namespace.clone(),
            service: service.name.clone(),
            caller: None,
        },
    }
}

fn stream(fd: OwnedFd) -> std::io::Result<TcpStream> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

fn not_resumed(
    inputs: &ProxyInputs,
    record: &MovedRecord,
    why: NotResumed,
    streams: Option<(TcpStream, TcpStream)>,
) {
    inputs.metrics.handover_connection("dropped");
    warn!(
        "upgrade: the connection {} -> {} moved here but cannot go on: {why}; reset",
        record.client, record.upstream
    );
    if let Some((client, upstream)) = streams {
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carry::copy::WayState;

    #[test]
    fn a_record_crosses_as_json_unchanged() {
        let record = MovedRecord {
            kind: MovedKind::Outbound {
                vip: "10.96.0.10:8080".parse().unwrap(),
                namespace: "shop".into(),
                service: "payments".into(),
                caller: Some("checkout".into()),
            },
            client: "127.0.0.1:40000".parse().unwrap(),
            upstream: "127.0.0.1:9001".parse().unwrap(),
            client_tls: None,
            upstream_tls: None,
            copy: Suspended {
                up: WayState {
                    pending: b"half a request".to_vec(),
                    finished: false,
                },
                down: WayState {
                    pending: Vec::new(),
                    finished: true,
                },
                quiet_ms: 1500,
            },
            sent: 1234,
            received: 99,
            age_ms: 4200,
        };
        let json = serde_json::to_string(&record).unwrap();
        let back: MovedRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
        assert_eq!(back.kind, record.kind);
        assert_eq!(back.copy, record.copy);
        let accepted = record.accepted();
        let age = accepted.elapsed();
        assert!(age >= Duration::from_millis(4200), "{age:?}");
    }
}
