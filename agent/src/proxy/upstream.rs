//! An outbound connection's way to its upstream: choose an endpoint, admit
//! a same-node call through the same authorization as a remote one, dial
//! (directly, or over mTLS to the endpoint's node with the caller's
//! identity), and on failure report the endpoint and try another within
//! the service's attempts, thresholds and retry budget.

use std::{io, time::Duration};

use log::warn;
use tokio::net::TcpStream;

use super::{
    outbound::OutboundContext,
    paused::{Parties, TunnelEnd, TunnelSide},
    tunnels::{Carries, TunnelKey, Tunnels},
};
use crate::{
    audit::{Denial, Party},
    authz,
    carry::preamble,
    catalog::{Endpoint, PodIdentity, Service, Workload, capture::InboundMode},
    clock::now_ms,
    config::Mode,
    connect::connect_marked,
    discovery::PodLookup,
    lb::PickContext,
    resilience::{Outcome, Overflow, RetryDenied},
    route::{self, Chosen, NoEndpoint, Tried},
    telemetry::CloseReason,
    tls::{Identity, session::TlsSession},
    tunnel::{TunnelError, TunnelStream},
};

/// The identity of the pod behind an endpoint on another node, read from
/// the API server at the first connection to it (within the connect
/// timeout). Failing that, the endpoint cannot be verified, so it is not
/// dialled: the attempt counts against it and another may be tried.
async fn learn_identity<'a>(
    pod: &'a PodIdentity,
    lookup: &PodLookup,
    timeout: Duration,
) -> Result<&'a Identity, DialError> {
    let learn = pod.resolve(|| lookup.identity(&pod.pod));
    let failed = |why: String| {
        DialError::Endpoint(io::Error::other(format!(
            "cannot learn the identity of pod {}/{}: {why}",
            pod.pod.namespace, pod.pod.name
        )))
    };
    match tokio::time::timeout(timeout, learn).await {
        Ok(Ok(identity)) => Ok(identity),
        Ok(Err(why)) => Err(failed(why.to_string())),
        Err(_) => Err(failed(format!(
            "no answer from the API server within {}ms",
            timeout.as_millis()
        ))),
    }
}

/// An upstream connection: direct, or over mTLS to the peer node's agent.
pub(super) enum Upstream {
    Plain(TcpStream),
    Tls(Box<TlsSession>),
    /// A stream of a pooled tunnel connection to the peer node's agent,
    /// and who is at either end of it (for a move).
    Tunnel(Box<TunnelStream>, Box<TunnelSide>),
}

/// Why a dial failed.
pub(super) enum DialError {
    /// The endpoint failed: counts against it, and may be retried.
    Endpoint(io::Error),
    /// Nothing the endpoint did: this caller cannot take that path.
    Caller(NoMeshPath),
    /// The endpoint's workload (on this node) does not admit the caller.
    Denied,
}

/// Why a caller cannot reach a remote endpoint over mTLS; nothing the
/// endpoint did, so it does not count against it.
#[derive(Debug, thiserror::Error)]
pub(super) enum NoMeshPath {
    #[error("no mTLS path to node {node} (agent or identity unknown); refusing to send plaintext")]
    NoPeer { node: String },
    #[error("the caller is in no known workload cgroup, so it has no identity to present")]
    NoCallerIdentity,
    #[error("no certificate for the caller's identity {0} yet")]
    NoCertificate(Identity),
    #[error("the endpoint's identity {0} makes no valid server name")]
    BadServerName(Identity),
}

/// Counts a fast failure; the first of an episode is logged.
pub(super) fn fail_fast(service: &Service, why: Overflow) {
    if service.state.fail_fast(why) {
        warn!(
            "service {}: {} reached; failing new connections fast",
            service.qualified_name(),
            why.name()
        );
    }
}

