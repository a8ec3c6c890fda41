//! The outbound listener: connections the connect hook redirected land here.
//! One listener per workload network namespace; in the local default that
//! is the host's namespace only.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use log::{debug, info, warn};
use tokio::net::TcpStream;

use super::{
    ProxyInputs,
    connections::{Callee, Caller},
    l7,
    lifecycle::{ConnectionLife, Opening},
    moved::{MovedKind, MovedRecord, NotCarried, NotResumed, carry_or_move},
    paused::rejoin_outbound,
    tunnels::Tunnels,
    upstream::{Upstream, connect_upstream, fail_fast},
};
use crate::{
    accept::accept_until_drained,
    carry::copy::{CopyEnd, Limits, Suspended},
    catalog::{Service, ServicePolicy, Workload},
    clock::now_ms,
    config::Protocol,
    connect::BoundListener,
    discovery::PodLookup,
    drain::{ConnectionGuard, DrainWatch},
    handover::Inherited,
    lb::PickContext,
    netns::Netns,
    redirect::{PeerRecords, bypass::Bypass},
    resilience::{Admission, Outcome, Overflow},
    route::{self, Chosen},
    telemetry::CloseReason,
};
/// Pending connections the kernel queues for one listener.
const BACKLOG: u32 = 4096;

/// What every outbound connection needs, shared by all listeners.
pub struct OutboundContext {
    pub inputs: Arc<ProxyInputs>,
    pub records: Arc<PeerRecords>,
    /// The sockmap bypass, when switched on.
    pub bypass: Option<Bypass>,
    /// Reads the service account of a pod on another node (Kubernetes).
    pub pods: Option<Arc<PodLookup>>,
    /// Pooled tunnels to peer agents, when `mesh.tunnels.enabled`.
    pub tunnels: Option<Arc<Tunnels>>,
    /// Where mTLS handshakes run, apart from the data-plane workers; None
    /// runs them where the connection is.
    pub handshakes: Option<tokio::runtime::Handle>,
    /// The agent's drain: HTTP connections (request services) end
    /// gracefully when it starts, as they cannot move to a successor.
    pub drain: DrainWatch,
}

/// A bound outbound listener in one network namespace.
pub struct OutboundListener(BoundListener);

impl std::ops::Deref for OutboundListener {
    type Target = BoundListener;
    fn deref(&self) -> &BoundListener {
        &self.0
    }
}

impl OutboundListener {
    /// Binds `addr` in the agent's network namespace (or takes the
    /// previous agent's socket for it).
    pub fn bind(addr: SocketAddr, inherited: &Inherited) -> io::Result<OutboundListener> {
        Self::bind_in(addr, inherited, None)
    }

    /// The IPv6 twin of the listener on `addr`: `[::1]`, same port, inside
    /// `netns` when given. `connect6` sends sockets dialling an IPv6
    /// address here when it exists (an IPV6_V6ONLY socket cannot reach the
    /// v4-mapped IPv4 listener); `None` where the namespace has no IPv6
    /// loopback, and then they go to the IPv4 listener.
    pub fn bind_v6_twin(
        addr: SocketAddr,
        inherited: &Inherited,
        netns: Option<&Netns>,
    ) -> Option<OutboundListener> {
        let twin = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port());
        match Self::bind_in(twin, inherited, netns) {
            Ok(listener) => Some(listener),
            Err(e) => {
                info!("no IPv6 outbound listener {twin}: {e}; IPv6 sockets use {addr}");
                None
            }
        }
    }

    /// Binds `addr` inside `netns` (a pod's namespace) when given.
    pub fn bind_in(
        addr: SocketAddr,
        inherited: &Inherited,
        netns: Option<&Netns>,
    ) -> io::Result<OutboundListener> {
        BoundListener::bind_in(addr, BACKLOG, inherited, netns).map(OutboundListener)
    }

    /// Accepts until the drain starts, then closes the listener (new
    /// redirected connects are refused at once) and returns. Connections
    /// already accepted go on in their own tasks, tracked by `drain`.
    pub async fn serve(self, ctx: Arc<OutboundContext>, mut drain: DrainWatch) {
        let netns = self.netns_cookie();
        let local = self.listener().local_addr().ok();
        accept_until_drained(
            self.listener(),
            &mut drain,
            "outbound",
            |client, peer, guard| {
                // Before anything is written to it, so that every byte the
                // agent sends the workload takes the same way.
                if let (Some(bypass), Some(local)) = (&ctx.bypass, local)
                    && let Err(e) = bypass.offer(&client, local, peer, netns)
                {
                    debug!("{peer}: no sockmap bypass for this connection: {e}");
                }
                let ctx = ctx.clone();
                tokio::spawn(handle(ctx, client, peer, netns, guard));
            },
        )
        .await;
    }
}

/// Closes a connection with a reset, so the caller fails fast instead of
/// waiting for bytes that will never come.
fn reset(stream: TcpStream) {
    // If the option cannot be set the close is an ordinary FIN: still prompt.
    let _ = stream.set_zero_linger();
}

