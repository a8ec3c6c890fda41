//! The capture listener: connections that arrived at a captured workload
//! from outside its network namespace (another pod, another node, a host
//! process), steered here by the `sluice_capture` sk_lookup hook. One per
//! network namespace that holds a captured workload.
//!
//! The accepted socket's local address is the one the caller dialled (the
//! hook steers without rewriting). A strict workload's connection is
//! refused, counted and audited; a permissive one's is passed on from
//! inside the workload's namespace, over its loopback, which the hook lets
//! through.

use std::{io, net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{
    ProxyInputs,
    connections::{Callee, Caller},
    lifecycle::{ConnectionLife, Opening},
    moved::{MovedRecord, NotCarried, NotResumed, carry_or_move},
};
use crate::{
    accept::accept_until_drained,
    audit::{Denial, Party},
    carry::copy::{Limits, Suspended},
    catalog::capture::InboundMode,
    config::policy::DEFAULT_IDLE_TIMEOUT,
    connect::{BoundListener, connect_marked},
    drain::{ConnectionGuard, DrainWatch},
    handover::Inherited,
    netns::Netns,
    telemetry::Refusal,
};

const BACKLOG: u32 = 1024;

/// A bound capture listener in one network namespace.
pub struct CaptureListener(BoundListener);

impl std::ops::Deref for CaptureListener {
    type Target = BoundListener;
    fn deref(&self) -> &BoundListener {
        &self.0
    }
}

impl CaptureListener {
    /// Binds `addr` inside `netns` (the node's own namespace when `None`),
    /// or takes the previous agent's socket for it.
    pub fn bind_in(
        addr: SocketAddr,
        inherited: &Inherited,
        netns: Option<&Netns>,
    ) -> io::Result<CaptureListener> {
        BoundListener::bind_in(addr, BACKLOG, inherited, netns).map(CaptureListener)
    }

    /// Accepts until the drain starts.
    pub async fn serve(self, ctx: Arc<ProxyInputs>, mut drain: DrainWatch) {
        accept_until_drained(
            self.listener(),
            &mut drain,
            "capture",
            |stream, peer, guard| {
                let ctx = ctx.clone();
                tokio::spawn(handle(ctx, stream, peer, guard));
            },
        )
        .await;
    }
}

// Not an `async fn`, as the outbound listener's handler.
#[expect(clippy::manual_async_fn, reason = "see above")]
fn handle(
    ctx: Arc<ProxyInputs>,
    stream: TcpStream,
    peer: SocketAddr,
    guard: ConnectionGuard,
) -> impl Future<Output = ()> {
    async move {
        let _guard = guard;
        let Ok(local) = stream.local_addr() else {
            return;
        };
        let Some(target) = ctx.catalog.load().capture_for(local).cloned() else {
            // The workload left between the connect and the accept.
            let _ = stream.set_zero_linger();
            return;
        };
        let workload = &target.workload;
        let name = workload.qualified_name();
        let destination = Party {
            identity: Some(&workload.identity),
            address: Some(local),
            workload: Some(&name),
        };
        let source = Party {
            identity: None,
            address: Some(peer),
            workload: None,
        };
        if target.mode == InboundMode::Strict {
            ctx.inbound_stats.count_refusal(Refusal::Plaintext);
            ctx.audit.deny(&Denial {
                reason: Refusal::Plaintext.name(),
                source,
                destination,
                service: None,
                rule: Some("strict: only the mesh (mutual TLS) may reach this workload"),
                detail: None,
            });
            ctx.refusals.warn(Refusal::Plaintext.name(), || {
                format!(
                    "captured {peer} -> {local} ({name}): refused: plaintext to a strict workload"
                )
            });
            let _ = stream.set_zero_linger();
            return;
        }
        let upstream = match connect_marked(
            local,
            ctx.mark,
            ctx.connect_timeout,
            workload.netns.as_deref(),
        )
        .await
        {
            Ok(upstream) => upstream,
            Err(e) => {
                ctx.inbound_stats.count_refusal(Refusal::TargetUnreachable);
                ctx.refusals.warn(Refusal::TargetUnreachable.name(), || {
                    format!("captured {peer} -> {local} ({name}): workload unreachable: {e}")
                });
                let _ = stream.set_zero_linger();
                return;
            }
        };
        ctx.inbound_stats.count_plaintext_passed();
        let life = ConnectionLife::open(
            &ctx.connections,
            &ctx.audit,
            Opening {
                caller: Caller::Outside,
                callee: Callee::Workload(workload.clone()),
                client: peer,
                upstream: local,
                security: "plaintext",
                accepted: tokio::time::Instant::now(),
                movable: true,
            },
            None,
        );
        let from = Suspended::default();
        let limits = Limits {
            idle: DEFAULT_IDLE_TIMEOUT,
            lifetime: None,
        };
        carry_or_move(&ctx, stream, upstream, life, limits, from, None).await;
    }
}

/// Carries on a captured connection the previous agent moved here, to the
/// same workload.
pub(super) async fn resume(
    inputs: &Arc<ProxyInputs>,
    client: TcpStream,
    upstream: TcpStream,
    workload: &str,
    record: &MovedRecord,
    _guard: ConnectionGuard,
) -> Result<(), NotCarried> {
    let found = inputs
        .catalog
        .load()
        .workloads()
        .iter()
        .find(|w| w.name == workload)
        .cloned();
    let Some(target) = found else {
        let why = NotResumed::NoWorkload(workload.to_owned());
        return Err((why, Some((client, upstream))));
    };
    inputs.metrics.handover_connection("received");
    let life = ConnectionLife::adopt(
        &inputs.connections,
        &inputs.audit,
        Opening {
            caller: Caller::Outside,
            callee: Callee::Workload(target),
            client: record.client,
            upstream: record.upstream,
            security: "plaintext",
            accepted: record.accepted(),
            movable: true,
        },
        None,
        (record.sent, record.received),
    );
    let limits = Limits {
        idle: DEFAULT_IDLE_TIMEOUT,
        lifetime: None,
    };
    carry_or_move(
        inputs,
        client,
        upstream,
        life,
        limits,
        record.copy.clone(),
        None,
    )
    .await;
    Ok(())
}
