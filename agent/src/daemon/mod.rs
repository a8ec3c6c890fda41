//! `sluice agent`: puts the pieces together and runs until SIGTERM.
//!
//! Start: preflight, workload cgroups, load programs, fill maps, bind the
//! outbound listener, and only then attach (a redirect must always find a
//! listener). Stop: stop accepting, drain open connections up to
//! `agent.drain_timeout`, detach, remove pins and the cgroups it created.
//! In between, the config file is watched (and SIGHUP forces a look): a
//! valid change is applied without dropping a connection, an invalid one
//! is logged and the running config kept.
//!
//! Upgrade: a new agent started while one runs takes its listening sockets
//! over (see [`crate::handover`]); the old one then drains and exits
//! leaving programs, pins and cgroups to its successor.

mod captures;
mod moving;
mod placement;
mod pods;
mod reload;
mod start;
mod stopping;
mod upkeep;

use std::{
    collections::HashSet,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use arc_swap::ArcSwap;
use log::{info, warn};
use tokio::signal::unix::{SignalKind, signal};

pub use captures::CaptureError;
use captures::CaptureSet;
use placement::{StartOverrides, kubelet_root, workload_placements};
use pods::PodListeners;
use reload::{Live, identities_of};
use start::{
    bind_listeners, build_inputs, offer_to_successor, prepare_kernel, serve_data_plane,
    start_admin, start_discovery, start_tunnels, static_info,
};
use stopping::Stopping;

use crate::{
    admin::AdminState,
    catalog::{Catalog, state::EndpointStates},
    clock::now_ms,
    config::Config,
    discovery::DiscoveryError,
    drain, fastpath,
    handover::{Handover, HandoverError, Inherited, Offered},
    proxy::OutboundContext,
    redirect::{
        Redirect, RedirectError,
        cgroup::{self, CreatedCgroups},
        preflight::{self, PreflightError},
    },
    route::health::HealthCheckers,
    telemetry::TraceLog,
    tls::{self, TlsContext, TlsSetupError},
};

/// Why the agent stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
    #[error("{0}")]
    Cgroup(io::Error),
    #[error("outbound listener: {0}")]
    Listener(io::Error),
    #[error("inbound mTLS listener: {0}")]
    Inbound(io::Error),
    #[error("admin API: {0}")]
    Admin(io::Error),
    #[error("metrics listener (agent.metrics): {0}")]
    Metrics(io::Error),
    #[error("mutual TLS: {0}")]
    Tls(#[from] TlsSetupError),
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
    #[error("handover: {0}")]
    Handover(#[from] HandoverError),
    /// Not `#[from]`: a source would make main's `{:#}` print the message
    /// twice; start.rs maps it.
    #[error("kubernetes: {0}")]
    Kubernetes(DiscoveryError),
    #[error("audit trail: {0}")]
    Audit(io::Error),
    #[error(transparent)]
    Capture(#[from] CaptureError),
}

/// How the agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Stopped by a signal: detached, pins and cgroups removed.
    Stopped,
    /// A successor took over: everything stays attached for it.
    HandedOver,
}

/// How `sluice agent` was asked to start and end.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A running agent to take over from is required.
    pub upgrade: bool,
    /// After a handover and the drain, wait for SIGTERM before exiting.
    pub stay_after_handover: bool,
    /// Overrides `node.name` of the file, at start and at every reload.
    pub node_name: Option<String>,
}

/// Runs the agent until SIGTERM or SIGINT, then drains and cleans up; or
/// until a successor takes over, then drains and leaves.
pub fn run(config: Config, options: Options) -> Result<(), AgentError> {
    let mut overrides = StartOverrides {
        node_name: options.node_name.clone(),
        cgroup_root: None,
    };
    let cgroup_mount = preflight::check(&config.agent.pin_dir)?;
    let mut config = config;
    if config.kubernetes.is_some()
        && let Some(root) = kubelet_root(&cgroup_mount, config.node.cgroup_root.get())
    {
        info!(
            "node.cgroup_root: {} does not exist here, {root} does: the kubelet's cgroup root \
             under the other cgroup driver; using it",
            config.node.cgroup_root.get()
        );
        config.node.cgroup_root.get_mut().clone_from(&root);
        overrides.cgroup_root = Some(root);
    }
    crate::netns::remember_home().map_err(AgentError::Cgroup)?;
    upkeep::raise_open_file_limit();
    // One worker: tokio's current-thread scheduler, without the cross-thread
    // machinery a multi-thread runtime pays for on every wake-up.
    let mut builder = if config.agent.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.agent.worker_threads);
        b
    };
    let runtime = builder
        .thread_name("sluice-worker")
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    runtime.block_on(serve(config, overrides, cgroup_mount, options))
}