// Not an `async fn`: that would keep a second copy of every argument in
// the future (rustc does not share their space), and this future is every
// connection's.
#[expect(clippy::manual_async_fn, reason = "see above")]
fn handle(
    ctx: Arc<OutboundContext>,
    client: TcpStream,
    peer: SocketAddr,
    netns: u64,
    guard: ConnectionGuard,
) -> impl Future<Output = ()> {
    async move {
        let _guard = guard;
        let Some((service, source)) = caller_and_service(&ctx, peer, netns) else {
            return reset(client);
        };
        let policy = &service.policy;
        let started = tokio::time::Instant::now();
        let Some(_connection_slot) = service.state.open_connection(&policy.thresholds) else {
            fail_fast(&service, Overflow::MaxConnections);
            refused(&ctx, &service, source.as_deref(), CloseReason::Overflow);
            return reset(client);
        };
        if service.protocol != Protocol::Tcp {
            // Balanced per request. Boxed: most services are TCP, and
            // their connections should not carry this path's space.
            let _ = client.set_nodelay(true);
            let served = l7::serve(ctx.clone(), client, service.clone(), source, peer);
            return Box::pin(served).await;
        }
        let pick = PickContext {
            source_workload: source.as_deref().map(|w| w.name.as_str()),
            source_addr: peer.ip(),
        };
        // Boxed: the connect phase (TLS included) is the largest state of
        // this future, and an idle connection should not carry its space.
        let connecting = Box::pin(connect_upstream(&ctx, &service, &pick, source.as_deref()));
        let (upstream, chosen) = match connecting.await {
            Ok(connected) => connected,
            Err(reason) => {
                refused(&ctx, &service, source.as_deref(), reason);
                return reset(client);
            }
        };
        if service.state.note_served() {
            info!(
                "service {}: below its thresholds again; serving new connections",
                service.qualified_name()
            );
        }
        let endpoint = &service.endpoints[chosen.index];
        let _in_flight = endpoint.state.open_connection();
        let life = ConnectionLife::open(
            &ctx.inputs.connections,
            &ctx.inputs.audit,
            Opening {
                caller: Caller::Workload(source.clone()),
                callee: Callee::Service {
                    service: service.clone(),
                    endpoint: chosen.index,
                },
                client: peer,
                upstream: endpoint.addr,
                security: security_of(&upstream),
                accepted: started,
                // A tunnelled one moves if its peer agent can pause the
                // stream when the time comes; otherwise it stays.
                movable: true,
            },
            Some(service.connection_metrics(
                &ctx.inputs.metrics,
                source.as_deref(),
                Some(chosen.index),
            )),
        );
        let _ = client.set_nodelay(true);
        let limits = limits_after(policy, life.age());
        let from = Suspended::default();
        // Matched here rather than in a helper: each async layer keeps its
        // own copy of what it passes on, and this future is every
        // connection's. Every copy is boxed, the plaintext one too: held
        // in this future, its space would sit unused beside the box of a
        // TLS or tunnel copy (a tunnelled connection paid both).
        let end = match upstream {
            Upstream::Plain(up) => {
                let carry = carry_or_move(&ctx.inputs, client, up, life, limits, from, None);
                Box::pin(carry).await
            }
            Upstream::Tls(up) => {
                let carry = carry_or_move(&ctx.inputs, client, *up, life, limits, from, None);
                Box::pin(carry).await
            }
            Upstream::Tunnel(up, end) => {
                let carry = carry_or_move(&ctx.inputs, client, *up, life, limits, from, Some(end));
                Box::pin(carry).await
            }
        };
        if let Some(end) = end {
            after_copy(&service, chosen, end);
        }
    }
}

/// The service a redirected connection dialled and the workload that
/// dialled it, from the connect hook's record; None (after saying why)
/// when either cannot be found, and the connection is to be reset.
fn caller_and_service(
    ctx: &OutboundContext,
    peer: SocketAddr,
    netns: u64,
) -> Option<(Arc<Service>, Option<Arc<Workload>>)> {
    let record = match ctx.records.take(netns, peer) {
        Ok(Some(record)) => record,
        Ok(None) => {
            debug!("{peer}: connected to the outbound listener without a redirect; closing");
            return None;
        }
        Err(e) => {
            warn!("{peer}: cannot read the redirect record: {e}; closing");
            return None;
        }
    };
    let catalog = ctx.inputs.catalog.load();
    let Some(service) = catalog.service(record.original_dst).cloned() else {
        warn!(
            "{peer}: dialled {}, which is no longer a meshed service; closing",
            record.original_dst
        );
        return None;
    };
    // The snapshot is released on return: a long connection must not pin
    // an old catalog.
    let source = catalog
        .workload_of_caller(record.cgroup_id, &record.ancestors)
        .cloned();
    Some((service, source))
}

/// Counts a connection refused before it reached an endpoint.
fn refused(
    ctx: &OutboundContext,
    service: &Service,
    source: Option<&Workload>,
    reason: CloseReason,
) {
    let m = service.connection_metrics(&ctx.inputs.metrics, source, None);
    m.opened.inc();
    m.closed(reason).inc();
}

