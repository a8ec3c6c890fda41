//! Tunnelled connections across an upgrade of the agent at either end.
//!
//! The agent that leaves asks its peer, on the tunnel connection's control
//! stream, to pause the connection's stream (`tunnel::control`); both stop
//! their copies where nothing is half moved and end the stream, each
//! holding every byte the other sent. The leaving agent hands its local
//! socket, those bytes and a [`TunnelRecord`] to its successor, as any
//! moved connection. The peer keeps its side (its task, its local socket,
//! its bytes) here, under the pause's token, for [`PARK_TIMEOUT`]: the
//! successor dials the peer presenting the same identity, asks for the
//! same one, and opens a stream carrying the token; the peer's copy goes
//! on over that stream. The applications at both ends see nothing.
//!
//! Both agents may leave at once. When both pause one stream at the same
//! moment, the calling end's pause stands (`TunnelStream::pause`) and the
//! called end's side is kept; a kept side whose own agent leaves before
//! the peer's successor came goes to this agent's successor with a record
//! that says so (`TunnelRecord::park`), and is kept there under the same
//! token. A stream that names a token not kept yet waits for it a moment
//! ([`CLAIM_WAIT`]).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{
    ProxyInputs,
    moved::{Movable, MovedRecord, NotResumed},
    tunnels::TunnelKey,
};
use crate::{
    carry::copy::Progress,
    netns::Netns,
    tls::Identity,
    tunnel::{TunnelStream, control::Token},
};

mod parked;

pub use parked::{CLAIM_WAIT, NotTakenUp, Parked};

/// How long a paused connection waits for the other agent's successor.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(10);

/// Between two tries to take up a paused connection.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Where the agent at the other end of a tunnel stream is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerAgent {
    /// Its inbound address (we dialled it).
    Addr(SocketAddr),
    /// Its node, as its control stream named it (it dialled us); a
    /// successor dials it only if it is a node it knows.
    Node(String),
}

/// Who is at either end of a tunnel connection, shared by all its
/// streams (a stream pays a pointer, not two identities).
#[derive(Debug, Clone)]
pub enum Parties {
    /// We dialled: the pool's key (source and destination identity, the
    /// peer agent's address).
    Dialled(Arc<TunnelKey>),
    /// The peer dialled us: (our identity, as it asked for it by SNI; its
    /// identity, as its certificate proved it). The peer agent's address
    /// is learnt from its control stream at a move.
    Called(Arc<(Identity, Identity)>),
}

/// What a tunnelled connection's stream joins: enough for a successor to
/// dial the same peer with the same identities, and for a paused side to
/// know its successor.
#[derive(Debug, Clone)]
pub struct TunnelEnd {
    pub parties: Parties,
    /// The CONNECT's target: the endpoint on the called end's node.
    pub target: SocketAddr,
}

impl TunnelEnd {
    /// This end's identity: the certificate a successor presents.
    pub fn local(&self) -> &Identity {
        match &self.parties {
            Parties::Dialled(key) => &key.source,
            Parties::Called(ids) => &ids.0,
        }
    }

    /// The other end's: what a successor asks for, and what a stream that
    /// takes up a paused one must present.
    pub fn remote(&self) -> &Identity {
        match &self.parties {
            Parties::Dialled(key) => &key.dest,
            Parties::Called(ids) => &ids.1,
        }
    }

    /// The other end's agent, when we dialled it.
    pub fn peer(&self) -> Option<SocketAddr> {
        match &self.parties {
            Parties::Dialled(key) => Some(key.node),
            Parties::Called(_) => None,
        }
    }
}

/// A tunnelled connection's part in moves, boxed beside its copy (a
/// connection without a tunnel pays a pointer): its parties, where the
/// peer's pause arrives, and the pause's token once it came.
#[derive(Debug)]
pub struct TunnelSide {
    pub end: TunnelEnd,
    pub(super) paused: Option<oneshot::Receiver<Token>>,
    pub(super) token: Option<Token>,
}

impl TunnelSide {
    pub fn new(end: TunnelEnd) -> Box<TunnelSide> {
        Box::new(TunnelSide {
            end,
            paused: None,
            token: None,
        })
    }
}

/// A moved tunnelled connection, as its record carries it: how the
/// successor takes it up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelRecord {
    /// The pause's token, in hex. It is a capability: the record travels
    /// only on the handover stream, and is never logged.
    pub token: String,
    pub local: String,
    pub remote: String,
    pub peer: PeerAgent,
    pub target: SocketAddr,
    /// The other way round: both agents left at once and the peer's pause
    /// stood, so the successor keeps this side under the peer's `token`
    /// for the peer's successor, rather than dial with it. Left out when
    /// false, so a record reads the same to an agent that knows no parks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub park: bool,
}

