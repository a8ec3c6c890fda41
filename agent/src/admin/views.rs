//! The JSON views of the admin API as types: the server fills them from the
//! running state, `sluice status` and friends read the same types back,
//! so a field renamed on one side cannot go unnoticed on the other.

use std::{collections::BTreeMap, sync::atomic::Ordering, time::SystemTime};

use serde::{Deserialize, Serialize};

mod workloads;

use self::workloads::workloads;
pub use self::workloads::{RateLimitView, WorkloadRow};
use super::{AdminState, MAX_TRACE_STREAMS, Surface};
use crate::{
    catalog::Catalog,
    clock::now_ms,
    resilience::{Overflow, Phase},
    route::eligible_endpoints,
    telemetry::{Refusal, tunnels::Side},
};

/// `/debug/status`: the agent at a glance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub node: String,
    pub config: String,
    pub uptime_seconds: u64,
    pub ready: bool,
    pub not_ready_reasons: Vec<String>,
    pub programs: Vec<Program>,
    pub pin_dir: String,
    pub listeners: Listeners,
    pub trace_streams: TraceStreamCount,
    pub trust_domain: String,
    pub services: usize,
    pub workloads: usize,
    pub connections_active: usize,
    pub inbound_accepted: u64,
    pub inbound_refused: BTreeMap<String, u64>,
    /// The programs' decision counters, by name.
    pub redirects: BTreeMap<String, u64>,
    /// Tunnels at a glance (`sluice tunnels` for each pool); None: off
    /// (or an agent from before tunnels).
    #[serde(default)]
    pub tunnels: Option<TunnelTotals>,
    /// Fields the config file in force changed that apply only at the
    /// next restart (`config/REFERENCE.md`, "Reloads").
    #[serde(default)]
    pub restart_pending: Vec<String>,
}

/// This agent's tunnels, summed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelTotals {
    /// Outbound pools (one per source identity, pod, peer node and
    /// destination identity), their connections and open streams.
    pub pools: usize,
    pub connections: usize,
    pub streams: usize,
    /// Tunnel connections peer agents hold to this one.
    pub from_peers: i64,
}

/// One cgroup program the agent attaches.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Program {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub cgroup: String,
    pub attached: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listeners {
    pub outbound: String,
    pub inbound_mtls: String,
    pub admin: String,
    pub metrics: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceStreamCount {
    pub open: usize,
    pub max: usize,
}

/// `/debug/services`: one row a service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceRow {
    pub name: String,
    pub namespace: String,
    pub address: String,
    pub mode: String,
    pub endpoints: usize,
    pub eligible: usize,
    pub panicking: bool,
    pub connections: u32,
}

/// `/debug/endpoints`: one row an endpoint of a service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointRow {
    /// `namespace/name` of the service.
    pub service: String,
    pub address: String,
    pub node: String,
    pub workload: Option<String>,
    pub weight: u32,
    pub healthy: bool,
    /// `closed`, `open` or `half_open`.
    pub breaker: String,
    pub ejected_for_seconds: Option<f64>,
    pub ejections: u64,
    pub in_flight: u32,
    pub ewma_connect_us: u64,
    pub eligible: bool,
}

/// `/debug/conns`: one row a live proxied connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnRow {
    pub id: u64,
    pub source_workload: String,
    pub source_namespace: String,
    pub destination_service: String,
    pub endpoint: String,
    pub security: String,
    pub age_seconds: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// `/debug/breakers`: one row a service's circuit breakers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BreakerRow {
    pub service: String,
    pub connections: u32,
    pub max_connections: u32,
    pub pending_connects: u32,
    pub max_pending_connects: u32,
    /// Request services: requests waiting for their answers.
    #[serde(default)]
    pub pending_requests: u32,
    #[serde(default)]
    pub max_pending_requests: u32,
    pub max_retries: u32,
    pub retries: u64,
    pub retry_budget_exhausted: u64,
    pub fast_failures_total: u64,
    pub fast_failures: BTreeMap<String, u64>,
    pub ejected_endpoints: usize,
    pub panicking: bool,
}

/// `/debug/certs`: one row an identity's current certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertRow {
    pub identity: String,
    pub not_after: u64,
    pub expires_in_seconds: u64,
}

/// `/debug/inbound`: the inbound listener's outcomes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inbound {
    pub accepted: u64,
    pub refused: BTreeMap<String, u64>,
}

