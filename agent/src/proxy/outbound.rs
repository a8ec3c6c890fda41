//! The outbound listener: connections the connect hook redirected land here.
//! One listener per workload network namespace; in the local default that
//! is the host's namespace only.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use log::{debug, info, warn};
use tokio::net::{TcpListener, TcpStream};

use super::ProxyInputs;
use crate::{
    accept::accept_until_drained,
    audit::{Closed, Denial, Party},
    authz,
    carry::{
        copy::{CopyEnd, proxy},
        preamble,
    },
    catalog::{Endpoint, PodIdentity, Service, Workload, capture::InboundMode},
    clock::now_ms,
    config::Mode,
    connect::{connect_marked, listen_in},
    discovery::PodLookup,
    drain::{ConnectionGuard, DrainWatch},
    handover::Inherited,
    lb::PickContext,
    netns::Netns,
    proxy::LiveConnection,
    redirect::{PeerRecords, bypass::Bypass},
    resilience::{Admission, Outcome, Overflow, RetryDenied},
    route::{self, Chosen, NoEndpoint, Tried},
    telemetry::CloseReason,
    tls::Identity,
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
}

/// The identity of the pod behind an endpoint on another node, read from
/// the API server at the first connection to it (within the connect
/// timeout). Failing that, the endpoint cannot be verified, so it is not
/// dialled: the attempt counts against it and another may be tried.
async fn learn_identity<'a>(
    pod: &'a PodIdentity,
    lookup: &PodLookup,
    timeout: Duration,
) -> Result<&'a Identity, DialError> {
    let learn =
        pod.resolve(|| async { lookup.identity(&pod.pod).await.map_err(|e| e.to_string()) });
    let failed = |why: String| {
        DialError::Endpoint(io::Error::other(format!(
            "cannot learn the identity of pod {}/{}: {why}",
            pod.pod.namespace, pod.pod.name
        )))
    };
    match tokio::time::timeout(timeout, learn).await {
        Ok(Ok(identity)) => Ok(identity),
        Ok(Err(why)) => Err(failed(why)),
        Err(_) => Err(failed(format!(
            "no answer from the API server within {}ms",
            timeout.as_millis()
        ))),
    }
}

/// An upstream connection: direct, or over mTLS to the peer node's agent.
enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Why a dial failed.
enum DialError {
    /// The endpoint failed: counts against it, and may be retried.
    Endpoint(io::Error),
    /// Nothing the endpoint did: this caller cannot take that path.
    Caller(String),
    /// The endpoint's workload (on this node) does not admit the caller.
    Denied,
}

