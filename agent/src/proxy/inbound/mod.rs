//! The inbound mTLS listener (`node.address:agent.inbound_port`): peer
//! agents connect here on behalf of their workloads. Each connection must
//! complete a TLS 1.3 handshake with a client certificate from the trust
//! bundle carrying a SPIFFE ID of this trust domain, then name a local
//! workload in a bounded preamble, then pass authorization. Every refusal
//! is logged once with its reason and counted; none affects another
//! connection or the listener.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use log::debug;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};

use admit::{Admission, Refused, admit, admit_target, caller_of};
use refusals::refusal_of_handshake;

use super::{
    ProxyInputs,
    connections::{Callee, Caller},
    l7,
    lifecycle::{ConnectionLife, Opening},
    moved::{Movable, MovedKind, MovedRecord, NotCarried, NotResumed, carry_or_move},
    paused::TunnelSide,
    tunnels::{ALPN_H2, UNSENT_LIMIT},
};
use crate::{
    accept::{
        accept_until_drained,
        limits::{Admitted, InboundLimits},
    },
    audit::{Denial, Party},
    carry::copy::{Duplex, Limits, Suspended},
    catalog::LocalTarget,
    config::policy::DEFAULT_IDLE_TIMEOUT,
    connect,
    drain::{ConnectionGuard, DrainWatch},
    handover::Inherited,
    telemetry::{CloseReason, Refusal},
    tls::{Identity, session::TlsSession},
    tunnel::TunnelConfig,
};

/// What every inbound connection needs.
pub struct InboundContext {
    pub inputs: Arc<ProxyInputs>,
    /// Deadline for the handshake, and again for the preamble.
    pub handshake_timeout: Duration,
    pub limits: Arc<InboundLimits>,
    /// Tunnel connections' HTTP/2 settings.
    pub tunnel: TunnelConfig,
    /// Where the bytes of tunnelled streams are copied: the data-plane
    /// runtime, not this one's handshakes.
    pub data: tokio::runtime::Handle,
    /// Tunnel connections send GOAWAY when it starts.
    pub drain: DrainWatch,
}

/// The bound inbound listener.
pub struct InboundListener {
    listener: TcpListener,
}

impl InboundListener {
    pub fn bind(addr: SocketAddr, inherited: &Inherited) -> io::Result<InboundListener> {
        let (listener, _) = connect::listen(addr, 1024, inherited)?;
        Ok(InboundListener { listener })
    }

    /// The listening socket, for handing over to a successor.
    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listener)
    }

    /// Accepts until the drain starts, on `runtime`: inbound connections,
    /// their handshakes above all, run apart from the data-plane workers
    /// that carry outbound traffic, so a flood of handshakes cannot delay
    /// an outbound connection's bytes.
    pub fn serve_on(
        self,
        runtime: &tokio::runtime::Handle,
        ctx: Arc<InboundContext>,
        drain: DrainWatch,
    ) -> io::Result<tokio::task::JoinHandle<()>> {
        // Registered again with the inbound runtime's reactor.
        let listener = self.listener.into_std()?;
        Ok(runtime.spawn(async move {
            match TcpListener::from_std(listener) {
                Ok(listener) => InboundListener { listener }.serve(ctx, drain).await,
                Err(e) => log::error!("inbound listener: {e}"),
            }
        }))
    }

    /// Accepts until the drain starts.
    pub async fn serve(self, ctx: Arc<InboundContext>, mut drain: DrainWatch) {
        let config = ctx.inputs.tls.server_config();
        accept_until_drained(&self.listener, &mut drain, "inbound", |tcp, peer, guard| {
            let admitted = match ctx.limits.admit(peer.ip()) {
                Ok(admitted) => admitted,
                Err(over) => {
                    // Not audited: a flood must not fill the audit trail;
                    // counted exactly and logged within the rate limit.
                    ctx.inputs.inbound_stats.count_refusal(Refusal::Overloaded);
                    ctx.inputs.refusals.warn(Refusal::Overloaded.name(), || {
                        format!(
                            "inbound {peer}: refused: overloaded: {} reached",
                            over.name()
                        )
                    });
                    let _ = tcp.set_zero_linger();
                    return;
                }
            };
            let ctx = ctx.clone();
            let config = config.clone();
            tokio::spawn(handle(ctx, config, tcp, peer, guard, admitted));
        })
        .await;
    }
}

fn refuse(
    ctx: &InboundContext,
    peer: SocketAddr,
    caller: Option<&Identity>,
    why: Refusal,
    detail: &dyn std::fmt::Display,
) {
    refuse_at(ctx, peer, caller, None, why, detail);
}

