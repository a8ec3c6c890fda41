//! The start, step by step: the kernel side configured and filled, the
//! node's listeners bound (or taken over), the state the handlers share,
//! discovery, the admin API, and the accept loops once the programs are
//! attached. `run_attached` in the parent puts them in order.

use std::{net::SocketAddr, path::Path, sync::Arc};

use arc_swap::ArcSwap;
use log::warn;
use tokio::task::JoinHandle;

use super::{AgentError, Start, dup, upkeep};
use crate::{
    accept::limits::InboundLimits,
    admin::{self, AdminState, KernelView, StateCollector, StaticInfo, Surface},
    audit::Audit,
    catalog::Catalog,
    clock::now_ms,
    config::Config,
    discovery::{self, Discovery},
    drain::DrainWatch,
    handover::{self, Handover, Inherited, Offered},
    proxy::{
        Connections, OutboundContext, OutboundListener, ProxyInputs,
        inbound::{InboundContext, InboundListener},
        tunnels::Tunnels,
    },
    redirect::{ProgramSettings, RecordMaps, Redirect, entries::kernel_entries},
    telemetry::{InboundStats, LogLimiter, Metrics, TraceLog},
    tls::TlsContext,
    tunnel::{PoolConfig, TunnelConfig},
};

/// The kernel side once loaded and configured, before the programs are
/// attached: what the data plane and the upkeep tasks take from it.
pub(super) struct Kernel {
    pub(super) records: Arc<crate::redirect::PeerRecords>,
    pub(super) cookie_records: aya::maps::Map,
    pub(super) bypass: Option<crate::redirect::bypass::Bypass>,
    pub(super) events: aya::maps::RingBuf<aya::maps::MapData>,
    /// This agent's cgroup, the only one whose marked sockets pass.
    pub(super) agent_cgroup: u64,
    pub(super) view: Arc<KernelView>,
}

/// Configures the loaded programs, fills the SERVICES map from `catalog`
/// and takes the maps the agent reads.
pub(super) fn prepare_kernel(
    config: &Config,
    catalog: &Catalog,
    redirect: &mut Redirect,
    trace: &TraceLog,
    watch: &DrainWatch,
) -> Result<Kernel, AgentError> {
    if let Some(logger) = redirect.take_logger(trace.clone()) {
        tokio::spawn(upkeep::pump_ebpf_log(logger, watch.clone()));
    }
    let records = Arc::new(redirect.take_peer_records()?);
    let cookie_records = redirect.take_cookie_records()?;
    let bypass = if config.agent.sockmap {
        redirect.bypass()
    } else {
        None
    };
    redirect.configure(ProgramSettings {
        outbound: config.agent.outbound,
        agent_mark: config.agent.mark,
        log: config.agent.ebpf_log,
        sockmap: bypass.is_some(),
        cgroup_root_level: Path::new(config.node.cgroup_root.get())
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .count() as u32,
    })?;
    redirect.sync_services(&kernel_entries(catalog, now_ms()))?;
    let events = redirect.take_kernel_events()?;
    // The connect hook lets marked sockets through only from this cgroup.
    let agent_cgroup = upkeep::own_cgroup_id().map_err(AgentError::Cgroup)?;
    redirect.register_agent(agent_cgroup)?;
    let view = Arc::new(KernelView {
        stats: redirect.take_stats()?,
        records: RecordMaps::from_pin(&config.agent.pin_dir)?,
    });
    Ok(Kernel {
        records,
        cookie_records,
        bypass,
        events,
        agent_cgroup,
        view,
    })
}

/// The node's own listeners, bound (or taken over from the agent this one
/// replaces) before the programs are attached, and offered to a successor.
pub(super) struct Listeners {
    pub(super) outbound: OutboundListener,
    pub(super) outbound6: Option<OutboundListener>,
    pub(super) inbound: InboundListener,
}

pub(super) fn bind_listeners(
    config: &Config,
    inherited: &Inherited,
    offered: &Offered,
) -> Result<Listeners, AgentError> {
    let outbound = SocketAddr::V4(config.agent.outbound);
    let listener = OutboundListener::bind(outbound, inherited).map_err(AgentError::Listener)?;
    let listener6 = OutboundListener::bind_v6_twin(outbound, inherited, None);
    offered.add_fixed(dup(listener.socket()).map_err(AgentError::Listener)?);
    if let Some(l) = &listener6 {
        offered.add_fixed(dup(l.socket()).map_err(AgentError::Listener)?);
    }
    let inbound =
        InboundListener::bind(config.inbound_address(), inherited).map_err(AgentError::Inbound)?;
    offered.add_fixed(dup(inbound.socket()).map_err(AgentError::Inbound)?);
    Ok(Listeners {
        outbound: listener,
        outbound6: listener6,
        inbound,
    })
}

