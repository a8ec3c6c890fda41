//! The kernel fast path seen from the agent: the outcomes of connects the
//! kernel balanced (kernel-mode services, and fail-open ones while the
//! agent was down) arrive on a ring buffer and feed outlier detection and
//! the metrics, as the proxy's own connects do.

use std::sync::Arc;

use arc_swap::ArcSwap;
use aya::maps::{MapData, RingBuf};
use log::warn;
use sluice_maps::{
    EVENT_CONNECT_FAILED, EVENT_ESTABLISHED, EVENT_MARK_SPOOFED, KernelEvent, addr_from_key,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::Notify,
};

use crate::{
    audit::{Audit, Denial, Party},
    catalog::Catalog,
    clock::now_ms,
    drain::DrainWatch,
    resilience::Outcome,
    route::report_kernel,
    telemetry::{CloseReason, Metrics},
};

/// Reads kernel events until the drain starts. `changed` is notified after
/// a failed connect, so the backend tables are recomputed at once rather
/// than at the next periodic refresh.
pub async fn pump_kernel_events(
    events: RingBuf<MapData>,
    catalog: Arc<ArcSwap<Catalog>>,
    metrics: Arc<Metrics>,
    audit: Arc<Audit>,
    changed: Arc<Notify>,
    drain: DrainWatch,
) {
    drain_ring(
        events,
        "kernel fast-path outcomes",
        drain,
        Some(READ_EVERY),
        |events| {
            let catalog = catalog.load();
            let mut failed = false;
            while let Some(item) = events.next() {
                if item.len() < size_of::<KernelEvent>() {
                    continue;
                }
                // SAFETY: the programs write whole KernelEvents, a plain
                // repr(C) struct; read_unaligned copes with the ring buffer's
                // 8-byte alignment.
                let event: KernelEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                if event.kind == EVENT_MARK_SPOOFED {
                    audit_spoofed_mark(&catalog, &audit, &event);
                    continue;
                }
                failed |= apply(&catalog, &metrics, &event);
            }
            if failed {
                changed.notify_one();
            }
        },
    )
    .await
}

/// How often the outcome ring is read even without a wake-up: successful
/// connects are queued without one (failures wake the agent at once).
const READ_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Calls `read` each time the ring buffer `ring` has data (and every
/// `poll_every`, for records queued without a wake-up), until the drain
/// starts. One reader for every ring buffer the programs fill.
pub async fn drain_ring<T: std::os::fd::AsRawFd>(
    ring: T,
    what: &str,
    mut drain: DrainWatch,
    poll_every: Option<std::time::Duration>,
    mut read: impl FnMut(&mut T),
) {
    let mut tick =
        tokio::time::interval(poll_every.unwrap_or(std::time::Duration::from_secs(3600)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // SAFETY: the ring buffer owns its fd and keeps it open and unchanged
    // until the AsyncFd (which owns the ring buffer) is dropped.
    let mut fd = match unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!("{what} are unavailable: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = drain.draining() => return,
            _ = tick.tick(), if poll_every.is_some() => read(fd.get_mut()),
            ready = fd.readable_mut() => match ready {
                Ok(mut guard) => {
                    read(guard.get_inner_mut());
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!("the reader of {what} stopped: {e}");
                    return;
                }
            },
        }
    }
}

/// A workload set the agent's mark on its socket: the connect hook
/// redirected it like any other; the attempt goes to the audit trail with
/// who made it and what it dialled.
fn audit_spoofed_mark(catalog: &Catalog, audit: &Audit, event: &KernelEvent) {
    let source = catalog.workload_of_caller(event.conn.cgroup_id, &event.conn.ancestors);
    let name = source.map(|w| w.qualified_name());
    let detail = format!(
        "cgroup {}: a socket with the agent's mark, outside the agent's cgroups; redirected \
         like any other connect",
        event.conn.cgroup_id
    );
    audit.attempt(&Denial {
        reason: "mark_spoofed",
        source: Party {
            identity: source.map(|w| &w.identity),
            address: None,
            workload: name.as_deref(),
        },
        destination: Party {
            identity: None,
            address: Some(addr_from_key(
                event.conn.service.addr,
                event.conn.service.port,
            )),
            workload: None,
        },
        service: None,
        rule: Some("the agent's mark counts only from the agent's cgroups"),
        detail: Some(&detail),
    });
}

/// Feeds one event; returns whether it was a failure.
fn apply(catalog: &Catalog, metrics: &Metrics, event: &KernelEvent) -> bool {
    let conn = &event.conn;
    let vip = addr_from_key(conn.service.addr, conn.service.port);
    let Some(service) = catalog.service(vip) else {
        return false;
    };
    let backend = addr_from_key(conn.backend.addr, conn.backend.port);
    let Some(index) = service.endpoints.iter().position(|e| e.addr == backend) else {
        return false;
    };
    let source = catalog
        .workload_of_caller(conn.cgroup_id, &conn.ancestors)
        .map(|w| &**w);
    let handles = service.connection_metrics(metrics, source, Some(index));
    let now = now_ms();
    match event.kind {
        EVENT_ESTABLISHED => {
            let micros = u64::from(event.value);
            handles.opened.inc();
            handles.connect.observe(micros as f64 / 1e6);
            report_kernel(service, index, Outcome::Connected { micros }, now);
            false
        }
        EVENT_CONNECT_FAILED => {
            handles.closed(CloseReason::ConnectFailed).inc();
            report_kernel(service, index, Outcome::ConnectFailed, now);
            true
        }
        _ => false,
    }
}