impl std::fmt::Display for TunnelRecord {
    // Without the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {} ({}) through {:?}",
            self.local, self.remote, self.target, self.peer
        )
    }
}

/// How a paused side's wait ended.
pub(super) enum Answered {
    /// The peer's successor took it up; where the next pause arrives.
    TakenUp(Option<oneshot::Receiver<Token>>),
    /// It did, as this agent began to leave (`moving` fired, and is
    /// spent): the connection moves at once, on the new stream.
    TakenUpLeaving(Option<oneshot::Receiver<Token>>),
    /// This agent leaves (`moving` fired) before it did: the side goes to
    /// this agent's successor, to wait there under the same token.
    Leaving(Token),
}

/// The peer agent paused this connection's tunnel stream under `token`:
/// stops it where both ends hold every byte (the bytes read meanwhile
/// join the copy's), keeps the rest of the connection here, and waits for
/// the peer's successor to take it up, or for this agent to leave
/// (`moving`). Err when the connection cannot go on (it is reset).
pub(super) async fn answer<C: Movable, U: Movable>(
    inputs: &ProxyInputs,
    (client, upstream): (&mut C, &mut U),
    progress: &mut Progress,
    token: Token,
    end: &TunnelEnd,
    moving: Option<&mut oneshot::Receiver<()>>,
) -> Result<Answered, ()> {
    // Parked before the stream is quiesced: the successor's stream comes
    // on another connection, and may arrive before the paused stream's
    // last frames do. It waits in the lot until they have.
    let mut successor = inputs.parked.park(token, end);
    let (up, down) = (client.answer_pause().await, upstream.answer_pause().await);
    let (Ok(up), Ok(down)) = (up, down) else {
        inputs.parked.unpark(&token);
        warn!(
            "upgrade: the tunnel stream to {} failed while the peer agent paused it",
            end.target
        );
        return Err(());
    };
    progress.add_read(true, &up);
    progress.add_read(false, &down);
    // A move signal whose sender went away never fires.
    let leaving = async {
        let told = match moving {
            Some(moving) => moving.await.is_ok(),
            None => false,
        };
        if !told {
            std::future::pending::<()>().await;
        }
    };
    let mut leaves = false;
    let taken = tokio::select! {
        // A stream that claimed the connection wins over a leave that
        // came at the same time.
        biased;
        taken = &mut successor => taken.ok(),
        () = leaving => {
            if inputs.parked.unpark(&token) {
                return Ok(Answered::Leaving(token));
            }
            leaves = true;
            (&mut successor).await.ok()
        }
        () = tokio::time::sleep(PARK_TIMEOUT) => {
            inputs.parked.give_up(&token, &mut successor).await
        }
    };
    let Some(mut stream) = taken else {
        inputs.metrics.handover_connection("dropped");
        warn!(
            "upgrade: the peer agent's successor did not take up the connection {} -> {} ({}) \
             within {PARK_TIMEOUT:?}; reset",
            end.remote(),
            end.local(),
            end.target
        );
        return Err(());
    };
    let pause = stream.take_pause();
    let stream = client.take_up(stream).err();
    if let Some(stream) = stream
        && upstream.take_up(stream).is_err()
    {
        unreachable!("a paused connection has a tunnel stream at one end");
    }
    inputs.metrics.handover_connection("taken_up");
    match leaves {
        true => Ok(Answered::TakenUpLeaving(pause)),
        false => Ok(Answered::TakenUp(pause)),
    }
}

/// Keeps a connection whose side the previous agent held paused for the
/// peer agent's successor (both agents left at once, or this one left
/// while it waited), under the peer's token, here: the stream that takes
/// it up, once the peer's successor opens it.
async fn wait_parked(
    inputs: &ProxyInputs,
    tunnel: &TunnelRecord,
) -> Result<(TunnelStream, Box<TunnelSide>), NotResumed> {
    let (local, remote, token) = read(tunnel)?;
    // The peer's successor dialled this side's node: from here on this
    // agent is the called end.
    let end = TunnelEnd {
        parties: Parties::Called(Arc::new((local, remote))),
        target: tunnel.target,
    };
    let mut successor = inputs.parked.park(token, &end);
    let taken = match tokio::time::timeout(PARK_TIMEOUT, &mut successor).await {
        Ok(taken) => taken.ok(),
        Err(_) => inputs.parked.give_up(&token, &mut successor).await,
    };
    let Some(stream) = taken else {
        return Err(NotResumed::Tunnel(format!(
            "the peer agent's successor did not take it up within {PARK_TIMEOUT:?}"
        )));
    };
    inputs.metrics.handover_connection("taken_up");
    Ok((stream, TunnelSide::new(end)))
}