/// What every handler shares, with the metrics registry (whose collector
/// reads the same state at scrape time).
pub(super) fn build_inputs(
    config: &Config,
    catalog: Catalog,
    tls: Arc<TlsContext>,
    kernel: &Kernel,
) -> Result<Arc<ProxyInputs>, AgentError> {
    let catalog = Arc::new(ArcSwap::from_pointee(catalog));
    let inbound_stats = Arc::new(InboundStats::default());
    let audit = Audit::start(&config.audit).map_err(AgentError::Audit)?;
    let metrics = Metrics::new(Some(Box::new(StateCollector {
        catalog: catalog.clone(),
        tls: tls.clone(),
        inbound: inbound_stats.clone(),
        kernel: kernel.view.clone(),
        audit: audit.clone(),
    })));
    metrics.declare_handover_refusals(handover::Refusal::ALL.map(handover::Refusal::name));
    Ok(Arc::new(ProxyInputs {
        catalog,
        tls,
        metrics,
        connections: Arc::new(Connections::default()),
        inbound_stats,
        audit,
        refusals: Arc::new(LogLimiter::default()),
        mark: config.agent.mark,
        connect_timeout: config.agent.connect_timeout.0,
        tunnels: Default::default(),
        parked: Default::default(),
    }))
}

/// Starts Kubernetes discovery when the config asks for it.
pub(super) async fn start_discovery(
    config: &Config,
    root: &Path,
    watch: &DrainWatch,
) -> Result<Option<Discovery>, AgentError> {
    let Some(k) = &config.kubernetes else {
        return Ok(None);
    };
    let node = discovery::NodeView {
        name: config.node.name.get().clone(),
        cgroup_root: root.to_owned(),
        pod_cgroups: k.pod_cgroups.clone(),
        peer_nodes: config.nodes.iter().map(|n| n.name.get().clone()).collect(),
        trust_domain: config.mesh.trust_domain.get().clone(),
    };
    discovery::start(k, node, watch.clone())
        .await
        .map(Some)
        .map_err(AgentError::Kubernetes)
}

/// The admin API and, where configured, the metrics listener: the full API
/// on loopback, probes and metrics alone where the network may reach them.
/// Both are offered to a successor and share the admin drain, which
/// outlives the data plane's so that they answer "stopping" to the end.
pub(super) fn start_admin(
    start: &Start<'_>,
    state: AdminState,
    offered: &Offered,
    watch: &DrainWatch,
) -> Result<Arc<AdminState>, AgentError> {
    let config = start.config;
    let admin = Arc::new(state);
    let mut surfaces = vec![(config.agent.admin.get(), Surface::Admin)];
    if let Some(metrics) = &config.agent.metrics {
        surfaces.push((metrics.get(), Surface::Metrics));
    }
    for (addr, surface) in surfaces {
        let error = |e| match surface {
            Surface::Admin => AgentError::Admin(e),
            Surface::Metrics => AgentError::Metrics(e),
        };
        let (listener, _) = crate::connect::listen(*addr, 128, start.inherited).map_err(error)?;
        offered.add_fixed(dup(std::os::fd::AsFd::as_fd(&listener)).map_err(error)?);
        tokio::spawn(admin::serve(
            listener,
            admin.clone(),
            surface,
            watch.clone(),
        ));
    }
    Ok(admin)
}

pub(super) fn static_info(start: &Start<'_>) -> StaticInfo {
    let config = start.config;
    StaticInfo {
        node: config.node.name.get().clone(),
        config: config.source.display().to_string(),
        cgroup: start.root.display().to_string(),
        pin_dir: config.agent.pin_dir.display().to_string(),
        outbound: config.agent.outbound.to_string(),
        inbound: config.inbound_address().to_string(),
        admin: config.agent.admin.to_string(),
        metrics: config.agent.metrics.as_ref().map(|m| m.to_string()),
        trust_domain: config.mesh.trust_domain.get().clone(),
    }
}