fn security_of(upstream: &Upstream) -> &'static str {
    match upstream {
        Upstream::Plain(_) => "plaintext",
        Upstream::Tls(_) | Upstream::Tunnel(..) => "mutual_tls",
    }
}

/// The copy's limits for a connection `age` old: its lifetime is what
/// is left of `max_connection_duration`.
fn limits_after(policy: &ServicePolicy, age: Duration) -> Limits {
    Limits {
        idle: policy.idle_timeout,
        lifetime: policy
            .max_connection_duration
            .map(|d| d.saturating_sub(age)),
    }
}

/// What the end of a copy tells the endpoint's outlier detection.
fn after_copy(service: &Service, chosen: Chosen, end: CopyEnd) {
    let outcome = match end {
        CopyEnd::UpstreamReset => Outcome::Reset,
        CopyEnd::Idle | CopyEnd::Closed | CopyEnd::MaxDuration => {
            if end == CopyEnd::Idle {
                debug!(
                    "service {}: endpoint {}: idle for {:?}; closed",
                    service.qualified_name(),
                    service.endpoints[chosen.index].addr,
                    service.policy.idle_timeout
                );
            }
            Outcome::Closed
        }
        // The client's side failed: nothing learnt of the endpoint.
        CopyEnd::ClientError => return,
    };
    let normal = Chosen {
        admission: Admission::Normal,
        ..chosen
    };
    route::report(service, normal, outcome, now_ms());
}

/// Carries on a connection the previous agent moved here: the same
/// service and endpoint, its slots taken again (never refused: it is
/// already open), its copy resumed from where it stood.
pub(super) async fn resume(
    inputs: &Arc<ProxyInputs>,
    client: TcpStream,
    upstream: Option<Upstream>,
    record: &MovedRecord,
    _guard: ConnectionGuard,
) -> Result<(), NotCarried> {
    let MovedKind::Outbound {
        vip,
        namespace,
        service: name,
        caller,
    } = &record.kind
    else {
        unreachable!("resume is called for outbound records only");
    };
    let found = {
        let catalog = inputs.catalog.load();
        catalog
            .service(*vip)
            .filter(|s| s.namespace == *namespace && s.name == *name)
            .cloned()
            .map(|service| {
                let source = caller
                    .as_ref()
                    .and_then(|c| catalog.workloads().iter().find(|w| w.name == *c).cloned());
                (service, source)
            })
    };
    let Some((service, source)) = found else {
        let why = NotResumed::NoService {
            vip: *vip,
            namespace: namespace.clone(),
            service: name.clone(),
        };
        return Err((why, None));
    };
    let Some(index) = service
        .endpoints
        .iter()
        .position(|e| e.addr == record.upstream)
    else {
        let why = NotResumed::NoEndpoint {
            service: service.qualified_name(),
            endpoint: record.upstream,
        };
        return Err((why, None));
    };
    let upstream = match (upstream, &record.tunnel) {
        (Some(upstream), _) => upstream,
        (None, Some(tunnel)) => {
            // The caller's connections leave from its pod's namespace.
            let netns = source.as_ref().and_then(|w| w.netns.clone());
            match Box::pin(rejoin_outbound(inputs, tunnel, netns)).await {
                Ok((stream, end)) => Upstream::Tunnel(Box::new(stream), end),
                Err(why) => {
                    let _ = client.set_zero_linger();
                    return Err((why, None));
                }
            }
        }
        (None, None) => return Err((NotResumed::Mismatched, None)),
    };
    let _connection_slot = service.state.adopt_connection();
    let endpoint = &service.endpoints[index];
    let _in_flight = endpoint.state.open_connection();
    inputs.metrics.handover_connection("received");
    let life = ConnectionLife::adopt(
        &inputs.connections,
        &inputs.audit,
        Opening {
            caller: Caller::Workload(source.clone()),
            callee: Callee::Service {
                service: service.clone(),
                endpoint: index,
            },
            client: record.client,
            upstream: endpoint.addr,
            security: security_of(&upstream),
            accepted: record.accepted(),
            movable: true,
        },
        Some(service.connection_metrics(&inputs.metrics, source.as_deref(), Some(index))),
        (record.sent, record.received),
    );
    let limits = limits_after(&service.policy, life.age());
    let from = record.copy.clone();
    // As in `handle`: matched here, every copy boxed.
    let end = match upstream {
        Upstream::Plain(up) => {
            Box::pin(carry_or_move(inputs, client, up, life, limits, from, None)).await
        }
        Upstream::Tls(up) => {
            Box::pin(carry_or_move(inputs, client, *up, life, limits, from, None)).await
        }
        Upstream::Tunnel(up, end) => {
            Box::pin(carry_or_move(
                inputs,
                client,
                *up,
                life,
                limits,
                from,
                Some(end),
            ))
            .await
        }
    };
    if let Some(end) = end {
        let chosen = Chosen {
            index,
            admission: Admission::Normal,
        };
        after_copy(&service, chosen, end);
    }
    Ok(())
}