/// Counts, audits and (within the log's rate limit) logs a refusal;
/// `target` is the local workload endpoint asked for, once known.
fn refuse_at(
    ctx: &InboundContext,
    peer: SocketAddr,
    caller: Option<&Identity>,
    target: Option<(&Identity, SocketAddr, &str, Option<&str>)>,
    why: Refusal,
    detail: &dyn std::fmt::Display,
) {
    ctx.inputs.inbound_stats.count_refusal(why);
    let detail = detail.to_string();
    let (destination, rule) = match target {
        Some((identity, addr, workload, rule)) => (
            Party {
                identity: Some(identity),
                address: Some(addr),
                workload: Some(workload),
            },
            rule,
        ),
        None => (Party::default(), None),
    };
    ctx.inputs.audit.deny(&Denial {
        reason: why.name(),
        source: Party {
            identity: caller,
            address: Some(peer),
            workload: None,
        },
        destination,
        service: None,
        rule,
        detail: Some(&detail),
    });
    ctx.inputs.refusals.warn(why.name(), || match caller {
        Some(id) => format!("inbound {peer} ({id}): refused: {}: {detail}", why.name()),
        None => format!("inbound {peer}: refused: {}: {detail}", why.name()),
    });
}

async fn handle(
    ctx: Arc<InboundContext>,
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    peer: SocketAddr,
    guard: ConnectionGuard,
    mut admitted: Admitted,
) {
    let _ = tcp.set_nodelay(true);
    let started = tokio::time::Instant::now();
    if let Err(over) = admitted.start_handshake(ctx.handshake_timeout).await {
        let _ = tcp.set_zero_linger();
        ctx.inputs.inbound_stats.count_refusal(Refusal::Overloaded);
        ctx.inputs.refusals.warn(Refusal::Overloaded.name(), || {
            format!(
                "inbound {peer}: refused: overloaded: {} stayed full for {:?}",
                over.name(),
                ctx.handshake_timeout
            )
        });
        return;
    }
    let left = ctx.handshake_timeout.saturating_sub(started.elapsed());
    let handshake = tokio::time::timeout(left, TlsSession::server(config, tcp)).await;
    admitted.handshake_done();
    let mut tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return refuse(&ctx, peer, None, refusal_of_handshake(&e), &e),
        Err(_) => {
            let limit = format!("no handshake within {:?}", ctx.handshake_timeout);
            return refuse(&ctx, peer, None, Refusal::HandshakeTimeout, &limit);
        }
    };
    if tls.alpn_protocol() == Some(ALPN_H2) {
        let (caller, asked_for) = match caller_of(&ctx, &tls) {
            Ok(caller) => caller,
            Err(refused) => {
                tls.reset_on_close();
                let (caller, why) = (refused.caller.as_ref(), refused.why);
                return refuse(&ctx, peer, caller, why, &refused.detail);
            }
        };
        // The tunnel's framing and records run with its streams' copies
        // on the data-plane runtime; this one keeps the handshakes.
        let _ = connect::limit_unsent(tls.get_ref(), UNSENT_LIMIT);
        let tls = match tls.rebind(&ctx.data) {
            Ok(tls) => tls,
            Err(e) => return debug!("inbound tunnel from {peer}: {e}"),
        };
        let data = ctx.data.clone();
        data.spawn(async move {
            let _held = (guard, admitted);
            tunnel::serve(ctx, tls, peer, caller, asked_for).await
        });
        return;
    }
    let Admission {
        caller,
        local,
        target,
        upstream,
    } = match admit(&ctx, &mut tls).await {
        Ok(admission) => admission,
        Err(refused) => {
            // Every refusal after the handshake resets: the caller's agent
            // fails its attempt at once instead of waiting on a FIN.
            tls.reset_on_close();
            return refuse_at(
                &ctx,
                peer,
                refused.caller.as_ref(),
                refused.target.as_ref().map(|t| t.as_party()),
                refused.why,
                &refused.detail,
            );
        }
    };
    ctx.inputs.inbound_stats.count_accepted();
    // The copy runs on the data-plane runtime with every other
    // connection's; this runtime keeps the handshakes.
    if local.checks_requests() {
        let tls = match tls.rebind(&ctx.data) {
            Ok(tls) => tls,
            Err(e) => return debug!("inbound {peer}: {e}"),
        };
        let upstream = match connect::rebind(upstream, &ctx.data) {
            Ok(upstream) => upstream,
            Err(e) => return debug!("inbound {peer}: {e}"),
        };
        let data = ctx.data.clone();
        data.spawn(async move {
            let _held = (guard, admitted);
            serve_requests(&ctx, tls, upstream, local, caller, peer).await
        });
        return;
    }
    let moved = tls
        .rebind(&ctx.data)
        .and_then(|tls| Ok((tls, connect::rebind(upstream, &ctx.data)?)));
    let (tls, upstream) = match moved {
        Ok(both) => both,
        Err(e) => return debug!("inbound {peer}: {e}"),
    };
    let data = ctx.data.clone();
    data.spawn(async move {
        let _held = (guard, admitted);
        let life = ConnectionLife::open(
            &ctx.inputs.connections,
            &ctx.inputs.audit,
            Opening {
                caller: Caller::Peer(caller),
                callee: Callee::Workload(local.workload.clone()),
                client: peer,
                upstream: target,
                security: "mutual_tls",
                accepted: tokio::time::Instant::now(),
                movable: true,
            },
            None,
        );
        let from = Suspended::default();
        let end = carry_or_move(&ctx.inputs, tls, upstream, life, LIMITS, from, None).await;
        debug!("inbound {peer} -> {target}: {end:?}");
    });
}

