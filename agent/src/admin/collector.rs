//! The scrape-time collector: what the agent counts elsewhere (endpoint
//! states in the catalog, the inbound listener's outcomes, the audit
//! queue, certificate expiry, the eBPF programs' counters) read when
//! Prometheus asks, so none of it costs anything between scrapes.

use std::{sync::Arc, time::SystemTime};

use arc_swap::ArcSwap;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::{
    audit::Audit,
    catalog::{Catalog, Service},
    clock::now_ms,
    redirect::{ProgramStats, RecordMaps},
    resilience::{Overflow, Phase},
    telemetry::{
        metrics::ReasonLabel,
        stats::{InboundStats, Refusal},
    },
    tls::TlsContext,
};

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
struct ProgramLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

/// A series without labels.
type NoLabels = Vec<(&'static str, &'static str)>;

/// Reads, at scrape time, what the agent counts elsewhere.
pub struct StateCollector {
    pub catalog: Arc<ArcSwap<Catalog>>,
    pub tls: Arc<TlsContext>,
    pub inbound: Arc<InboundStats>,
    pub audit: Arc<Audit>,
    /// The programs' counters and the record maps, opened once.
    pub kernel: Arc<KernelView>,
}

/// What the collector reads from the kernel side.
pub struct KernelView {
    pub stats: ProgramStats,
    pub records: RecordMaps,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let catalog = self.catalog.load();
        let mut services: Vec<&Arc<Service>> = catalog.services().collect();
        services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        encode_services(&mut encoder, &services)?;
        self.encode_inbound(&mut encoder)?;
        self.encode_audit_and_certificates(&mut encoder)?;
        encode_kernel(&mut encoder, &self.kernel)
    }
}

fn service_only(s: &Service) -> ServiceOnly {
    ServiceOnly {
        destination_service: s.name.clone(),
        destination_service_namespace: s.namespace.clone(),
    }
}

/// Endpoint states and the circuit breakers' counters, per service.
fn encode_services(
    encoder: &mut DescriptorEncoder,
    services: &[&Arc<Service>],
) -> Result<(), std::fmt::Error> {
    let now = now_ms();
    let mut states = Vec::new();
    for s in services {
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
        encoder,
        "sluice_endpoints",
        "Endpoints by state: healthy, ejected (outlier detection), half_open (probing), unhealthy (health checks)",
        states,
    )?;
    counter(
        encoder,
        "sluice_endpoint_ejections",
        "Endpoints ejected by outlier detection",
        services.iter().map(|s| {
            (
                service_only(s),
                s.endpoints.iter().map(|e| e.state.ejections()).sum(),
            )
        }),
    )?;
    counter(
        encoder,
        "sluice_circuit_breaker_fast_failures",
        "New connections (request services: requests) failed fast over a circuit-breaker threshold, by threshold",
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
        encoder,
        "sluice_connect_retries",
        "Retries made: of connects, and of requests to http, http2 and grpc services",
        services
            .iter()
            .map(|s| (service_only(s), s.state.retries_total())),
    )?;
    counter(
        encoder,
        "sluice_fallback_requests",
        "Requests a service's fallback answered because no endpoint was eligible",
        services
            .iter()
            .map(|s| (service_only(s), s.state.fallbacks_total())),
    )?;
    counter(
        encoder,
        "sluice_retry_budget_exhausted",
        "Retries not made because the retry budget was spent",
        services
            .iter()
            .map(|s| (service_only(s), s.state.budget_exhausted())),
    )
}

impl StateCollector {
    fn encode_inbound(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        counter(
            encoder,
            "sluice_inbound_refusals",
            "Inbound connections refused, by reason (denied: authorization; plaintext: from \
             outside the mesh to a strict workload, caught by the capture hook)",
            Refusal::ALL
                .into_iter()
                .map(|r| (ReasonLabel { reason: r.name() }, self.inbound.refused(r))),
        )?;
        counter(
            encoder,
            "sluice_inbound_accepted",
            "Inbound mTLS connections that reached their workload",
            [(ReasonLabel { reason: "accepted" }, self.inbound.accepted())],
        )?;
        counter(
            encoder,
            "sluice_inbound_plaintext_passed",
            "Plaintext connections from outside the mesh passed to a permissive workload",
            [(
                ReasonLabel {
                    reason: "permissive",
                },
                self.inbound.plaintext_passed(),
            )],
        )
    }

    fn encode_audit_and_certificates(
        &self,
        encoder: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        counter(
            encoder,
            "sluice_audit_events",
            "Audit trail lines: queued for the writer, or dropped because its queue was full",
            [
                (ProgramLabel { outcome: "queued" }, self.audit.queued()),
                (ProgramLabel { outcome: "dropped" }, self.audit.dropped()),
            ],
        )?;
        counter(
            encoder,
            "sluice_certificate_renewals",
            "Workload certificates replaced by a renewed one (local CA) or a new file",
            [(NoLabels::new(), self.tls.store.renewals())],
        )?;
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        };
        let mut certs = self.tls.store.expiries();
        certs.sort_by_key(|(id, _)| id.to_string());
        gauge(
            encoder,
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
        )
    }
}

/// The programs' decisions and the record maps' fill.
fn encode_kernel(
    encoder: &mut DescriptorEncoder,
    kernel: &KernelView,
) -> Result<(), std::fmt::Error> {
    counter(
        encoder,
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
    let (by_cookie, by_peer) = kernel.records.counts();
    let maps = [("orig_by_cookie", by_cookie), ("orig_by_peer", by_peer)];
    gauge(
        encoder,
        "sluice_map_entries",
        "Entries in the pinned maps",
        maps.map(|(map, n)| (MapLabel { map }, n as i64)),
    )?;
    gauge(
        encoder,
        "sluice_map_capacity",
        "Capacity of the pinned maps",
        maps.map(|(map, _)| {
            (
                MapLabel { map },
                i64::from(sluice_maps::MAX_PENDING_RECORDS),
            )
        }),
    )
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