/// `/debug/tunnels`: one row an outbound tunnel pool (empty with tunnels
/// off).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelRow {
    /// The identity whose certificate the pool's connections present.
    pub source: String,
    /// The pod (network namespace) they leave from; None: the node's.
    pub netns: Option<String>,
    /// The peer node agent's inbound address.
    pub node: String,
    pub destination: String,
    pub connections: usize,
    /// Connections that take no new stream (GOAWAY or closed).
    pub closing: usize,
    /// Connections whose peer agent speaks moves (their streams move in an
    /// upgrade of either end; the others' finish in the old agent).
    pub movable: usize,
    pub streams: usize,
    /// The last failed dial of this pool, and how long ago.
    pub last_dial_failure: Option<String>,
    pub last_dial_failure_seconds_ago: Option<u64>,
}

/// The JSON of the view at `path`, or None when there is no such view.
pub fn render(state: &AdminState, path: &str) -> Option<String> {
    let catalog = state.inputs.catalog.load();
    let json = match path {
        "/debug/status" => serde_json::to_string(&status(state, &catalog)),
        "/debug/services" => serde_json::to_string(&services(&catalog)),
        "/debug/endpoints" => serde_json::to_string(&endpoints(&catalog)),
        "/debug/conns" => serde_json::to_string(&conns(state)),
        "/debug/breakers" => serde_json::to_string(&breakers(&catalog)),
        "/debug/certs" => serde_json::to_string(&certs(state)),
        "/debug/inbound" => serde_json::to_string(&inbound(state)),
        "/debug/workloads" => serde_json::to_string(&workloads(state, &catalog)),
        "/debug/tunnels" => serde_json::to_string(&tunnels(state)),
        _ => return None,
    };
    // Plain data with string keys: serialization cannot fail.
    Some(json.expect("a view serializes"))
}

fn tunnels(state: &AdminState) -> Vec<TunnelRow> {
    let Some(tunnels) = &state.tunnels else {
        return Vec::new();
    };
    let mut rows: Vec<TunnelRow> = tunnels
        .snapshot()
        .into_iter()
        .map(|(key, usage)| TunnelRow {
            source: key.source.to_string(),
            netns: key.netns.as_ref().map(|n| n.path().display().to_string()),
            node: key.node.to_string(),
            destination: key.dest.to_string(),
            connections: usage.connections,
            closing: usage.closing,
            movable: usage.movable,
            streams: usage.streams,
            last_dial_failure_seconds_ago: usage
                .last_failure
                .as_ref()
                .map(|(ago, _)| ago.as_secs()),
            last_dial_failure: usage.last_failure.map(|(_, why)| why),
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.node, &a.source, &a.destination, &a.netns).cmp(&(
            &b.node,
            &b.source,
            &b.destination,
            &b.netns,
        ))
    });
    rows
}

fn sorted_services(catalog: &Catalog) -> Vec<&std::sync::Arc<crate::catalog::Service>> {
    let mut services: Vec<_> = catalog.services().collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    services
}

fn refusals(state: &AdminState) -> BTreeMap<String, u64> {
    Refusal::ALL
        .iter()
        .map(|r| (r.name().to_owned(), state.inputs.inbound_stats.refused(*r)))
        .collect()
}

fn status(state: &AdminState, catalog: &Catalog) -> Status {
    let info = &state.info;
    let attached = state.attached.load(Ordering::Acquire);
    let program = |name: &str, kind: &str| Program {
        name: name.to_owned(),
        kind: kind.to_owned(),
        cgroup: info.cgroup.clone(),
        attached,
    };
    let why = state.not_ready(Surface::Admin);
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        node: info.node.clone(),
        config: info.config.clone(),
        uptime_seconds: state.started.elapsed().as_secs(),
        ready: why.is_empty(),
        not_ready_reasons: why,
        programs: vec![
            program("connect4", "cgroup/connect4"),
            program("connect6", "cgroup/connect6"),
            program("getpeername4", "cgroup/getpeername4"),
            program("getpeername6", "cgroup/getpeername6"),
            program("sluice_sockops", "sock_ops"),
        ],
        pin_dir: info.pin_dir.clone(),
        listeners: Listeners {
            outbound: info.outbound.clone(),
            inbound_mtls: info.inbound.clone(),
            admin: info.admin.clone(),
            metrics: info.metrics.clone(),
        },
        trace_streams: TraceStreamCount {
            open: state.trace_streams.open_count(),
            max: MAX_TRACE_STREAMS,
        },
        trust_domain: info.trust_domain.clone(),
        services: catalog.services().count(),
        workloads: catalog.workloads().len(),
        connections_active: state.inputs.connections.snapshot().len(),
        inbound_accepted: state.inputs.inbound_stats.accepted(),
        inbound_refused: refusals(state),
        redirects: state
            .kernel
            .stats
            .totals()
            .iter()
            .map(|(s, n)| (s.name().to_owned(), *n))
            .collect(),
        tunnels: state.tunnels.as_ref().map(|tunnels| {
            let pools = tunnels.snapshot();
            TunnelTotals {
                pools: pools.len(),
                connections: pools.iter().map(|(_, u)| u.connections).sum(),
                streams: pools.iter().map(|(_, u)| u.streams).sum(),
                from_peers: state.inputs.metrics.tunnels.open(Side::Server),
            }
        }),
        restart_pending: state
            .inputs
            .metrics
            .restart_pending()
            .into_iter()
            .map(str::to_owned)
            .collect(),
    }
}

