//! The outbound listener: connections the connect hook redirected land here.
//! One listener per workload network namespace; in the local default that
//! is the host's namespace only.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use log::{debug, info, warn};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::{
    copy::{CopyEnd, proxy},
    socket::{connect_marked, netns_cookie},
};
use crate::{
    catalog::{Catalog, Service},
    drain::{ConnectionGuard, DrainWatch},
    lb::PickContext,
    redirect::PeerRecords,
    resilience::{
        self, Admission, Chosen, NoEndpoint, Outcome, Overflow, RetryDenied, Tried, clock::now_ms,
    },
};
/// Pending connections the kernel queues for one listener.
const BACKLOG: u32 = 4096;

/// What every outbound connection needs, shared by all listeners.
pub struct OutboundContext {
    /// Swapped whole on change; read without a lock.
    pub catalog: Arc<ArcSwap<Catalog>>,
    pub records: Arc<PeerRecords>,
    pub mark: u32,
}

/// A bound outbound listener in one network namespace.
pub struct OutboundListener {
    listener: TcpListener,
    netns_cookie: u64,
}

impl OutboundListener {
    /// Binds `addr` in the current network namespace.
    pub fn bind(addr: SocketAddr) -> io::Result<OutboundListener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket
            .bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
        let netns_cookie = netns_cookie(&socket)?;
        let listener = socket.listen(BACKLOG)?;
        Ok(OutboundListener {
            listener,
            netns_cookie,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until the drain starts, then closes the listener (new
    /// redirected connects are refused at once) and returns. Connections
    /// already accepted go on in their own tasks, tracked by `drain`.
    pub async fn serve(self, ctx: Arc<OutboundContext>, mut drain: DrainWatch) {
        loop {
            let accepted = tokio::select! {
                biased;
                _ = drain.draining() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((client, peer)) => {
                    let guard = drain.track();
                    let ctx = ctx.clone();
                    let netns = self.netns_cookie;
                    tokio::spawn(async move { handle(ctx, client, peer, netns, guard).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    warn!("outbound listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
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
        let catalog = ctx.catalog.load();
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
            catalog.workload_by_cgroup(record.cgroup_id).cloned(),
        )
    };
    let policy = &service.policy;
    let Some(_connection_slot) = service.state.open_connection(&policy.thresholds) else {
        fail_fast(&service, Overflow::MaxConnections);
        return reset(client);
    };
    let pick = PickContext {
        source_workload: source.as_deref().map(|w| w.name.as_str()),
        source_addr: peer.ip(),
    };
    let Some((mut upstream, chosen)) = connect_upstream(&ctx, &service, &pick).await else {
        return reset(client);
    };
    if service.state.note_served() {
        info!(
            "service {}: below its thresholds again; serving new connections",
            service.qualified_name()
        );
    }
    let endpoint = &service.endpoints[chosen.index];
    let _in_flight = endpoint.state.open_connection();
    let mut client = client;
    let _ = client.set_nodelay(true);
    let (end, _bytes) = proxy(
        &mut client,
        &mut upstream,
        policy.idle_timeout,
        policy.max_connection_duration,
    )
    .await;
    match end {
        CopyEnd::UpstreamReset => {
            let normal = Chosen {
                admission: Admission::Normal,
                ..chosen
            };
            resilience::report(&service, normal, Outcome::Reset, now_ms());
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
) -> Option<(TcpStream, Chosen)> {
    let policy = &service.policy;
    let mut tried = Tried::default();
    let max_attempts = (policy.max_connect_attempts as usize).min(resilience::MAX_ATTEMPTS);
    loop {
        let now = now_ms();
        let _retry_slot = if tried.is_empty() {
            None
        } else {
            if tried.len() >= max_attempts {
                return None;
            }
            match service
                .state
                .start_retry(&policy.thresholds, &policy.budget, now)
            {
                Ok(slot) => Some(slot),
                Err(RetryDenied::MaxRetries) => {
                    fail_fast(service, Overflow::MaxRetries);
                    return None;
                }
                // Counted in the service state; the outage is already logged.
                Err(RetryDenied::BudgetExhausted) => return None,
            }
        };
        let chosen = match resilience::choose(service, pick, &tried, now) {
            Ok(chosen) => chosen,
            Err(NoEndpoint::FailClosed) => {
                fail_fast(service, Overflow::NoEligibleEndpoint);
                return None;
            }
            Err(NoEndpoint::Exhausted) => return None,
        };
        tried.add(chosen.index);
        let endpoint = &service.endpoints[chosen.index];
        let Some(_pending) = service.state.start_connect(&policy.thresholds, now) else {
            endpoint.state.cancel(chosen.admission);
            fail_fast(service, Overflow::MaxPendingConnects);
            return None;
        };
        let started = tokio::time::Instant::now();
        match connect_marked(endpoint.addr, ctx.mark, policy.connect_timeout).await {
            Ok(upstream) => {
                let micros = started.elapsed().as_micros() as u64;
                resilience::report(service, chosen, Outcome::Connected { micros }, now_ms());
                return Some((upstream, chosen));
            }
            Err(e) => {
                warn!(
                    "service {}: endpoint {}: connect failed: {e} (attempt {} of {max_attempts})",
                    service.qualified_name(),
                    endpoint.addr,
                    tried.len()
                );
                resilience::report(service, chosen, Outcome::ConnectFailed, now_ms());
            }
        }
    }
}
