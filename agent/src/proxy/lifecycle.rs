//! One proxied connection from the moment its upstream is connected to its
//! close, as operators see it: listed in the live-connections registry
//! (`sluice conns`), counted in metrics, and written to the audit trail
//! when it ends. Outbound and inbound handlers both open one and close it
//! with a reason; everything that must happen at the end happens in its
//! drop, so an early return or a cancelled task cannot skip the books. A
//! connection that moves to the next agent in an upgrade ends here as
//! `handed_over` (no audit line: it has not closed) and is adopted there
//! with its totals so far; each agent's metrics count the bytes it carried.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::SystemTime,
};

use tokio::{sync::oneshot, time::Instant};

use super::connections::{Callee, Caller, Connections, Listed, LiveConnection};
use crate::{
    audit::{Audit, Closed, Party},
    telemetry::{ByteCounters, CloseReason, ConnectionMetrics},
};

/// What a new connection is, for the registry and the audit trail.
pub struct Opening {
    pub caller: Caller,
    pub callee: Callee,
    /// The client's end of the accepted connection.
    pub client: SocketAddr,
    /// The address the agent connected to.
    pub upstream: SocketAddr,
    /// `mutual_tls` or `plaintext`.
    pub security: &'static str,
    /// When the agent took the connection (metrics time it from here).
    pub accepted: Instant,
    /// Whether the connection can move to the next agent in an upgrade
    /// (its copy can be suspended and resumed there).
    pub movable: bool,
}

/// A live proxied connection; see the module comment.
pub struct ConnectionLife<'a> {
    audit: &'a Audit,
    listed: Listed<'a>,
    metrics: Option<Arc<ConnectionMetrics>>,
    accepted: Instant,
    end: Option<CloseReason>,
    /// Bytes (sent, received) counted by the agent it was adopted from.
    carried_in: (u64, u64),
}

impl<'a> ConnectionLife<'a> {
    /// Lists the connection in `registry` and counts it open (in
    /// `metrics`, when the connection has per-service metrics: outbound
    /// ones do); `audit` gets its line at the close.
    pub fn open(
        registry: &'a Connections,
        audit: &'a Audit,
        opening: Opening,
        metrics: Option<Arc<ConnectionMetrics>>,
    ) -> ConnectionLife<'a> {
        if let Some(m) = &metrics {
            m.opened.inc();
            m.connect.observe(opening.accepted.elapsed().as_secs_f64());
        }
        ConnectionLife::adopt(registry, audit, opening, metrics, (0, 0))
    }

    /// Lists a connection the previous agent carried until an upgrade:
    /// not counted as opened again, its totals so far (`carried_in`: sent,
    /// received) kept for the registry and the audit trail. (A new one is
    /// listed the same way, with nothing carried in.)
    pub fn adopt(
        registry: &'a Connections,
        audit: &'a Audit,
        opening: Opening,
        metrics: Option<Arc<ConnectionMetrics>>,
        carried_in: (u64, u64),
    ) -> ConnectionLife<'a> {
        if let Some(m) = &metrics {
            m.active.inc();
        }
        let accepted = opening.accepted;
        let bytes = ByteCounters::default();
        bytes.sent.store(carried_in.0, Ordering::Relaxed);
        bytes.received.store(carried_in.1, Ordering::Relaxed);
        let listed = registry.add(
            |id| LiveConnection {
                id,
                caller: opening.caller,
                callee: opening.callee,
                client: opening.client,
                endpoint: opening.upstream,
                security: opening.security,
                started: SystemTime::now() - accepted.elapsed(),
                bytes,
            },
            opening.movable,
        );
        ConnectionLife {
            audit,
            listed,
            metrics,
            accepted,
            end: None,
            carried_in,
        }
    }

    /// The counters the copy loop adds to.
    pub fn bytes(&self) -> &ByteCounters {
        &self.listed.connection.bytes
    }

    /// The counters, and the signal to move (for a movable connection),
    /// as the copy takes them.
    pub fn copy_parts(&mut self) -> (&ByteCounters, Option<&mut oneshot::Receiver<()>>) {
        (&self.listed.connection.bytes, self.listed.moving.as_mut())
    }

    /// The connection as listed.
    pub fn connection(&self) -> &LiveConnection {
        &self.listed.connection
    }

    /// The client's address and the endpoint's, as listed.
    pub fn addresses(&self) -> (SocketAddr, SocketAddr) {
        let c = &self.listed.connection;
        (c.client, c.endpoint)
    }

    /// How long ago the agent (or the one before it) took the connection.
    pub fn age(&self) -> std::time::Duration {
        self.accepted.elapsed()
    }

    /// Ends the connection with `reason`.
    pub fn close(mut self, reason: CloseReason) {
        self.end = Some(reason);
    }

    /// The connection finishes in this agent after all (its tunnel's peer
    /// agent cannot pause it): it is told to move no more.
    pub fn stay(&mut self) {
        self.listed.moving = None;
    }

    /// Ends the connection here: it moved to the next agent.
    pub fn hand_over(self) {
        self.close(CloseReason::HandedOver);
    }
}