fn services(catalog: &Catalog) -> Vec<ServiceRow> {
    let now = now_ms();
    sorted_services(catalog)
        .into_iter()
        .map(|s| ServiceRow {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            address: s.vip.to_string(),
            mode: s.mode.name().to_owned(),
            endpoints: s.endpoints.len(),
            eligible: eligible_endpoints(s, now).len(),
            panicking: s.state.is_panicking(),
            connections: s.state.connections(),
        })
        .collect()
}

fn endpoints(catalog: &Catalog) -> Vec<EndpointRow> {
    let now = now_ms();
    sorted_services(catalog)
        .into_iter()
        .flat_map(|s| {
            s.endpoints.iter().map(move |e| {
                let phase = e.state.phase();
                let until = e.state.ejected_until();
                EndpointRow {
                    service: s.qualified_name(),
                    address: e.addr.to_string(),
                    node: e.node.clone(),
                    workload: e.workload.clone(),
                    weight: e.weight,
                    healthy: e.state.is_healthy(),
                    breaker: phase.name().to_owned(),
                    ejected_for_seconds: (phase == Phase::Open && until > now)
                        .then(|| (until - now) as f64 / 1000.0),
                    ejections: e.state.ejections(),
                    in_flight: e.state.in_flight(),
                    ewma_connect_us: e.state.ewma_connect_us(),
                    eligible: e.state.is_eligible(now, &s.policy.outlier),
                }
            })
        })
        .collect()
}

fn conns(state: &AdminState) -> Vec<ConnRow> {
    let now = SystemTime::now();
    state
        .inputs
        .connections
        .snapshot()
        .iter()
        .map(|c| {
            let (source_workload, source_namespace) = c.caller.names();
            let (bytes_sent, bytes_received) = c.bytes.totals();
            ConnRow {
                id: c.id,
                source_workload: source_workload.to_owned(),
                source_namespace: source_namespace.to_owned(),
                destination_service: c.callee.name(),
                endpoint: c.endpoint.to_string(),
                security: c.security.to_owned(),
                age_seconds: now
                    .duration_since(c.started)
                    .map_or(0.0, |d| d.as_secs_f64()),
                bytes_sent,
                bytes_received,
            }
        })
        .collect()
}

fn breakers(catalog: &Catalog) -> Vec<BreakerRow> {
    sorted_services(catalog)
        .into_iter()
        .map(|s| {
            let t = &s.policy.thresholds;
            let fast: BTreeMap<String, u64> = Overflow::ALL
                .iter()
                .map(|o| (o.name().to_owned(), s.state.fast_failures(*o)))
                .collect();
            BreakerRow {
                service: s.qualified_name(),
                connections: s.state.connections(),
                max_connections: t.max_connections,
                pending_connects: s.state.pending_connects(),
                max_pending_connects: t.max_pending_connects,
                pending_requests: s.state.pending_requests(),
                max_pending_requests: t.max_pending_requests,
                max_retries: t.max_retries,
                retries: s.state.retries_total(),
                retry_budget_exhausted: s.state.budget_exhausted(),
                fast_failures_total: fast.values().sum(),
                fast_failures: fast,
                ejected_endpoints: s
                    .endpoints
                    .iter()
                    .filter(|e| e.state.phase() != Phase::Closed)
                    .count(),
                panicking: s.state.is_panicking(),
            }
        })
        .collect()
}

fn certs(state: &AdminState) -> Vec<CertRow> {
    let mut certs = state.inputs.tls.store.expiries();
    certs.sort_by_key(|(id, _)| id.to_string());
    let now = SystemTime::now();
    certs
        .iter()
        .map(|(id, t)| CertRow {
            identity: id.to_string(),
            not_after: t
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            expires_in_seconds: t.duration_since(now).map_or(0, |d| d.as_secs()),
        })
        .collect()
}

fn inbound(state: &AdminState) -> Inbound {
    Inbound {
        accepted: state.inputs.inbound_stats.accepted(),
        refused: refusals(state),
    }
}
