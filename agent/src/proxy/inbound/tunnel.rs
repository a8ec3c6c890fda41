//! Tunnel connections on the inbound port: a peer agent that asked for
//! HTTP/2 by ALPN carries many application connections as CONNECT streams
//! (HBONE). Who calls is checked once per connection, from its client
//! certificate, before any stream is read. Each stream is then checked on
//! its own, as a connection's preamble is, before any byte reaches the
//! workload, and refused with a status that names why:
//!
//! - 400: the target is not a workload endpoint of this node, or is not
//!   served by the identity the caller asked for (SNI);
//! - 401: authorization refuses the caller (audited);
//! - 503: the workload cannot be reached.
//!
//! A refusal ends that stream only; the connection and its other streams
//! go on. The TLS handshake runs on the inbound runtime; the connection's
//! framing and its streams' copies run on the data-plane runtime, where
//! the connection is moved once its caller is known.

use std::{net::SocketAddr, sync::Arc};

use http::StatusCode;
use log::debug;

use super::{InboundContext, LIMITS, Refused, admit_target, refuse_at, serve_requests};
use crate::{
    carry::copy::Suspended,
    proxy::{
        connections::{Callee, Caller},
        lifecycle::{ConnectionLife, Opening},
        moved::carry_or_move,
        paused::{NotTakenUp, Parties, TunnelEnd, TunnelSide},
    },
    telemetry::{Refusal, tunnels::Side},
    tls::{Identity, session::TlsSession},
    tunnel::{self, Incoming, control::Token},
};

/// Who is on the other end of one tunnel connection.
struct Tunnel {
    ctx: Arc<InboundContext>,
    /// The peer agent's address.
    peer: SocketAddr,
    caller: Identity,
    /// The identity it asked for by SNI.
    asked_for: Option<Identity>,
    /// Both, for its streams' moves (one allocation per connection, not
    /// per stream); None without SNI: its streams then stay in this agent.
    parties: Option<Arc<(Identity, Identity)>>,
}

/// Serves one tunnel connection until the peer closes it, or the drain
/// has sent GOAWAY and its streams are done.
pub(super) async fn serve(
    ctx: Arc<InboundContext>,
    tls: TlsSession,
    peer: SocketAddr,
    caller: Identity,
    asked_for: Option<Identity>,
) {
    let resumed = tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let _open = (ctx.inputs.metrics.tunnels).connection(Side::Server, resumed);
    let mut drain = ctx.drain.clone();
    let shutdown = async move { drain.draining().await };
    let config = ctx.tunnel.clone();
    let parties = (asked_for.clone()).map(|local| Arc::new((local, caller.clone())));
    let tunnel = Arc::new(Tunnel {
        ctx,
        peer,
        caller,
        asked_for,
        parties,
    });
    let on_stream = |incoming: Incoming| {
        let tunnel = tunnel.clone();
        let data = tunnel.ctx.data.clone();
        data.spawn(stream(tunnel, Box::new(incoming)));
    };
    let broke_protocol = |detail: &dyn std::fmt::Display| {
        let why = Refusal::TunnelProtocol;
        refuse_at(&tunnel.ctx, peer, Some(&tunnel.caller), None, why, detail);
    };
    let malformed = |what: String| broke_protocol(&what);
    let served = tunnel::serve(tls, &config, on_stream, malformed, shutdown).await;
    match served {
        Ok(()) => {}
        // The peer is no HTTP/2 client, or broke the protocol (a flood of
        // resets, pings or settings is one): refused with its reason.
        Err(e) if e.is_protocol_violation() => broke_protocol(&e),
        // It went away or stopped answering: the streams it carried have
        // failed with it, each counted as its connection's end.
        Err(e) => debug!("inbound tunnel from {peer}: {e}"),
    }
}