/// A bound outbound listener in one network namespace.
pub struct OutboundListener {
    listener: TcpListener,
    netns_cookie: u64,
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
        let (listener, netns_cookie) = listen_in(addr, BACKLOG, inherited, netns)?;
        Ok(OutboundListener {
            listener,
            netns_cookie,
        })
    }

    /// Cookie of the network namespace it listens in.
    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// The listening socket, for handing over to a successor.
    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listener)
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until the drain starts, then closes the listener (new
    /// redirected connects are refused at once) and returns. Connections
    /// already accepted go on in their own tasks, tracked by `drain`.
    pub async fn serve(self, ctx: Arc<OutboundContext>, mut drain: DrainWatch) {
        let netns = self.netns_cookie;
        let local = self.listener.local_addr().ok();
        accept_until_drained(
            &self.listener,
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
                tokio::spawn(async move { handle(ctx, client, peer, netns, guard).await });
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

/// Counts a fast failure; the first of an episode is logged.
fn fail_fast(service: &Service, why: Overflow) {
    if service.state.fail_fast(why) {
        warn!(
            "service {}: {} reached; failing new connections fast",
            service.qualified_name(),
            why.name()
        );
    }
}

async fn handle(
    ctx: Arc<OutboundContext>,
    client: TcpStream,
    peer: SocketAddr,
    netns: u64,
    _guard: ConnectionGuard,
) {
    let record = match ctx.records.take(netns, peer) {
        Ok(Some(record)) => record,
        Ok(None) => {
            debug!("{peer}: connected to the outbound listener without a redirect; closing");
            return reset(client);
        }
        Err(e) => {
            warn!("{peer}: cannot read the redirect record: {e}; closing");
            return reset(client);
        }
    };
    let (service, source) = {
        let catalog = ctx.inputs.catalog.load();
        let Some(service) = catalog.service(record.original_dst).cloned() else {
            warn!(
                "{peer}: dialled {}, which is no longer a meshed service; closing",
                record.original_dst
            );
            return reset(client);
        };
        // Release the snapshot now: a long connection must not pin an old
        // catalog.
        (
            service,
            catalog
                .workload_of_caller(record.cgroup_id, &record.ancestors)
                .cloned(),
        )
    };
    let policy = &service.policy;
    let started = tokio::time::Instant::now();
    let refused = |reason: CloseReason| {
        let m = service.connection_metrics(&ctx.inputs.metrics, source.as_deref(), None);
        m.opened.inc();
        m.closed(reason).inc();
    };
    let Some(_connection_slot) = service.state.open_connection(&policy.thresholds) else {
        fail_fast(&service, Overflow::MaxConnections);
        refused(CloseReason::Overflow);
        return reset(client);
    };
    let pick = PickContext {
        source_workload: source.as_deref().map(|w| w.name.as_str()),
        source_addr: peer.ip(),
    };
    // Boxed: the connect phase (TLS included) is the largest state of this
    // future, and an idle connection should not carry its space.
    let connecting = Box::pin(connect_upstream(&ctx, &service, &pick, source.as_deref()));
    let (upstream, chosen) = match connecting.await {
        Ok(connected) => connected,
        Err(reason) => {
            refused(reason);
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
    let metrics =
        service.connection_metrics(&ctx.inputs.metrics, source.as_deref(), Some(chosen.index));
    metrics.opened.inc();
    metrics.connect.observe(started.elapsed().as_secs_f64());
    metrics.active.inc();
    let _in_flight = endpoint.state.open_connection();
    let listed = ctx.inputs.connections.add(|id| LiveConnection {
        id,
        source: source.clone(),
        service: service.clone(),
        endpoint: endpoint.addr,
        security: if matches!(upstream, Upstream::Tls(_)) {
            "mutual_tls"
        } else {
            "plaintext"
        },
        started: std::time::SystemTime::now(),
        bytes: Default::default(),
    });
    let mut client = client;
    let _ = client.set_nodelay(true);
    let (idle, lifetime) = (policy.idle_timeout, policy.max_connection_duration);
    let bytes = &listed.connection.bytes;
    let end = match upstream {
        Upstream::Plain(mut up) => proxy(&mut client, &mut up, idle, lifetime, bytes).await,
        Upstream::Tls(mut up) => proxy(&mut client, &mut *up, idle, lifetime, bytes).await,
    };
    metrics
        .sent
        .inc_by(bytes.sent.load(std::sync::atomic::Ordering::Relaxed));
    metrics
        .received
        .inc_by(bytes.received.load(std::sync::atomic::Ordering::Relaxed));
    metrics.duration.observe(started.elapsed().as_secs_f64());
    metrics.active.dec();
    let reason = match end {
        CopyEnd::Closed => CloseReason::Closed,
        CopyEnd::UpstreamReset => CloseReason::UpstreamReset,
        CopyEnd::ClientError => CloseReason::ClientError,
        CopyEnd::Idle => CloseReason::IdleTimeout,
        CopyEnd::MaxDuration => CloseReason::MaxDuration,
    };
    metrics.closed(reason).inc();
    if ctx.inputs.audit.wants_connections() {
        let name = service.qualified_name();
        let workload = source.as_deref().map(|w| w.qualified_name());
        ctx.inputs.audit.closed(&Closed {
            source: Party {
                identity: source.as_deref().map(|w| &w.identity),
                address: Some(peer),
                workload: workload.as_deref(),
            },
            destination: Party {
                identity: endpoint.identity.as_ref(),
                address: Some(endpoint.addr),
                workload: endpoint.workload.as_deref(),
            },
            service: Some(&name),
            security: listed.connection.security,
            bytes_sent: bytes.sent.load(std::sync::atomic::Ordering::Relaxed),
            bytes_received: bytes.received.load(std::sync::atomic::Ordering::Relaxed),
            duration_ms: started.elapsed().as_millis() as u64,
            close_reason: reason.name(),
        });
    }
    match end {
        CopyEnd::UpstreamReset => {
            let normal = Chosen {
                admission: Admission::Normal,
                ..chosen
            };
            route::report(&service, normal, Outcome::Reset, now_ms());
        }
        CopyEnd::Idle => debug!(
            "service {}: endpoint {}: idle for {:?}; closed",
            service.qualified_name(),
            endpoint.addr,
            policy.idle_timeout
        ),
        CopyEnd::Closed | CopyEnd::ClientError | CopyEnd::MaxDuration => {}
    }
}

/// Connects to an endpoint of `service`, retrying on another endpoint
/// within the policy's attempts, thresholds and retry budget. Every failed
/// attempt is reported to outlier detection and logged once.
async fn connect_upstream(
    ctx: &OutboundContext,
    service: &Service,
    pick: &PickContext<'_>,
    source: Option<&Workload>,
) -> Result<(Upstream, Chosen), CloseReason> {
    let policy = &service.policy;
    let mut tried = Tried::default();
    let max_attempts = (policy.max_connect_attempts as usize).min(route::MAX_ATTEMPTS);
    loop {
        let now = now_ms();
        let _retry_slot = if tried.is_empty() {
            None
        } else {
            if tried.len() >= max_attempts {
                return Err(CloseReason::ConnectFailed);
            }
            match service
                .state
                .start_retry(&policy.thresholds, &policy.budget, now)
            {
                Ok(slot) => Some(slot),
                Err(RetryDenied::MaxRetries) => {
                    fail_fast(service, Overflow::MaxRetries);
                    return Err(CloseReason::Overflow);
                }
                // Counted in the service state; the outage is already logged.
                Err(RetryDenied::BudgetExhausted) => return Err(CloseReason::ConnectFailed),
            }
        };
        let chosen = match route::choose(service, pick, &tried, now) {
            Ok(chosen) => chosen,
            Err(NoEndpoint::FailClosed) => {
                fail_fast(service, Overflow::NoEligibleEndpoint);
                return Err(CloseReason::Overflow);
            }
            Err(NoEndpoint::Exhausted) if tried.is_empty() => return Err(CloseReason::NoEndpoint),
            Err(NoEndpoint::Exhausted) => return Err(CloseReason::ConnectFailed),
        };
        tried.add(chosen.index);
        let endpoint = &service.endpoints[chosen.index];
        let Some(_pending) = service.state.start_connect(&policy.thresholds, now) else {
            endpoint.state.cancel(chosen.admission);
            fail_fast(service, Overflow::MaxPendingConnects);
            return Err(CloseReason::Overflow);
        };
        let started = tokio::time::Instant::now();
        match dial(ctx, service, endpoint, source).await {
            Ok(upstream) => {
                let micros = started.elapsed().as_micros() as u64;
                route::report(service, chosen, Outcome::Connected { micros }, now_ms());
                return Ok((upstream, chosen));
            }
            Err(DialError::Denied) => {
                endpoint.state.cancel(chosen.admission);
                return Err(CloseReason::Denied);
            }
            Err(DialError::Caller(why)) => {
                endpoint.state.cancel(chosen.admission);
                warn!(
                    "service {}: endpoint {}: {why}",
                    service.qualified_name(),
                    endpoint.addr
                );
                return Err(CloseReason::ConnectFailed);
            }
            Err(DialError::Endpoint(e)) => {
                warn!(
                    "service {}: endpoint {}: connect failed: {e} (attempt {} of {max_attempts})",
                    service.qualified_name(),
                    endpoint.addr,
                    tried.len()
                );
                route::report(service, chosen, Outcome::ConnectFailed, now_ms());
            }
        }
    }
}

/// One policy whatever the path: a call to a workload on this node is
/// checked against the same authorization as one arriving over mTLS from
/// another node, with the caller's identity as this agent knows it. A
/// caller without an identity reaches a strict workload, or one with a
/// policy, no more than it could from another node.
fn admit_same_node(
    ctx: &OutboundContext,
    service: &Service,
    endpoint: &Endpoint,
    source: Option<&Workload>,
    target: &crate::catalog::LocalTarget,
    mode: InboundMode,
) -> Result<(), DialError> {
    let (allowed, rule) = match source {
        Some(source) => {
            let verdict = authz::evaluate(&target.policies, &source.identity);
            (verdict.allowed, verdict.rule)
        }
        None if mode == InboundMode::Strict || !target.policies.is_empty() => (
            false,
            "the caller is in no known workload, so it has no identity".to_owned(),
        ),
        None => return Ok(()),
    };
    if allowed {
        return Ok(());
    }
    let workload = target.workload.qualified_name();
    let name = service.qualified_name();
    ctx.inputs.audit.deny(&Denial {
        reason: "denied",
        source: Party {
            identity: source.map(|w| &w.identity),
            address: None,
            workload: None,
        },
        destination: Party {
            identity: Some(&target.workload.identity),
            address: Some(endpoint.addr),
            workload: Some(&workload),
        },
        service: Some(&name),
        rule: Some(&rule),
        detail: Some("same node"),
    });
    Err(DialError::Denied)
}

/// Connects to `endpoint`: directly when it is on this node (or the
/// service is plaintext), otherwise over mutual TLS to its node's agent,
/// presenting the caller's identity and expecting the endpoint's.
async fn dial(
    ctx: &OutboundContext,
    service: &Service,
    endpoint: &Endpoint,
    source: Option<&Workload>,
) -> Result<Upstream, DialError> {
    let timeout = service.policy.connect_timeout;
    let meshable = !endpoint.local && service.mode != Mode::Plaintext;
    let identity = match (&endpoint.identity, &endpoint.pod, &ctx.pods) {
        (Some(known), _, _) => Some(known),
        (None, Some(pod), Some(lookup)) if meshable && endpoint.peer.is_some() => {
            Some(learn_identity(pod, lookup, timeout).await?)
        }
        _ => None,
    };
    let mesh_path = match (&endpoint.peer, identity) {
        (Some(peer), Some(dest)) if meshable => Some((*peer, dest)),
        _ => None,
    };
    let Some((peer, dest)) = mesh_path else {
        if !endpoint.local && service.mode == Mode::Mtls {
            // Config validation makes this unreachable; never downgrade.
            return Err(DialError::Caller(format!(
                "no mTLS path to node {} (agent or identity unknown); refusing to send plaintext",
                endpoint.node
            )));
        }
        let mut netns = source.and_then(|w| w.netns.as_deref());
        let catalog = endpoint.local.then(|| ctx.inputs.catalog.load());
        let target = catalog.as_ref().and_then(|c| {
            let t = c.local_target(endpoint.addr)?;
            Some((t.clone(), c.inbound_mode(&t.workload)))
        });
        if let Some((target, mode)) = &target {
            admit_same_node(ctx, service, endpoint, source, target, *mode)?;
            if *mode != InboundMode::Open {
                // A captured workload is reached from inside its own
                // namespace: the capture hook lets its loopback through.
                netns = target.workload.netns.as_deref();
            }
        }
        return connect_marked(endpoint.addr, ctx.inputs.mark, timeout, netns)
            .await
            .map(Upstream::Plain)
            .map_err(DialError::Endpoint);
    };
    let caller_err = |why: &str| Err(DialError::Caller(why.to_owned()));
    let tls = &ctx.inputs.tls;
    let Some(source) = source else {
        return caller_err(
            "the caller is in no known workload cgroup, so it has no identity to present",
        );
    };
    let Some(config) = tls.client_config(&source.identity) else {
        return caller_err("no certificate for the caller's identity yet");
    };
    let Ok(name) = rustls_pki_types::ServerName::try_from(dest.server_name()) else {
        return caller_err("the endpoint's identity makes no valid server name");
    };
    let attempt = async {
        let tcp = connect_marked(peer, ctx.inputs.mark, timeout, source.netns.as_deref()).await?;
        let mut stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        preamble::write(&mut stream, endpoint.addr).await?;
        Ok::<_, io::Error>(Upstream::Tls(Box::new(stream)))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result.map_err(DialError::Endpoint),
        Err(_) => Err(DialError::Endpoint(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no mTLS connection to {peer} within {}ms",
                timeout.as_millis()
            ),
        ))),
    }
}
