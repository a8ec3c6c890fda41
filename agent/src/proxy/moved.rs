//! Connections that move, open, from one agent to the next in an upgrade.
//! The old agent suspends each movable connection's copy where nothing is
//! half done ([`crate::carry::copy::carry`]) and hands its two sockets and
//! a [`MovedRecord`] to the handover stream; the new agent finds the same
//! service, endpoint or workload in its own catalog and carries on from
//! the bytes in hand. Neither end of the connection sees a thing.

use std::{
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::Arc,
    time::{Duration, Instant},
};

use log::warn;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use super::{ProxyInputs, capture, lifecycle::ConnectionLife, outbound};
use crate::{
    carry::copy::{Carried, CopyEnd, Limits, Suspended, carry},
    drain::ConnectionGuard,
    handover::Batch,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedRecord {
    pub kind: MovedKind,
    /// The client's end of the accepted connection.
    pub client: SocketAddr,
    /// The address the agent connected to.
    pub upstream: SocketAddr,
    pub copy: Suspended,
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
}

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
    let result = match &record.kind {
        MovedKind::Outbound { .. } => {
            outbound::resume(&inputs, client, upstream, &record, guard).await
        }
        MovedKind::Captured { workload } => {
            capture::resume(&inputs, client, upstream, workload, &record, guard).await
        }
    };
    if let Err((why, streams)) = result {
        not_resumed(&inputs, &record, why, Some(streams));
    }
}

/// Copies until the connection ends, and returns how; or, when the agent
/// hands its connections over, suspends the copy and sends the connection
/// on (`kind` says what it is), and returns nothing.
pub async fn carry_or_move(
    inputs: &ProxyInputs,
    mut client: TcpStream,
    mut upstream: TcpStream,
    mut life: ConnectionLife<'_>,
    limits: Limits,
    from: Suspended,
    kind: MovedKind,
) -> Option<CopyEnd> {
    let (bytes, moving) = life.copy_parts();
    let copy = match carry(&mut client, &mut upstream, limits, bytes, from, moving).await {
        Carried::Ended(end) => {
            life.close(end.into());
            return Some(end);
        }
        Carried::Suspended(copy) => copy,
    };
    let (sent, received) = life.bytes().totals();
    let record = MovedRecord {
        kind,
        client: client
            .peer_addr()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
        upstream: upstream
            .peer_addr()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
        copy,
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
    None
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
            copy: Suspended {
                up: WayState {
                    pending: b"half a request".to_vec(),
                    finished: false,
                },
                down: WayState {
                    pending: Vec::new(),
                    finished: true,
                },
            },
            sent: 1234,
            received: 99,
            age_ms: 4200,
        };
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<MovedRecord>(&json).unwrap(), record);
        let accepted = record.accepted();
        let age = accepted.elapsed();
        assert!(age >= Duration::from_millis(4200), "{age:?}");
    }
}