/// The HTTP status a refused stream is answered with.
fn status_of(why: Refusal) -> StatusCode {
    match why {
        Refusal::Denied => StatusCode::UNAUTHORIZED,
        Refusal::TargetUnreachable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// One application connection: checked, answered, carried. The request
/// comes boxed, so that its headers leave with it once it is answered.
// Not an `async fn`: that would keep a second copy of every argument in
// the future (rustc does not share their space), and this future is every
// tunnelled connection's.
#[expect(clippy::manual_async_fn, reason = "see above")]
fn stream(tunnel: Arc<Tunnel>, incoming: Box<Incoming>) -> impl Future<Output = ()> {
    async move {
        let ctx = &tunnel.ctx;
        let _guard = ctx.drain.track();
        let target = incoming.target();
        match incoming.resume_token() {
            Ok(None) => {}
            // Boxed: a rare stream's wait, kept off every stream's future.
            Ok(Some(token)) => {
                let taking = Box::pin(take_up(&tunnel, *incoming, token));
                return taking.await;
            }
            Err(bad) => {
                incoming.refuse(StatusCode::BAD_REQUEST);
                let why = Refusal::TunnelProtocol;
                return refuse_at(ctx, tunnel.peer, Some(&tunnel.caller), None, why, &bad);
            }
        }
        // Boxed: the checks and the connect to the workload are the largest
        // state of this task, and a quiet stream should not carry their space.
        // The outcome is matched in a block of its own: its space is then
        // free for the copy's, not kept beside it for the stream's life.
        let (local, upstream) = {
            let asked_for = tunnel.asked_for.as_ref();
            match Box::pin(admit_target(ctx, &tunnel.caller, asked_for, target)).await {
                Ok(admitted) => admitted,
                Err(refused) => {
                    incoming.refuse(status_of(refused.why));
                    return refuse_stream(&tunnel, refused);
                }
            }
        };
        if local.checks_requests() {
            let Ok(stream) = incoming.accept_unlisted() else {
                let _ = upstream.set_zero_linger();
                return;
            };
            ctx.inputs.metrics.tunnels.stream_opened(Side::Server);
            ctx.inputs.inbound_stats.count_accepted();
            let caller = tunnel.caller.clone();
            // Boxed: this future is every tunnelled connection's, and only
            // a few are served request by request.
            let serving = serve_requests(ctx, stream, upstream, local, caller, tunnel.peer);
            return Box::pin(serving).await;
        }
        // A stream of the calling agent's own requests stays in this agent
        // when it leaves: the caller retires it (see `request::pool`).
        let stays = incoming.stays();
        let accepted = match stays {
            true => incoming.accept_unlisted(),
            false => incoming.accept(),
        };
        let Ok(stream) = accepted else {
            // The peer reset the stream or the connection went away meanwhile.
            let _ = upstream.set_zero_linger();
            return;
        };
        ctx.inputs.metrics.tunnels.stream_opened(Side::Server);
        ctx.inputs.inbound_stats.count_accepted();
        let life = ConnectionLife::open(
            &ctx.inputs.connections,
            &ctx.inputs.audit,
            Opening {
                caller: Caller::Peer(tunnel.caller.clone()),
                callee: Callee::Workload(local.workload.clone()),
                client: tunnel.peer,
                upstream: target,
                security: "mutual_tls",
                accepted: tokio::time::Instant::now(),
                // It moves if the calling agent can pause the stream when
                // the time comes; otherwise it stays.
                movable: !stays,
            },
            None,
        );
        let _ = upstream.set_nodelay(true);
        let id = stream.id();
        // The parties, for a move: the workload's identity is the one the
        // caller asked for (admission checked it serves that one).
        let side = tunnel.parties.clone().filter(|_| !stays).map(|parties| {
            TunnelSide::new(TunnelEnd {
                parties: Parties::Called(parties),
                target,
            })
        });
        let from = Suspended::default();
        let end = carry_or_move(&ctx.inputs, stream, upstream, life, LIMITS, from, side);
        let end = end.await;
        debug!(
            "inbound tunnel {} stream {id} -> {target}: {end:?}",
            tunnel.peer
        );
    }
}

/// A stream that takes up a connection paused here for the calling
/// agent's upgrade: its successor, presenting the same identity and
/// asking for the same one, with the pause's token. Anything else is
/// answered 410 and counted; the paused connection waits on for the
/// right stream. An agent that is leaving answers a token it does not
/// keep 503 at once: what it kept goes to its successor, which the
/// stream's next try (on a new connection, after this one's GOAWAY)
/// reaches.
async fn take_up(tunnel: &Tunnel, incoming: Incoming, token: Token) {
    let (caller, asked_for) = (&tunnel.caller, tunnel.asked_for.as_ref());
    let parked = &tunnel.ctx.inputs.parked;
    let target = incoming.target();
    let leaving = tunnel.ctx.drain.is_draining();
    let claimed = match leaving {
        true => parked.claim(&token, caller, asked_for, target),
        false => parked.claim_soon(&token, caller, asked_for, target).await,
    };
    match claimed {
        Ok(waiting) => {
            let Ok(stream) = incoming.accept() else {
                return;
            };
            // A paused connection that gave up meanwhile drops the
            // stream: the successor sees it reset.
            let _ = waiting.send(stream);
        }
        Err(why) => {
            let status = match (leaving, &why) {
                (true, NotTakenUp::Unknown) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::GONE,
            };
            incoming.refuse(status);
            let refusal = Refusal::ResumeRefused;
            refuse_at(&tunnel.ctx, tunnel.peer, Some(caller), None, refusal, &why);
        }
    }
}

fn refuse_stream(tunnel: &Tunnel, refused: Refused) {
    refuse_at(
        &tunnel.ctx,
        tunnel.peer,
        refused.caller.as_ref(),
        refused.target.as_ref().map(|t| t.as_party()),
        refused.why,
        &refused.detail,
    );
}