/// Connects to an endpoint of `service`, retrying on another endpoint
/// within the policy's attempts, thresholds and retry budget. Every failed
/// attempt is reported to outlier detection and logged once.
pub(super) async fn connect_upstream(
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
        let carries = Carries::Connection;
        match dial(ctx, service, endpoint, source, pick.source_addr, carries).await {
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
/// presenting the caller's identity and expecting the endpoint's; a
/// tunnel stream is told what it `carries`.
pub(super) async fn dial(
    ctx: &OutboundContext,
    service: &Service,
    endpoint: &Endpoint,
    source: Option<&Workload>,
    caller: std::net::IpAddr,
    carries: Carries,
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
            return Err(DialError::Caller(NoMeshPath::NoPeer {
                node: endpoint.node.clone(),
            }));
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
    let tls = &ctx.inputs.tls;
    let Some(source) = source else {
        return Err(DialError::Caller(NoMeshPath::NoCallerIdentity));
    };
    if let Some(tunnels) = &ctx.tunnels {
        let key = TunnelKey {
            source: source.identity.clone(),
            netns: source.netns.clone(),
            node: peer,
            dest: dest.clone(),
        };
        return tunnel(tunnels, &key, endpoint.addr, (caller, carries), timeout).await;
    }
    let Some(config) = tls.client_config(&source.identity) else {
        return Err(DialError::Caller(NoMeshPath::NoCertificate(
            source.identity.clone(),
        )));
    };
    let Ok(name) = rustls_pki_types::ServerName::try_from(dest.server_name()) else {
        return Err(DialError::Caller(NoMeshPath::BadServerName(dest.clone())));
    };
    let (mark, netns, target) = (ctx.inputs.mark, source.netns.clone(), endpoint.addr);
    let name = name.to_owned();
    let attempt = async move {
        let tcp = connect_marked(peer, mark, timeout, netns.as_deref()).await?;
        let mut stream = TlsSession::client(config, name, tcp).await?;
        preamble::write(&mut stream, target).await?;
        Ok(stream)
    };
    let what = format!("an mTLS connection to {peer}");
    handshake_apart(ctx.handshakes.as_ref(), timeout, what, attempt)
        .await
        .map(|s| Upstream::Tls(Box::new(s)))
        .map_err(DialError::Endpoint)
}

/// Runs `handshake` (a connect and a TLS handshake) within `timeout` on
/// `runtime`, apart from the data-plane workers, and gives its session
/// back registered here, where its data phase runs; with no runtime, here.
/// `what` names the connection in a timeout's error.
pub(super) async fn handshake_apart(
    runtime: Option<&tokio::runtime::Handle>,
    timeout: Duration,
    what: String,
    handshake: impl Future<Output = io::Result<TlsSession>> + Send + 'static,
) -> io::Result<TlsSession> {
    let bounded = async move {
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no {what} within {}ms", timeout.as_millis()),
                )
            })?
    };
    match runtime {
        Some(runtime) => runtime
            .spawn(bounded)
            .await
            .map_err(|e| io::Error::other(format!("the handshake task failed: {e}")))??
            .rebind(&tokio::runtime::Handle::current()),
        None => bounded.await,
    }
}

/// A stream to `target` over a pooled tunnel connection. The peer agent's
/// 401 is a policy refusal (it audited it), not the endpoint's failure.
async fn tunnel(
    tunnels: &Tunnels,
    key: &TunnelKey,
    target: std::net::SocketAddr,
    (caller, carries): (std::net::IpAddr, Carries),
    timeout: Duration,
) -> Result<Upstream, DialError> {
    match tokio::time::timeout(timeout, tunnels.connect(key, target, caller, carries)).await {
        Ok(Ok((stream, key))) => {
            let end = TunnelEnd {
                parties: Parties::Dialled(key),
                target,
            };
            Ok(Upstream::Tunnel(Box::new(stream), TunnelSide::new(end)))
        }
        Ok(Err(TunnelError::Refused { status, .. }))
            if status == http::StatusCode::UNAUTHORIZED =>
        {
            Err(DialError::Denied)
        }
        Ok(Err(e)) => Err(DialError::Endpoint(io::Error::other(e))),
        Err(_) => Err(DialError::Endpoint(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no tunnel stream to {target} through {} within {}ms",
                key.node,
                timeout.as_millis()
            ),
        ))),
    }
}