/// A record's identities (this end's, the other's) and token.
fn read(tunnel: &TunnelRecord) -> Result<(Identity, Identity, Token), NotResumed> {
    let failed = |why: &str| NotResumed::Tunnel(why.to_owned());
    let (Ok(local), Ok(remote)) = (
        Identity::parse(&tunnel.local),
        Identity::parse(&tunnel.remote),
    ) else {
        return Err(failed("its identities do not read"));
    };
    let token = Token::from_hex(&tunnel.token).ok_or_else(|| failed("its token does not read"))?;
    Ok((local, remote, token))
}

/// The tunnel stream an outbound connection goes on over: the successor
/// dials the peer agent, from the caller's namespace (`netns`); or, for a
/// side kept for the peer's successor, waits for it. The peer is named by
/// its node when a side kept here was taken up by a stream it dialled.
pub(super) async fn rejoin_outbound(
    inputs: &ProxyInputs,
    tunnel: &TunnelRecord,
    netns: Option<Arc<Netns>>,
) -> Result<(TunnelStream, Box<TunnelSide>), NotResumed> {
    if tunnel.park {
        return wait_parked(inputs, tunnel).await;
    }
    let node = peer_address(inputs, &tunnel.peer)?;
    rejoin(inputs, tunnel, node, netns).await
}

/// The tunnel stream an inbound connection goes on over: the successor
/// dials the calling agent's node (one this agent knows), presenting the
/// workload's identity and asking for the caller's, with the token.
pub(super) async fn rejoin_inbound(
    inputs: &ProxyInputs,
    record: &MovedRecord,
) -> Result<(TunnelStream, Box<TunnelSide>), NotResumed> {
    let tunnel = record.tunnel.as_ref().expect("matched as tunnelled");
    if tunnel.park {
        return wait_parked(inputs, tunnel).await;
    }
    let node = peer_address(inputs, &tunnel.peer)?;
    rejoin(inputs, tunnel, node, None).await
}

/// Where the peer agent's inbound port is: as the record has it, or its
/// node's, as the catalog knows it.
fn peer_address(inputs: &ProxyInputs, peer: &PeerAgent) -> Result<SocketAddr, NotResumed> {
    let node = match peer {
        PeerAgent::Addr(addr) => Some(*addr),
        PeerAgent::Node(name) => inputs.catalog.load().peer_agent(name),
    };
    node.ok_or_else(|| NotResumed::Tunnel(format!("the peer agent's node {peer:?} is not known")))
}

/// Opens the stream that takes up a paused tunnel stream: to the same peer
/// agent, with the same identities, carrying the token. Tried again, on
/// another connection, until [`PARK_TIMEOUT`]: when both agents leave at
/// once, the first try can reach the peer's predecessor (it still accepts
/// while it hands over), which no longer keeps the connection and answers
/// 410 once [`CLAIM_WAIT`] is over; its GOAWAY sends the next try to the
/// successor, which does.
async fn rejoin(
    inputs: &ProxyInputs,
    tunnel: &TunnelRecord,
    node: SocketAddr,
    netns: Option<Arc<Netns>>,
) -> Result<(TunnelStream, Box<TunnelSide>), NotResumed> {
    let failed = |why: String| NotResumed::Tunnel(why);
    let (local, remote, token) = read(tunnel)?;
    let Some(tunnels) = inputs.tunnels.get() else {
        return Err(failed("tunnels are off in this agent".into()));
    };
    let key = TunnelKey {
        source: local,
        netns,
        node,
        dest: remote,
    };
    // An answer can take a connect and the peer's wait for the token.
    let attempt = inputs.connect_timeout + CLAIM_WAIT + RETRY_PAUSE;
    let deadline = tokio::time::Instant::now() + PARK_TIMEOUT;
    let (stream, key) = loop {
        let rejoined = tunnels.rejoin(&key, tunnel.target, token);
        let why = match tokio::time::timeout(attempt, rejoined).await {
            Ok(Ok(opened)) => break opened,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer from {node} in {attempt:?}"),
        };
        if tokio::time::Instant::now() + RETRY_PAUSE + attempt > deadline {
            return Err(failed(why));
        }
        debug!("upgrade: taking up a paused connection at {node}: {why}; trying again");
        tokio::time::sleep(RETRY_PAUSE).await;
    };
    let end = TunnelEnd {
        parties: Parties::Dialled(key),
        target: tunnel.target,
    };
    Ok((stream, TunnelSide::new(end)))
}