async fn serve(
    config: Config,
    overrides: StartOverrides,
    cgroup_mount: PathBuf,
    options: Options,
) -> Result<(), AgentError> {
    let root = cgroup_mount.join(config.node.cgroup_root.get());
    let handover = Handover::prepare(&config.agent.state_dir, &config.agent.pin_dir)?;
    let inherited = handover.take_over(options.upgrade).await?;
    // Whatever earlier agents of this node made and left is this one's to
    // remove at its stop.
    let mut created = CreatedCgroups::open(handover.cgroups_record(), &cgroup_mount);
    let start = Start {
        config: &config,
        overrides,
        root: &root,
        inherited: &inherited,
        handover: &handover,
    };
    let result = start_and_wait(start, &mut created).await;
    let left = match &result {
        Ok(Exit::HandedOver) => Vec::new(),
        Ok(Exit::Stopped) => created.remove_all(),
        // A start that failed: an agent it meant to replace may still run
        // in the others.
        Err(_) => created.remove_made_here(),
    };
    for (dir, e) in left {
        warn!("cgroup {} left in place: {e}", dir.display());
    }
    if matches!(result, Ok(Exit::HandedOver)) && options.stay_after_handover {
        info!("handed over and drained; staying, holding nothing, until SIGTERM");
        wait_for_stop_signal().await;
    }
    result.map(|_| ())
}

/// What the start fixed, for every step after it.
struct Start<'a> {
    config: &'a Config,
    overrides: StartOverrides,
    root: &'a Path,
    inherited: &'a Inherited,
    handover: &'a Handover,
}

async fn start_and_wait(
    start: Start<'_>,
    created: &mut CreatedCgroups,
) -> Result<Exit, AgentError> {
    let (config, root) = (start.config, start.root);
    created.add(cgroup::create_all(root).map_err(AgentError::Cgroup)?);
    let placements = workload_placements(config, root, created).map_err(AgentError::Cgroup)?;
    let catalog = Catalog::from_config(config, &placements, None);
    let carried = start.inherited.take_state().and_then(|bytes| {
        serde_json::from_slice::<EndpointStates>(&bytes)
            .map_err(|e| warn!("upgrade: the previous agent's endpoint state does not read: {e}"))
            .ok()
    });
    if let Some(states) = &carried {
        let restored = catalog.restore_endpoint_states(states, now_ms());
        info!("upgrade: the state of {restored} endpoints carried over");
    }

    let mut redirect = Redirect::load(&config.agent.pin_dir)?;
    let upgrade = start.inherited.is_upgrade();
    let result = run_attached(start, catalog, carried, &mut redirect, created).await;
    match result {
        Ok(Exit::Stopped) => redirect.detach(),
        // The successor owns programs and pins now.
        Ok(Exit::HandedOver) => {}
        // The agent being upgraded still relies on the pinned programs.
        Err(_) if upgrade => {}
        Err(_) => redirect.detach(),
    }
    result
}

