//! The copy of a connection that can move: it stops where nothing is half
//! done when the agent hands over (or when the peer agent of a tunnelled
//! one pauses it), and a stopped one is sent on.

use std::{os::fd::OwnedFd, pin::Pin, task::Poll};

use log::warn;
use tokio::{net::TcpStream, sync::oneshot};

use super::{Leaving, Movable, Moved, MovedKind, MovedRecord};
use crate::{
    carry::copy::{Carried, CopyEnd, Limits, Progress, Suspended},
    proxy::{
        ProxyInputs,
        connections::{Callee, Caller, LiveConnection},
        lifecycle::ConnectionLife,
        paused::{self, Answered, PeerAgent, TunnelRecord, TunnelSide},
    },
    tunnel::control::Token,
};

/// Copies until the connection ends, and returns how; or, when the agent
/// hands its connections over, suspends the copy and sends the connection
/// on, and returns nothing. A tunnelled connection (`tunnel`: its tunnel
/// end's parties) also stops when the peer agent pauses its stream for
/// its own upgrade, waits here for the peer's successor, and goes on.
// Not an `async fn`: that would keep a second copy of every argument in
// the future, and this future is every connection's.
pub fn carry_or_move<'a, C: Movable + 'a, U: Movable + 'a>(
    inputs: &'a ProxyInputs,
    mut client: C,
    mut upstream: U,
    mut life: ConnectionLife<'a>,
    limits: Limits,
    from: Suspended,
    mut tunnel: Option<Box<TunnelSide>>,
) -> impl Future<Output = Option<CopyEnd>> + 'a {
    let mut progress = Progress::from(from);
    async move {
        if let Some(side) = &mut tunnel {
            side.paused = client.take_pause().or_else(|| upstream.take_pause());
        }
        'carry: loop {
            // In a block of their own: what the copy's wait holds is not
            // kept beside the later waits of the iteration.
            let (carried, moving_gone) = {
                let mut stop = Stop::default();
                let (bytes, moving) = life.copy_parts();
                let stopped = stop.on(moving, tunnel.as_deref_mut());
                let carried = progress
                    .carry(&mut client, &mut upstream, &limits, bytes, stopped)
                    .await;
                (carried, stop.moving_gone)
            };
            if let Carried::Ended(end) = carried {
                life.close(end.into());
                return Some(end);
            }
            if moving_gone {
                life.stay();
            }
            // The peer agent paused the stream: its side waits here for
            // the peer's successor, or goes with this agent if it leaves
            // first (`parked`, the token it waits under).
            // Nothing but the boxed wait is kept over it: every local kept
            // there would take space in every connection's task.
            let token = tunnel.as_deref_mut().and_then(|side| side.token.take());
            let parked = match token {
                None => None,
                Some(token) => {
                    let side = tunnel.as_deref().expect("a pause comes to a tunnel's side");
                    let (_, moving) = life.copy_parts();
                    let answered = Box::pin(paused::answer(
                        inputs,
                        (&mut client, &mut upstream),
                        &mut progress,
                        token,
                        &side.end,
                        moving,
                    ));
                    match answered.await {
                        Ok(Answered::TakenUp(next)) => {
                            if let Some(side) = tunnel.as_deref_mut() {
                                side.paused = next;
                            }
                            continue 'carry;
                        }
                        Ok(Answered::TakenUpLeaving(next)) => {
                            if let Some(side) = tunnel.as_deref_mut() {
                                side.paused = next;
                            }
                            None
                        }
                        Ok(Answered::Leaving(token)) => Some(token),
                        Err(()) => {
                            client.reset_on_close();
                            upstream.reset_on_close();
                            life.close(crate::telemetry::CloseReason::ClientError);
                            return Some(CopyEnd::ClientError);
                        }
                    }
                }
            };
            if parked.is_none() {
                let tunnelled = client.is_tunnel() || upstream.is_tunnel();
                let movable = client.can_move() && upstream.can_move();
                if !movable || (tunnelled && tunnel.is_none()) {
                    // Its peer agent cannot pause the tunnel stream (or
                    // nobody knows whom a successor would dial): it
                    // finishes in this agent.
                    life.stay();
                    continue;
                }
            }
            let copy = progress.into_suspended();
            // Boxed: it runs once, at a handover, and every connection's
            // task would otherwise carry its space.
            let leaving = Box::pin(send_on(
                inputs, client, upstream, life, copy, tunnel, parked,
            ));
            leaving.await;
            return None;
        }
    }
}

/// Whether the agent's move signal went away without a word (then it is
/// not waited on again). A peer's pause leaves its token in the
/// [`TunnelSide`].
#[derive(Default)]
struct Stop {
    moving_gone: bool,
}