/// Listens for a successor on the handover socket; bound before "ready" is
/// said, so a successor started right after finds this agent, not the
/// previous one's closed socket.
pub(super) fn offer_to_successor(
    handover: &Handover,
    offered: &Offered,
    inputs: &Arc<ProxyInputs>,
    watch: &DrainWatch,
) -> (
    Option<handover::SocketFile>,
    tokio::sync::oneshot::Receiver<handover::Successor>,
) {
    let (handed_over_tx, handed_over) = tokio::sync::oneshot::channel();
    // What the endpoints learnt, read from the catalog in force when a
    // successor asks.
    let catalog = inputs.catalog.clone();
    let state: handover::StateSnapshot = Arc::new(move || {
        let states = catalog.load().endpoint_states(now_ms());
        serde_json::to_vec(&states).expect("endpoint states serialize")
    });
    let file = match handover.listen() {
        Ok(listening) => {
            let file = listening.file();
            tokio::spawn(handover::offer(
                listening,
                offered.clone(),
                state,
                inputs.metrics.clone(),
                handed_over_tx,
                watch.clone(),
            ));
            Some(file)
        }
        Err(e) => {
            warn!("cannot listen for a successor ({e}); an upgrade will start cold");
            None
        }
    };
    (file, handed_over)
}

/// The node listeners' accept loops, started once the programs are
/// attached: the inbound port on a runtime of its own, with the upkeep
/// that gives its memory back after a flood.
pub(super) fn serve_data_plane(
    config: &Config,
    listeners: Listeners,
    inputs: &Arc<ProxyInputs>,
    outbound: &Arc<OutboundContext>,
    (inbound_runtime, stop_inbound_runtime): Handshakes,
    watch: &DrainWatch,
) -> Result<DataPlane, AgentError> {
    let inbound_limits = InboundLimits::new(config.mesh.inbound_limits);
    let inbound_ctx = Arc::new(InboundContext {
        inputs: inputs.clone(),
        handshake_timeout: config.mesh.inbound_handshake_timeout.0,
        limits: inbound_limits.clone(),
        tunnel: TunnelConfig::from(&config.mesh.tunnels),
        data: tokio::runtime::Handle::current(),
        drain: watch.clone(),
    });
    let mut servers = vec![(
        "outbound",
        tokio::spawn(listeners.outbound.serve(outbound.clone(), watch.clone())),
    )];
    if let Some(l) = listeners.outbound6 {
        servers.push((
            "outbound IPv6",
            tokio::spawn(l.serve(outbound.clone(), watch.clone())),
        ));
    }
    let inbound = listeners
        .inbound
        .serve_on(&inbound_runtime, inbound_ctx, watch.clone())
        .map_err(AgentError::Inbound)?;
    servers.push(("inbound", inbound));
    tokio::spawn(upkeep::give_back_memory(
        inbound_limits,
        inputs.inbound_stats.clone(),
        watch.clone(),
    ));
    Ok(DataPlane {
        servers,
        _inbound_runtime: stop_inbound_runtime,
    })
}

/// The runtime where handshakes run, inbound and of outbound tunnels,
/// apart from the data-plane workers that copy bytes; and the pooled
/// tunnels to peer agents when `mesh.tunnels.enabled`, idle connections
/// swept until the drain.
pub(super) fn start_tunnels(
    config: &Config,
    inputs: &Arc<ProxyInputs>,
    watch: &DrainWatch,
) -> Result<(Handshakes, Option<Arc<Tunnels>>), AgentError> {
    let handshakes = upkeep::start_inbound_runtime().map_err(AgentError::Runtime)?;
    let settings = config.mesh.tunnels;
    if !settings.enabled {
        return Ok((handshakes, None));
    }
    let pool = PoolConfig {
        max_streams_per_connection: settings.max_streams_per_connection,
        idle_timeout: settings.idle_timeout.0,
        tunnel: TunnelConfig::from(&settings),
        node: Some(config.node.name.get().clone()),
    };
    let tunnels = Arc::new(Tunnels::new(
        inputs.tls.clone(),
        inputs.metrics.clone(),
        inputs.mark,
        inputs.connect_timeout,
        Some(handshakes.0.clone()),
        pool,
    ));
    let _ = inputs.tunnels.set(tunnels.clone());
    let (sweeping, mut drain) = (tunnels.clone(), watch.clone());
    tokio::spawn(async move { sweeping.sweep_until(drain.draining()).await });
    Ok((handshakes, Some(tunnels)))
}

/// The handshake runtime's handle, and what keeps it running.
pub(super) type Handshakes = (tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>);

/// The node listeners' accept loops, and the inbound runtime, which runs
/// until this is dropped: after the drain, so its connections finish.
pub(super) struct DataPlane {
    pub(super) servers: Vec<(&'static str, JoinHandle<()>)>,
    pub(super) _inbound_runtime: tokio::sync::oneshot::Sender<()>,
}