async fn run_attached(
    start: Start<'_>,
    catalog: Catalog,
    carried: Option<EndpointStates>,
    redirect: &mut Redirect,
    created: &mut CreatedCgroups,
) -> Result<Exit, AgentError> {
    let config = start.config;
    let (trigger, watch) = drain::channel();
    let trace = TraceLog::default();
    let kernel = prepare_kernel(config, &catalog, redirect, &trace, &watch)?;
    let offered = Offered::default();
    let listeners = bind_listeners(config, start.inherited, &offered)?;
    let (services, workloads) = (catalog.services().count(), catalog.workloads().len());
    let checkers = HealthCheckers::start(&catalog, config.agent.mark, &watch);
    let identities = Arc::new(ArcSwap::from_pointee(identities_of(&catalog)));
    let tls = TlsContext::new(&config.mesh, &config.agent.state_dir, &identities.load())?;
    let keeping = tls::keep_fresh(tls.clone(), identities.clone(), watch.clone());
    tokio::spawn(keeping);
    let inputs = build_inputs(config, catalog, tls, &kernel)?;
    let discovery = start_discovery(config, start.root, &watch).await?;
    let (handshakes, tunnels) = start_tunnels(config, &inputs, &watch)?;
    let outbound_ctx = Arc::new(OutboundContext {
        inputs: inputs.clone(),
        records: kernel.records.clone(),
        bypass: kernel.bypass.clone(),
        pods: discovery.as_ref().map(|d| d.pods.clone()),
        tunnels,
        handshakes: Some(handshakes.0.clone()),
        drain: watch.clone(),
    });
    let mut pods = PodListeners::new(SocketAddr::V4(config.agent.outbound));
    pods.sync(
        &inputs.catalog.load(),
        &outbound_ctx,
        start.inherited,
        &offered,
        config.agent.drain_timeout.0,
    );
    let mut captures = CaptureSet::new(SocketAddr::V4(config.agent.capture));
    captures.sync(
        &inputs.catalog.load(),
        redirect,
        &inputs,
        start.inherited,
        &offered,
    )?;
    let (admin_trigger, admin_watch) = drain::channel();
    let admin = start_admin(
        &start,
        AdminState {
            info: static_info(&start),
            started: std::time::Instant::now(),
            inputs: inputs.clone(),
            kernel: kernel.view.clone(),
            attached: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            trace,
            trace_streams: Default::default(),
            pod_listeners: pods.listening.clone(),
            discovery_synced: discovery.as_ref().map(|d| d.synced.clone()),
            tunnels: outbound_ctx.tunnels.clone(),
        },
        &offered,
        &admin_watch,
    )?;

    redirect.attach(start.root)?;
    admin.attached.store(true, Ordering::Release);
    let data_plane = serve_data_plane(
        config,
        listeners,
        &inputs,
        &outbound_ctx,
        handshakes,
        &watch,
    )?;
    let tables_changed = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(fastpath::pump_kernel_events(
        kernel.events,
        inputs.catalog.clone(),
        inputs.metrics.clone(),
        inputs.audit.clone(),
        tables_changed.clone(),
        watch.clone(),
    ));
    tokio::spawn(upkeep::sweep_records(
        kernel.records,
        kernel.cookie_records,
        watch.clone(),
    ));
    // From here on this agent serves; the one it replaces may stop, and
    // sends its open connections here. Not before: were this agent killed
    // during an upgrade, the connect hook would treat the one still
    // serving as down.
    if let Err(e) = redirect.serve_as_this_process() {
        warn!("cannot tell the connect hook which agent serves: {e}");
    }
    if let Some(predecessor) = start.inherited.ready() {
        moving::receive(predecessor, inputs.clone(), watch.clone());
    }
    let (socket_file, handed_over) = offer_to_successor(start.handover, &offered, &inputs, &watch);
    info!(
        "sluice agent ready: node {}, {services} services, {workloads} workloads, outbound {}, \
         inbound mTLS {} (trust domain {})",
        config.node.name.get(),
        config.agent.outbound,
        config.inbound_address(),
        config.mesh.trust_domain.get()
    );

    let mut live = Live {
        config,
        overrides: start.overrides.clone(),
        root: start.root,
        checkers,
        redirect,
        created,
        drain: watch,
        identities,
        tables_changed,
        tables_failing: false,
        pods,
        captures,
        inputs,
        agent_cgroup: kernel.agent_cgroup,
        outbound: outbound_ctx,
        offered,
        discovery: discovery.map(|d| d.updates),
        discovered: None,
        unplaced: HashSet::new(),
        file: None,
        file_generation: 0,
        applied_discovery: None,
        applied_file_generation: 0,
        successor: None,
        // Discovered services come later: their endpoints take on what
        // the previous agent knew when the first discovered catalog does.
        carried: carried.filter(|_| config.kubernetes.is_some()),
    };
    let exit = live.serve_until_stopped(handed_over).await;
    // After a handover the path is the successor's; it is left alone.
    if exit == Exit::Stopped
        && let Some(file) = &socket_file
    {
        file.remove_if_ours();
    }
    admin.stopping.store(true, Ordering::Release);
    let stopping = Stopping {
        exit,
        trigger,
        admin_trigger,
        pods: live.pods,
        captures: live.captures,
        data_plane,
        deadline: config.agent.drain_timeout,
        successor: live.successor,
        inputs: live.inputs,
    };
    stopping.drain().await;
    Ok(exit)
}

/// Waits for SIGTERM or SIGINT.
async fn wait_for_stop_signal() {
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => warn!("cannot watch SIGTERM ({e}); exiting now"),
    }
}

/// A descriptor of the same socket, owned separately (for handing over).
fn dup(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<std::os::fd::OwnedFd> {
    fd.try_clone_to_owned()
}
