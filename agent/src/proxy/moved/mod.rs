//! Connections that move, open, from one agent to the next in an upgrade.
//! The old agent suspends each movable connection's copy where nothing is
//! half done ([`crate::carry::copy::carry`]) and hands its two sockets and
//! a [`MovedRecord`] to the handover stream; the new agent finds the same
//! service, endpoint or workload in its own catalog and carries on from
//! the bytes in hand. Neither end of the connection sees a thing.
//!
//! - `ends`: what each kind of end does as it leaves ([`Movable`]);
//! - `carry`: the copy that stops for a move, and sends the connection on;
//! - a tunnelled connection's stream is paused with its peer agent and
//!   taken up again by the successor (`proxy::paused`).

use std::{
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::Arc,
    time::{Duration, Instant},
};

use log::warn;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use super::{
    ProxyInputs, capture, inbound, outbound,
    paused::{TunnelRecord, rejoin_inbound},
    upstream::Upstream,
};
use crate::{
    carry::copy::Suspended,
    drain::ConnectionGuard,
    handover::Batch,
    tls::session::{SessionState, TlsSession},
};

mod carry;
mod ends;

pub use carry::carry_or_move;
pub use ends::{Leaving, Movable};

/// A suspended connection with its sockets: both, but for a tunnelled
/// one, whose tunnel end the successor opens again ([`MovedRecord::tunnel`]).
#[derive(Debug)]
pub struct Moved {
    /// The accepted connection (the workload's, or the outside client's);
    /// None when it came through a tunnel.
    pub client: Option<OwnedFd>,
    /// The connection the agent opened; None when it is a tunnel stream.
    pub upstream: Option<OwnedFd>,
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
    /// A tunnelled connection's paused stream: the upstream of an outbound
    /// connection, the client of an inbound one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelRecord>,
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
        batch.fds.extend(m.client);
        batch.fds.extend(m.upstream);
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
    let expected: usize = records
        .iter()
        .map(|r| r.sockets().0 as usize + r.sockets().1 as usize)
        .sum();
    if batch.fds.len() != expected {
        return Err(format!(
            "a batch of {} records carries {} descriptors, not {expected}",
            records.len(),
            batch.fds.len()
        ));
    }
    let mut fds = batch.fds.into_iter();
    Ok(records
        .into_iter()
        .map(|record| {
            let (client, upstream) = record.sockets();
            Moved {
                client: client.then(|| fds.next().expect("counted")),
                upstream: upstream.then(|| fds.next().expect("counted")),
                record,
            }
        })
        .collect())
}

impl MovedRecord {
    /// Which sockets it comes with (client, upstream): a tunnelled
    /// connection's tunnel end comes as its record only.
    fn sockets(&self) -> (bool, bool) {
        match (&self.tunnel, &self.kind) {
            (None, _) => (true, true),
            (Some(_), MovedKind::Inbound { .. }) => (false, true),
            (Some(_), _) => (true, false),
        }
    }
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
    #[error("its record does not match its kind (TLS or a tunnel on the wrong side)")]
    Mismatched,
    #[error("its tunnel stream cannot be taken up again: {0}")]
    Tunnel(String),
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
    let sockets = client
        .map(stream)
        .transpose()
        .and_then(|c| Ok((c, upstream.map(stream).transpose()?)));
    let (client, upstream) = match sockets {
        Ok(pair) => pair,
        Err(e) => return not_resumed(&inputs, &record, NotResumed::Socket(e), None),
    };
    let mut record = record;
    let tls = (record.client_tls.take(), record.upstream_tls.take());
    let result = match (&record.kind, tls, client, upstream) {
        (MovedKind::Outbound { .. }, (None, upstream_tls), Some(client), upstream) => {
            let upstream = match (upstream, upstream_tls, &record.tunnel) {
                (Some(up), None, None) => Some(Upstream::Plain(up)),
                (Some(up), Some(state), None) => match TlsSession::resume(up, state) {
                    Ok(session) => Some(Upstream::Tls(Box::new(session))),
                    Err(e) => return not_resumed(&inputs, &record, NotResumed::Tls(e), None),
                },
                // Opened again over a tunnel once the caller is found.
                (None, None, Some(_)) => None,
                _ => return not_resumed(&inputs, &record, NotResumed::Mismatched, None),
            };
            outbound::resume(&inputs, client, upstream, &record, guard).await
        }
        (MovedKind::Captured { workload }, (None, None), Some(client), Some(upstream)) => {
            capture::resume(&inputs, client, upstream, workload, &record, guard).await
        }
        (MovedKind::Inbound { .. }, (Some(state), None), Some(client), Some(upstream)) => {
            match TlsSession::resume(client, state) {
                // Boxed: it holds a TLS session, and every resumed
                // connection's task would otherwise be sized for one.
                Ok(session) => {
                    let resumed = inbound::resume(&inputs, session, upstream, &record, guard, None);
                    Box::pin(resumed).await
                }
                Err(e) => Err((NotResumed::Tls(e), None)),
            }
        }
        (MovedKind::Inbound { .. }, (None, None), None, Some(upstream)) => {
            match Box::pin(rejoin_inbound(&inputs, &record)).await {
                Ok((client, end)) => {
                    let resumed =
                        inbound::resume(&inputs, client, upstream, &record, guard, Some(end));
                    Box::pin(resumed).await
                }
                Err(why) => {
                    let _ = upstream.set_zero_linger();
                    Err((why, None))
                }
            }
        }
        _ => Err((NotResumed::Mismatched, None)),
    };
    if let Err((why, streams)) = result {
        not_resumed(&inputs, &record, why, streams);
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
            tunnel: None,
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