impl Stop {
    /// Resolves when `moving` fires, or the peer agent's pause of the
    /// tunnel stream comes (its token kept in `side`). A signal whose
    /// sender went away never fires, and is dropped.
    fn on<'a>(
        &'a mut self,
        mut moving: Option<&'a mut oneshot::Receiver<()>>,
        mut side: Option<&'a mut TunnelSide>,
    ) -> impl Future<Output = ()> + Send + 'a {
        std::future::poll_fn(move |cx| {
            if let Some(rx) = moving.as_deref_mut()
                && let Poll::Ready(told) = Pin::new(rx).poll(cx)
            {
                moving = None;
                match told {
                    Ok(()) => return Poll::Ready(()),
                    Err(_) => self.moving_gone = true,
                }
            }
            if let Some(side) = side.as_deref_mut()
                && let Some(rx) = side.paused.as_mut()
                && let Poll::Ready(token) = Pin::new(rx).poll(cx)
            {
                side.paused = None;
                if let Ok(token) = token {
                    side.token = Some(token);
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        })
    }
}

/// Takes a suspended connection's ends off this agent (a TLS session
/// first writes what it had sealed; a tunnel stream is paused with its
/// peer agent, unless it already was: `parked`, the token its side waits
/// under for the peer's successor) and hands them, with their record, to
/// whoever sends them to the next agent.
async fn send_on<C: Movable, U: Movable>(
    inputs: &ProxyInputs,
    mut client: C,
    mut upstream: U,
    life: ConnectionLife<'_>,
    mut copy: Suspended,
    mut tunnel: Option<Box<TunnelSide>>,
    parked: Option<Token>,
) {
    let (sent, received) = life.bytes().totals();
    let kind = kind_of(life.connection());
    // The peer may pause the stream as this end does (both agents leave
    // at once): the pause hears it.
    if let Some(paused) = tunnel.as_mut().and_then(|side| side.paused.take()) {
        match client.is_tunnel() {
            true => client.give_back_pause(paused),
            false => upstream.give_back_pause(paused),
        }
    }
    let (client, upstream) = (leave(client, parked), leave(upstream, parked));
    let (client, upstream) = match (client.await, upstream.await) {
        (Ok(client), Ok(upstream)) => (client, upstream),
        (client, upstream) => {
            warn!(
                "upgrade: a connection cannot leave its TLS session or tunnel stream in a state \
                 to move: {:?} {:?}; closed",
                client.err(),
                upstream.err()
            );
            life.close(crate::telemetry::CloseReason::ClientError);
            return;
        }
    };
    let mut paused = None;
    let mut socket = |end: Leaving, up: bool, copy: &mut Suspended| match end {
        Leaving::Socket(tcp, tls) => Some((tcp, tls)),
        Leaving::Tunnel {
            token,
            read,
            peer_node,
            park,
        } => {
            let way = if up { &mut copy.up } else { &mut copy.down };
            way.pending.extend_from_slice(&read);
            paused = Some((token, peer_node, park));
            None
        }
    };
    let client = socket(client, true, &mut copy);
    let upstream = socket(upstream, false, &mut copy);
    let tunnel = match (paused, tunnel) {
        (None, _) => None,
        (Some((token, peer_node, park)), Some(side)) => {
            let end = &side.end;
            let peer = match (end.peer(), peer_node) {
                (Some(addr), _) => PeerAgent::Addr(addr),
                (None, Some(node)) => PeerAgent::Node(node),
                (None, None) => PeerAgent::Node(String::new()),
            };
            Some(TunnelRecord {
                token: token.to_hex(),
                local: end.local().to_string(),
                remote: end.remote().to_string(),
                peer,
                target: end.target,
                park,
            })
        }
        (Some(_), None) => unreachable!("a tunnel stream's handler gives its parties"),
    };
    let (client, client_tls) = client.map_or((None, None), |(s, t)| (Some(s), t));
    let (upstream, upstream_tls) = upstream.map_or((None, None), |(s, t)| (Some(s), t));
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
        tunnel,
    };
    life.hand_over();
    let fd = |s: Option<TcpStream>| s.map(|s| s.into_std().map(OwnedFd::from)).transpose();
    match (fd(client), fd(upstream)) {
        (Ok(client), Ok(upstream)) => {
            inputs.metrics.handover_connection("sent");
            inputs.connections.move_out(Moved {
                client,
                upstream,
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

/// `end` as it leaves: paused with the peer agent, or, when it already
/// was and waits under the peer's token (`parked`), as it is.
async fn leave<E: Movable>(end: E, parked: Option<Token>) -> std::io::Result<Leaving> {
    match parked {
        Some(token) if end.is_tunnel() => Ok(Leaving::Tunnel {
            token,
            read: Vec::new(),
            peer_node: end.peer_node(),
            park: true,
        }),
        _ => end.into_moving().await,
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
        // No handler lists a service callee for any other caller, and a
        // request service's connection never moves.
        (_, Callee::Service { service, .. } | Callee::Requests(service)) => MovedKind::Outbound {
            vip: service.vip,
            namespace: service.namespace.clone(),
            service: service.name.clone(),
            caller: None,
        },
    }
}
