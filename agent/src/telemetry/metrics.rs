//! Prometheus metrics, in Istio's vocabulary with a `sluice_` prefix.
//!
//! Per-connection metrics are label families; the handles a connection
//! needs are resolved once per (source workload, endpoint) and cached in
//! the service ([`MetricsCache`]), so the accept path neither allocates
//! labels nor takes the families' lock. Everything the agent already
//! counts elsewhere is read at scrape time by a collector registered here
//! (the admin's `StateCollector`). No label carries an address, a port or
//! anything else unbounded.

use std::{collections::HashMap, sync::Arc};

use super::{TunnelMetrics, requests::RequestMetrics};

use arc_swap::ArcSwap;
use prometheus_client::{
    collector::Collector,
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Labels of a proxied connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_workload: String,
    /// `mutual_tls` or `plaintext`.
    pub connection_security_policy: &'static str,
    /// `proxy`, or `kernel` for services the kernel balances.
    pub mode: &'static str,
}

/// Labels of a closed connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    #[prometheus(flatten)]
    pub connection: ConnectionLabels,
    pub reason: &'static str,
}

/// Labels of per-service histograms and gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub connection_security_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpdateLabels {
    /// `services`: only the services an event changed were built;
    /// `whole`: the whole catalog was.
    kind: &'static str,
}

/// How a proxied connection ended, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed normally.
    Closed,
    UpstreamReset,
    ClientError,
    IdleTimeout,
    MaxDuration,
    /// Every connect attempt failed.
    ConnectFailed,
    /// Failed fast by a circuit-breaker threshold.
    Overflow,
    /// No endpoint could be chosen.
    NoEndpoint,
    /// Authorization refused the caller (an endpoint on this node).
    Denied,
    /// Moved, open, to the next agent in an upgrade (it goes on there).
    HandedOver,
}

impl CloseReason {
    const ALL: [CloseReason; 10] = [
        CloseReason::Closed,
        CloseReason::UpstreamReset,
        CloseReason::ClientError,
        CloseReason::IdleTimeout,
        CloseReason::MaxDuration,
        CloseReason::ConnectFailed,
        CloseReason::Overflow,
        CloseReason::NoEndpoint,
        CloseReason::Denied,
        CloseReason::HandedOver,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Closed => "closed",
            CloseReason::UpstreamReset => "upstream_reset",
            CloseReason::ClientError => "client_error",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MaxDuration => "max_duration",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::Overflow => "overflow",
            CloseReason::NoEndpoint => "no_endpoint",
            CloseReason::Denied => "denied",
            CloseReason::HandedOver => "handed_over",
        }
    }
}

/// Buckets from 10 µs to ~42 s: connect latency and connection duration
/// both fit.
fn time_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 2.0, 23))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The agent's registry and its label families.
pub struct Metrics {
    registry: Registry,
    opened: Family<ConnectionLabels, Counter>,
    closed: Family<CloseLabels, Counter>,
    sent: Family<ConnectionLabels, Counter>,
    received: Family<ConnectionLabels, Counter>,
    duration: HistogramFamily<ServiceLabels>,
    connect: HistogramFamily<ServiceLabels>,
    active: Family<ServiceLabels, Gauge>,
    reloads: Family<ResultLabels, Counter>,
    restart_pending: Family<FieldLabel, Gauge>,
    catalog_updates: Family<UpdateLabels, Counter>,
    handover_refusals: Family<ReasonLabel, Counter>,
    handover_connections: Family<ResultLabels, Counter>,
    pub tunnels: TunnelMetrics,
    pub requests: RequestMetrics,
}

/// The handles one kind of connection (source workload, endpoint) needs.
#[derive(Debug)]
pub struct ConnectionMetrics {
    pub opened: Counter,
    closed: [Counter; CloseReason::ALL.len()],
    pub sent: Counter,
    pub received: Counter,
    pub duration: Histogram,
    pub connect: Histogram,
    pub active: Gauge,
}

impl ConnectionMetrics {
    pub fn closed(&self, reason: CloseReason) -> &Counter {
        &self.closed[reason as usize]
    }
}