/// Serves an admitted application connection (a tunnel stream, or an
/// mTLS connection of its own) to `local`, whose workload decides single
/// requests, request by request ([`l7::inbound`]). Listed and audited as
/// a connection; it stays in this agent.
pub(super) async fn serve_requests<C>(
    ctx: &Arc<InboundContext>,
    client: C,
    upstream: TcpStream,
    local: Arc<LocalTarget>,
    caller: Identity,
    peer: SocketAddr,
) where
    C: AsyncRead + AsyncWrite + Send + Unpin,
{
    let _ = upstream.set_nodelay(true);
    let life = ConnectionLife::open(
        &ctx.inputs.connections,
        &ctx.inputs.audit,
        Opening {
            caller: Caller::Peer(caller.clone()),
            callee: Callee::Workload(local.workload.clone()),
            client: peer,
            upstream: local.addr,
            security: "mutual_tls",
            accepted: tokio::time::Instant::now(),
            movable: false,
        },
        None,
    );
    let arrival = l7::inbound::Arrival {
        inputs: ctx.inputs.clone(),
        target: local,
        caller,
        peer,
    };
    let client = l7::Counted::new(client, life.bytes());
    l7::inbound::serve(arrival, client, upstream, ctx.drain.clone()).await;
    life.close(CloseReason::Closed);
}

/// The limits of an inbound connection: the calling agent applies the
/// service's.
const LIMITS: Limits = Limits {
    idle: DEFAULT_IDLE_TIMEOUT,
    lifetime: None,
};

/// Carries on a peer agent's connection the previous agent moved here, to
/// the same workload endpoint: over its TLS session resumed, or over a
/// tunnel stream that took up the paused one (`tunnel`, its parties). It
/// was admitted then; a policy changed since applies to its next
/// connection, as it would have in the old agent.
pub(super) async fn resume<C: Movable>(
    inputs: &Arc<ProxyInputs>,
    client: C,
    upstream: TcpStream,
    record: &MovedRecord,
    _guard: ConnectionGuard,
    tunnel: Option<Box<TunnelSide>>,
) -> Result<(), NotCarried> {
    let MovedKind::Inbound {
        caller,
        workload,
        target,
    } = &record.kind
    else {
        unreachable!("resume is called for inbound records only");
    };
    let found = inputs
        .catalog
        .load()
        .local_target(*target)
        .filter(|t| t.workload.name == *workload)
        .map(|t| t.workload.clone());
    let (Some(workload), Ok(caller)) = (found, Identity::parse(caller)) else {
        client.reset_on_close();
        let _ = upstream.set_zero_linger();
        return Err((NotResumed::NoWorkload(workload.clone()), None));
    };
    inputs.metrics.handover_connection("received");
    let life = ConnectionLife::adopt(
        &inputs.connections,
        &inputs.audit,
        Opening {
            caller: Caller::Peer(caller),
            callee: Callee::Workload(workload),
            client: record.client,
            upstream: *target,
            security: "mutual_tls",
            accepted: record.accepted(),
            movable: true,
        },
        None,
        (record.sent, record.received),
    );
    let from = record.copy.clone();
    carry_or_move(inputs, client, upstream, life, LIMITS, from, tunnel).await;
    Ok(())
}

mod admit;
mod refusals;
mod tunnel;

#[cfg(test)]
mod tests;