impl Drop for ConnectionLife<'_> {
    fn drop(&mut self) {
        // Dropped without a close: the task went away mid-copy (a runtime
        // shutting down), which the client sees as an error.
        let reason = self.end.unwrap_or(CloseReason::ClientError);
        let connection = &self.listed.connection;
        let (sent, received) = connection.bytes.totals();
        if let Some(m) = &self.metrics {
            m.sent.inc_by(sent.saturating_sub(self.carried_in.0));
            m.received
                .inc_by(received.saturating_sub(self.carried_in.1));
            m.duration.observe(self.accepted.elapsed().as_secs_f64());
            m.active.dec();
            m.closed(reason).inc();
        }
        let audit = self.audit;
        if audit.wants_connections() && reason != CloseReason::HandedOver {
            let source_workload = connection.caller.workload_name();
            let (destination, service) = connection.callee.audited();
            audit.closed(&Closed {
                source: Party {
                    identity: connection.caller.identity(),
                    address: Some(connection.client),
                    workload: source_workload.as_deref(),
                },
                destination: Party {
                    identity: destination.identity,
                    address: Some(connection.endpoint),
                    workload: destination.workload.as_deref(),
                },
                service: service.as_deref(),
                security: connection.security,
                bytes_sent: sent,
                bytes_received: received,
                duration_ms: self.accepted.elapsed().as_millis() as u64,
                close_reason: reason.name(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::{
        config::{AuditConfig, AuditOutput},
        telemetry::{
            Metrics,
            metrics::{ConnectionLabels, ServiceLabels},
        },
    };

    fn metrics() -> (Arc<Metrics>, Arc<ConnectionMetrics>) {
        let metrics = Metrics::new(None);
        let labels = ConnectionLabels {
            source_workload: "checkout".into(),
            source_workload_namespace: "shop".into(),
            destination_service: "payments".into(),
            destination_service_namespace: "shop".into(),
            destination_workload: "unknown".into(),
            connection_security_policy: "plaintext",
            mode: "proxy",
        };
        let service = ServiceLabels {
            destination_service: "payments".into(),
            destination_service_namespace: "shop".into(),
            connection_security_policy: "plaintext",
        };
        let handles = Arc::new(metrics.handles(labels, service));
        (metrics, handles)
    }

    fn opening() -> Opening {
        Opening {
            caller: Caller::Outside,
            callee: Callee::Workload(Arc::new(crate::catalog::Workload {
                name: "payments".into(),
                namespace: "default".into(),
                service_account: "payments".into(),
                cgroup: "/sys/fs/cgroup/payments".into(),
                cgroup_id: 7,
                identity: crate::tls::Identity {
                    trust_domain: "td".into(),
                    namespace: "default".into(),
                    service_account: "payments".into(),
                },
                policy: None,
                netns: None,
                rate_limit: None,
            })),
            client: "10.0.0.1:40000".parse().unwrap(),
            upstream: "127.0.0.1:8080".parse().unwrap(),
            security: "plaintext",
            accepted: Instant::now(),
            movable: true,
        }
    }

    fn value(exposition: &str, prefix: &str) -> u64 {
        exposition
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn audit_to_file(tag: &str) -> (Arc<Audit>, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("sluice-lifecycle-{}-{tag}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let audit = Audit::start(&AuditConfig {
            output: AuditOutput::File(path.clone()),
            connections: true,
            requests: false,
            queue: 16,
        })
        .unwrap();
        (audit, path)
    }

    #[test]
    fn a_closed_connection_is_counted_audited_and_unlisted() {
        let (metrics, handles) = metrics();
        let registry = Connections::default();
        let (audit, path) = audit_to_file("closed");
        let life = ConnectionLife::open(&registry, &audit, opening(), Some(handles));
        life.bytes().sent.fetch_add(120, Ordering::Relaxed);
        life.bytes().received.fetch_add(80, Ordering::Relaxed);
        assert_eq!(registry.snapshot().len(), 1);
        let text = metrics.encode();
        assert_eq!(value(&text, "sluice_tcp_connections_active{"), 1);
        assert_eq!(value(&text, "sluice_tcp_connections_opened_total{"), 1);

        life.close(CloseReason::IdleTimeout);
        assert!(registry.snapshot().is_empty());
        let text = metrics.encode();
        assert_eq!(value(&text, "sluice_tcp_connections_active{"), 0);
        assert_eq!(value(&text, "sluice_tcp_sent_bytes_total{"), 120);
        assert_eq!(value(&text, "sluice_tcp_received_bytes_total{"), 80);
        let closed = |reason: &str| {
            text.lines()
                .filter(|l| {
                    l.starts_with("sluice_tcp_connections_closed_total{")
                        && l.contains(&format!("reason=\"{reason}\""))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        };
        assert_eq!(closed("idle_timeout"), 1);
        assert_eq!(closed("closed"), 0);
        assert_eq!(audit.queued(), 1);
        drop(audit);
        let wait = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let line = loop {
            let line = std::fs::read_to_string(&path).unwrap_or_default();
            if line.contains('\n') || std::time::Instant::now() > wait {
                break line;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(line.contains("\"close_reason\":\"idle_timeout\""), "{line}");
        assert!(line.contains("\"bytes_sent\":120"), "{line}");
        assert!(line.contains("\"workload\":\"default/payments\""), "{line}");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_connection_dropped_without_a_close_counts_as_a_client_error() {
        let (metrics, handles) = metrics();
        let registry = Connections::default();
        let audit = Audit::disabled();
        drop(ConnectionLife::open(
            &registry,
            &audit,
            opening(),
            Some(handles),
        ));
        assert!(registry.snapshot().is_empty());
        let text = metrics.encode();
        assert!(
            text.lines()
                .any(|l| l.contains("reason=\"client_error\"") && l.ends_with(" 1")),
            "{text}"
        );
        assert_eq!(value(&text, "sluice_tcp_connections_active{"), 0);
    }
}