/// Key of the per-service cache: source workload cgroup id (0 when
/// unknown) and endpoint index (`usize::MAX` before an endpoint is chosen).
pub type MetricsKey = (u64, usize);

/// Per-service cache of [`ConnectionMetrics`], read without a lock.
#[derive(Debug, Default)]
pub struct MetricsCache {
    map: ArcSwap<HashMap<MetricsKey, Arc<ConnectionMetrics>>>,
}

impl Metrics {
    /// Registers every family and `collector`.
    pub fn new(collector: Option<Box<dyn Collector>>) -> Arc<Metrics> {
        let mut registry = Registry::default();
        let opened = Family::default();
        let closed = Family::default();
        let sent = Family::default();
        let received = Family::default();
        let duration: HistogramFamily<ServiceLabels> =
            Family::new_with_constructor(time_buckets as fn() -> Histogram);
        let connect: HistogramFamily<ServiceLabels> =
            Family::new_with_constructor(time_buckets as fn() -> Histogram);
        let active = Family::default();
        // Both results from the start, at 0: a failed reload shows as a
        // rise, and a dashboard has a series before the first one.
        let reloads = Family::<ResultLabels, Counter>::default();
        for result in ["success", "failure"] {
            drop(reloads.get_or_create(&ResultLabels { result }));
        }
        let restart_pending = Family::<FieldLabel, Gauge>::default();
        for field in crate::config::RESTART_ONLY {
            drop(restart_pending.get_or_create(&FieldLabel { field }));
        }
        let catalog_updates = Family::default();
        let handover_refusals = Family::<ReasonLabel, Counter>::default();
        let handover_connections = Family::<ResultLabels, Counter>::default();
        for result in ["sent", "received", "dropped", "taken_up"] {
            let _ = handover_connections.get_or_create(&ResultLabels { result });
        }
        registry.register(
            "sluice_handover_connections",
            "Open connections moved in an upgrade: sent to the next agent, received from the previous one, received and dropped (their service or workload gone here, or a paused tunnel stream not taken up in time), or taken up here (a tunnelled connection kept paused while its peer agent was upgraded)",
            handover_connections.clone(),
        );
        // Every reason from the start, at 0: an alert can watch the rate
        // before the first refusal.
        registry.register(
            "sluice_tcp_connections_opened",
            "Connections opened: proxied ones when the client's connection is taken, kernel-balanced ones when their connect completes",
            opened.clone(),
        );
        registry.register(
            "sluice_tcp_connections_closed",
            "Connections ended, by reason",
            closed.clone(),
        );
        registry.register(
            "sluice_tcp_sent_bytes",
            "Bytes from the client to the destination",
            sent.clone(),
        );
        registry.register(
            "sluice_tcp_received_bytes",
            "Bytes from the destination to the client",
            received.clone(),
        );
        registry.register(
            "sluice_tcp_connection_duration_seconds",
            "How long proxied connections lived",
            duration.clone(),
        );
        registry.register(
            "sluice_upstream_connect_duration_seconds",
            "Time to connect upstream (TCP, plus the TLS handshake over mTLS)",
            connect.clone(),
        );
        registry.register(
            "sluice_tcp_connections_active",
            "Connections open now",
            active.clone(),
        );
        registry.register(
            "sluice_config_reloads",
            "Config reloads, by result",
            reloads.clone(),
        );
        registry.register(
            "sluice_config_restart_pending",
            "1 for each field the config file in force changed that only a restart applies (every field is listed, at 0 when the running agent has it)",
            restart_pending.clone(),
        );
        registry.register(
            "sluice_catalog_updates",
            "Catalogs put in force after a Kubernetes change, by how they were built",
            catalog_updates.clone(),
        );
        registry.register(
            "sluice_handover_refusals",
            "Peers on the handover socket that got no socket, by reason",
            handover_refusals.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("sluice_build_info", "Build of the running agent", build);
        let tunnels = TunnelMetrics::new(&mut registry);
        let requests = RequestMetrics::new(&mut registry);
        if let Some(c) = collector {
            registry.register_collector(c);
        }
        Arc::new(Metrics {
            registry,
            opened,
            closed,
            sent,
            received,
            duration,
            connect,
            active,
            reloads,
            restart_pending,
            catalog_updates,
            handover_refusals,
            handover_connections,
            tunnels,
            requests,
        })
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The Prometheus text format (0.0.4), for scrapers and tools that do
    /// not ask for OpenMetrics: counter families are named with their
    /// `_total` suffix, and there is no `# EOF`.
    pub fn encode_prometheus_text(&self) -> String {
        openmetrics_to_prometheus_text(&self.encode())
    }

    /// Counts a config reload.
    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: if ok { "success" } else { "failure" },
            })
            .inc();
    }

    /// Marks the fields in `pending` as waiting for a restart, and the
    /// others as in force.
    pub fn set_restart_pending(&self, pending: &[&'static str]) {
        for field in crate::config::RESTART_ONLY {
            self.restart_pending
                .get_or_create(&FieldLabel { field })
                .set(i64::from(pending.contains(&field)));
        }
    }

    /// The fields a reload changed that wait for a restart.
    pub fn restart_pending(&self) -> Vec<&'static str> {
        crate::config::RESTART_ONLY
            .into_iter()
            .filter(|&field| {
                self.restart_pending
                    .get_or_create(&FieldLabel { field })
                    .get()
                    != 0
            })
            .collect()
    }

    /// Counts a catalog built after a Kubernetes change: `whole`, or only
    /// the changed services.
    pub fn catalog_update(&self, whole: bool) {
        self.catalog_updates
            .get_or_create(&UpdateLabels {
                kind: if whole { "whole" } else { "services" },
            })
            .inc();
    }

    /// Puts each handover refusal reason in the exposition at 0, so an
    /// alert can watch the rate before the first refusal.
    pub fn declare_handover_refusals(&self, reasons: impl IntoIterator<Item = &'static str>) {
        for reason in reasons {
            drop(
                self.handover_refusals
                    .get_or_create(&ReasonLabel { reason }),
            );
        }
    }

    /// Counts an open connection moved in an upgrade: `sent`,
    /// `received` or `dropped`.
    pub fn handover_connection(&self, result: &'static str) {
        self.handover_connections
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Counts a peer refused on the handover socket, by reason.
    pub fn handover_refused(&self, reason: &'static str) {
        self.handover_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Fresh handles for connections with `labels`, in `service`'s
    /// families; [`MetricsCache`] keeps them per kind of connection.
    pub fn handles(&self, labels: ConnectionLabels, service: ServiceLabels) -> ConnectionMetrics {
        ConnectionMetrics {
            opened: self.opened.get_or_create(&labels).clone(),
            closed: CloseReason::ALL.map(|reason| {
                self.closed
                    .get_or_create(&CloseLabels {
                        connection: labels.clone(),
                        reason: reason.name(),
                    })
                    .clone()
            }),
            sent: self.sent.get_or_create(&labels).clone(),
            received: self.received.get_or_create(&labels).clone(),
            duration: self.duration.get_or_create(&service).clone(),
            connect: self.connect.get_or_create(&service).clone(),
            active: self.active.get_or_create(&service).clone(),
        }
    }
}

impl MetricsCache {
    /// The handles cached under `key`, or those `make` builds (kept for
    /// the next connection of the same kind).
    pub fn get_or_insert(
        &self,
        key: MetricsKey,
        make: impl FnOnce() -> ConnectionMetrics,
    ) -> Arc<ConnectionMetrics> {
        if let Some(m) = self.map.load().get(&key) {
            return m.clone();
        }
        let m = Arc::new(make());
        self.map.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.entry(key).or_insert_with(|| m.clone());
            next
        });
        m
    }
}

/// Rewrites an OpenMetrics exposition into the Prometheus text format.
fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_get_their_total_names_in_prometheus_text() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total 3\n\
                  # HELP b Gauge.\n# TYPE b gauge\nb 1\n# EOF\n";
        assert_eq!(
            super::openmetrics_to_prometheus_text(om),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total 3\n\
             # HELP b Gauge.\n# TYPE b gauge\nb 1\n"
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FieldLabel {
    pub field: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}
