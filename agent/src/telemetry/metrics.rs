//! Prometheus metrics, in Istio's vocabulary with a `sluice_` prefix.
//!
//! Per-connection metrics are label families; the handles a connection
//! needs are resolved once per (source workload, endpoint) and cached in
//! the service, so the accept path neither allocates labels nor takes the
//! families' lock. Everything the agent already counts elsewhere (breaker
//! and ejection state, inbound refusals, certificates, eBPF counters, map
//! fill) is read at scrape time by [`StateCollector`]. No label carries an
//! address, a port or anything else unbounded.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use arc_swap::ArcSwap;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    catalog::{Catalog, Service, Workload},
    config::Mode,
    handover,
    proxy::inbound::{InboundStats, Refusal},
    redirect::ProgramStats,
    resilience::{Overflow, Phase, clock::now_ms},
    tls::TlsContext,
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
}

impl CloseReason {
    const ALL: [CloseReason; 9] = [
        CloseReason::Closed,
        CloseReason::UpstreamReset,
        CloseReason::ClientError,
        CloseReason::IdleTimeout,
        CloseReason::MaxDuration,
        CloseReason::ConnectFailed,
        CloseReason::Overflow,
        CloseReason::NoEndpoint,
        CloseReason::Denied,
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
    catalog_updates: Family<UpdateLabels, Counter>,
    handover_refusals: Family<ReasonLabel, Counter>,
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
    pub fn new(collector: Option<StateCollector>) -> Arc<Metrics> {
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
        let reloads = Family::default();
        let catalog_updates = Family::default();
        let handover_refusals = Family::<ReasonLabel, Counter>::default();
        // Every reason from the start, at 0: an alert can watch the rate
        // before the first refusal.
        for reason in handover::Refusal::ALL {
            drop(handover_refusals.get_or_create(&ReasonLabel {
                reason: reason.name(),
            }));
        }
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
        if let Some(c) = collector {
            registry.register_collector(Box::new(c));
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
            catalog_updates,
            handover_refusals,
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

    /// Counts a catalog built after a Kubernetes change: `whole`, or only
    /// the changed services.
    pub fn catalog_update(&self, whole: bool) {
        self.catalog_updates
            .get_or_create(&UpdateLabels {
                kind: if whole { "whole" } else { "services" },
            })
            .inc();
    }

    /// Counts a peer refused on the handover socket.
    pub fn handover_refused(&self, why: handover::Refusal) {
        self.handover_refusals
            .get_or_create(&ReasonLabel { reason: why.name() })
            .inc();
    }

    /// The handles for connections from `source` to endpoint `endpoint` of
    /// `service` (None: before an endpoint is chosen).
    pub fn connection(
        &self,
        service: &Service,
        source: Option<&Workload>,
        endpoint: Option<usize>,
    ) -> Arc<ConnectionMetrics> {
        let key = (
            source.map_or(0, |w| w.cgroup_id),
            endpoint.unwrap_or(usize::MAX),
        );
        if let Some(m) = service.metrics.map.load().get(&key) {
            return m.clone();
        }
        let m = Arc::new(self.resolve(service, source, endpoint));
        service.metrics.map.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.entry(key).or_insert_with(|| m.clone());
            next
        });
        m
    }

    fn resolve(
        &self,
        service: &Service,
        source: Option<&Workload>,
        endpoint: Option<usize>,
    ) -> ConnectionMetrics {
        let ep = endpoint.and_then(|i| service.endpoints.get(i));
        let mtls = ep.is_some_and(|e| {
            !e.local && e.peer.is_some() && matches!(service.mode, Mode::Mtls | Mode::Permissive)
        });
        let security = if mtls { "mutual_tls" } else { "plaintext" };
        let labels = ConnectionLabels {
            source_workload: source.map_or_else(|| "unknown".into(), |w| w.name.clone()),
            source_workload_namespace: source
                .map_or_else(|| "unknown".into(), |w| w.namespace.clone()),
            destination_service: service.name.clone(),
            destination_service_namespace: service.namespace.clone(),
            destination_workload: ep
                .and_then(|e| {
                    e.workload
                        .clone()
                        .or_else(|| e.identity.as_ref().map(|i| i.service_account.clone()))
                })
                .unwrap_or_else(|| "unknown".into()),
            connection_security_policy: security,
            mode: if service.mode == Mode::Kernel {
                "kernel"
            } else {
                "proxy"
            },
        };
        let service_labels = ServiceLabels {
            destination_service: service.name.clone(),
            destination_service_namespace: service.namespace.clone(),
            connection_security_policy: security,
        };
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
            duration: self.duration.get_or_create(&service_labels).clone(),
            connect: self.connect.get_or_create(&service_labels).clone(),
            active: self.active.get_or_create(&service_labels).clone(),
        }
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
struct ServiceOnly {
    destination_service: String,
    destination_service_namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceReason {
    destination_service: String,
    destination_service_namespace: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    destination_service: String,
    destination_service_namespace: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

/// Reads, at scrape time, what the agent counts elsewhere.
pub struct StateCollector {
    pub catalog: Arc<ArcSwap<Catalog>>,
    pub tls: Arc<TlsContext>,
    pub inbound: Arc<InboundStats>,
    /// The programs' counters and the record maps' sizes.
    pub kernel: Arc<Mutex<KernelView>>,
    pub audit: Arc<crate::audit::Audit>,
}

/// What the collector reads from the kernel side.
pub struct KernelView {
    pub stats: ProgramStats,
    pub pin_dir: std::path::PathBuf,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (impl EncodeLabelSet, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (impl EncodeLabelSet, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let catalog = self.catalog.load();
        let mut services: Vec<&Arc<Service>> = catalog.services().collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let now = now_ms();
        let only = |s: &Service| ServiceOnly {
            destination_service: s.name.clone(),
            destination_service_namespace: s.namespace.clone(),
        };

        let mut states = Vec::new();
        for s in &services {
            let mut count = [0i64; 4];
            for e in &s.endpoints {
                let i = if !e.state.is_healthy() {
                    3
                } else {
                    match e.state.phase() {
                        Phase::Closed => 0,
                        Phase::Open if now >= e.state.ejected_until() => 2,
                        Phase::Open => 1,
                        Phase::HalfOpen => 2,
                    }
                };
                count[i] += 1;
            }
            for (state, n) in ["healthy", "ejected", "half_open", "unhealthy"]
                .into_iter()
                .zip(count)
            {
                states.push((
                    StateLabel {
                        destination_service: s.name.clone(),
                        destination_service_namespace: s.namespace.clone(),
                        state,
                    },
                    n,
                ));
            }
        }
        gauge(
            &mut encoder,
            "sluice_endpoints",
            "Endpoints by state: healthy, ejected (outlier detection), half_open (probing), unhealthy (health checks)",
            states,
        )?;
        counter(
            &mut encoder,
            "sluice_endpoint_ejections",
            "Endpoints ejected by outlier detection",
            services.iter().map(|s| {
                (
                    only(s),
                    s.endpoints.iter().map(|e| e.state.ejections()).sum(),
                )
            }),
        )?;
        counter(
            &mut encoder,
            "sluice_circuit_breaker_fast_failures",
            "New connections failed fast over a circuit-breaker threshold, by threshold",
            services.iter().flat_map(|s| {
                Overflow::ALL.into_iter().map(move |why| {
                    (
                        ServiceReason {
                            destination_service: s.name.clone(),
                            destination_service_namespace: s.namespace.clone(),
                            reason: why.name(),
                        },
                        s.state.fast_failures(why),
                    )
                })
            }),
        )?;
        counter(
            &mut encoder,
            "sluice_connect_retries",
            "Connect retries made",
            services.iter().map(|s| (only(s), s.state.retries_total())),
        )?;
        counter(
            &mut encoder,
            "sluice_retry_budget_exhausted",
            "Retries not made because the retry budget was spent",
            services
                .iter()
                .map(|s| (only(s), s.state.budget_exhausted())),
        )?;
        counter(
            &mut encoder,
            "sluice_inbound_refusals",
            "Inbound connections refused, by reason (denied: authorization; plaintext: from \
             outside the mesh to a strict workload, caught by the capture hook)",
            Refusal::ALL
                .into_iter()
                .map(|r| (ReasonLabel { reason: r.name() }, self.inbound.refused(r))),
        )?;
        counter(
            &mut encoder,
            "sluice_inbound_accepted",
            "Inbound mTLS connections that reached their workload",
            [(ReasonLabel { reason: "accepted" }, self.inbound.accepted())],
        )?;
        counter(
            &mut encoder,
            "sluice_inbound_plaintext_passed",
            "Plaintext connections from outside the mesh passed to a permissive workload",
            [(
                ReasonLabel {
                    reason: "permissive",
                },
                self.inbound.plaintext_passed(),
            )],
        )?;
        counter(
            &mut encoder,
            "sluice_audit_events",
            "Audit trail lines: queued for the writer, or dropped because its queue was full",
            [
                (ProgramLabel { outcome: "queued" }, self.audit.queued()),
                (ProgramLabel { outcome: "dropped" }, self.audit.dropped()),
            ],
        )?;
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        };
        let mut certs = self.tls.store.expiries();
        certs.sort_by_key(|(id, _)| id.to_string());
        gauge(
            &mut encoder,
            "sluice_certificate_expiry_timestamp_seconds",
            "When each identity's current certificate expires (Unix time)",
            certs.into_iter().map(|(id, t)| {
                (
                    IdentityLabel {
                        identity: id.to_string(),
                    },
                    unix(t),
                )
            }),
        )?;
        if let Ok(kernel) = self.kernel.lock() {
            counter(
                &mut encoder,
                "sluice_redirect_decisions",
                "Decisions of the connect and sock_ops programs (per-CPU counters summed)",
                kernel.stats.totals().map(|(stat, n)| {
                    (
                        ProgramLabel {
                            outcome: stat.name(),
                        },
                        n,
                    )
                }),
            )?;
            if let Ok((by_cookie, by_peer)) = crate::redirect::pinned_record_counts(&kernel.pin_dir)
            {
                gauge(
                    &mut encoder,
                    "sluice_map_entries",
                    "Entries in the pinned maps",
                    [
                        (
                            MapLabel {
                                map: "orig_by_cookie",
                            },
                            by_cookie as i64,
                        ),
                        (
                            MapLabel {
                                map: "orig_by_peer",
                            },
                            by_peer as i64,
                        ),
                    ],
                )?;
                gauge(
                    &mut encoder,
                    "sluice_map_capacity",
                    "Capacity of the pinned maps",
                    [
                        (
                            MapLabel {
                                map: "orig_by_cookie",
                            },
                            i64::from(sluice_maps::MAX_PENDING_RECORDS),
                        ),
                        (
                            MapLabel {
                                map: "orig_by_peer",
                            },
                            i64::from(sluice_maps::MAX_PENDING_RECORDS),
                        ),
                    ],
                )?;
            }
        }
        Ok(())
    }
}
