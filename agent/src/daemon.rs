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

use std::{
    collections::{HashMap, HashSet},
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use log::{debug, error, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    accept::limits::InboundLimits,
    admin::{self, AdminState, StaticInfo, Surface},
    admin::{KernelView, StateCollector},
    audit::Audit,
    capture::{CaptureError, CaptureSet},
    catalog::{Catalog, Placement},
    clock::now_ms,
    config::Config,
    discovery,
    drain::{self, DrainWatch},
    fastpath,
    handover::{self, Handover, HandoverError, Inherited},
    netns::Netns,
    proxy::{
        Connections, OutboundContext, OutboundListener,
        capture::CaptureContext,
        inbound::{InboundContext, InboundListener},
    },
    redirect::{
        ProgramSettings, RecordMaps, Redirect, RedirectError, cgroup,
        entries::{kernel_delta, kernel_entries, kernel_tables},
        preflight::{self, PreflightError},
        records,
    },
    route::health::HealthCheckers,
    telemetry::{InboundStats, LogLimiter, Metrics, Refusal, TraceLog},
    tls::{self, Identity, TlsContext, TlsSetupError},
};

/// How often the config file's modification time is looked at.
const CONFIG_POLL: Duration = Duration::from_secs(1);
/// How often the kernel's backend tables are recomputed even when no
/// failure was reported: ejections expire and health checks flip on their
/// own clocks.
const TABLE_REFRESH: Duration = Duration::from_millis(100);

/// How often the agent writes its cgroup into the hook's LRU set again, so
/// that only the entries of agents gone age out of it.
const AGENT_REREGISTER: Duration = Duration::from_secs(5);

/// How often stale redirect records are swept, and how old they must be.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
const STALE_AFTER: Duration = Duration::from_secs(30);

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
    #[error("kubernetes: {0}")]
    Kubernetes(String),
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

/// The node name given on the command line, which every reload keeps.
static NODE_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `node.cgroup_root` as found on this machine (see [`kubelet_root`]),
/// which every reload keeps.
static CGROUP_ROOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The kubelet puts pods below `kubepods.slice` with the systemd cgroup
/// driver and below `kubepods` with cgroupfs. In Kubernetes mode either
/// name in `node.cgroup_root` means the kubelet's root, whichever of the
/// two this node has, so one config serves nodes of both kinds.
fn kubelet_root(mount: &Path, configured: &str) -> Option<String> {
    let path = Path::new(configured);
    let other = match path.file_name()?.to_str()? {
        "kubepods.slice" => "kubepods",
        "kubepods" => "kubepods.slice",
        _ => return None,
    };
    let alternative = path.with_file_name(other);
    (!mount.join(path).exists() && mount.join(&alternative).is_dir())
        .then(|| alternative.to_string_lossy().into_owned())
}

/// What the start fixed for this run over the file's `node` (the name
/// given on the command line, the kubelet root found), at every reload.
fn keep_start_overrides(config: &mut Config) {
    if let Some(name) = NODE_NAME.get() {
        config.node.name.value.clone_from(name);
    }
    if let Some(root) = CGROUP_ROOT.get() {
        config.node.cgroup_root.value.clone_from(root);
    }
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
    if let Some(name) = &options.node_name {
        let _ = NODE_NAME.set(name.clone());
    }
    let cgroup_mount = preflight::check(&config.agent.pin_dir)?;
    let mut config = config;
    if config.kubernetes.is_some()
        && let Some(root) = kubelet_root(&cgroup_mount, &config.node.cgroup_root.value)
    {
        info!(
            "node.cgroup_root: {} does not exist here, {root} does: the kubelet's cgroup root \
             under the other cgroup driver; using it",
            config.node.cgroup_root.value
        );
        config.node.cgroup_root.value.clone_from(&root);
        let _ = CGROUP_ROOT.set(root);
    }
    crate::netns::remember_home().map_err(AgentError::Cgroup)?;
    raise_open_file_limit();
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
    runtime.block_on(serve(config, cgroup_mount, options))
}

/// A proxy holds two descriptors per connection: take the hard limit.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

async fn serve(config: Config, cgroup_mount: PathBuf, options: Options) -> Result<(), AgentError> {
    let root = cgroup_mount.join(&config.node.cgroup_root.value);
    let handover = Handover::prepare(&config.agent.state_dir, &config.agent.pin_dir)?;
    let inherited = handover.take_over(options.upgrade).await?;
    let mut created = Vec::new();
    let result = start_and_wait(&config, &root, &mut created, &inherited, &handover).await;
    if !matches!(result, Ok(Exit::HandedOver)) {
        for (dir, e) in cgroup::remove_created(&created) {
            warn!("cgroup {} left in place: {e}", dir.display());
        }
    } else if options.stay_after_handover {
        info!("handed over and drained; staying, holding nothing, until SIGTERM");
        wait_for_stop_signal().await;
    }
    result.map(|_| ())
}

async fn start_and_wait(
    config: &Config,
    root: &Path,
    created: &mut Vec<PathBuf>,
    inherited: &Inherited,
    handover: &Handover,
) -> Result<Exit, AgentError> {
    created.extend(cgroup::create_all(root).map_err(AgentError::Cgroup)?);
    let placements = workload_placements(config, root, created).map_err(AgentError::Cgroup)?;
    let catalog = Catalog::from_config(config, &placements, None);

    let mut redirect = Redirect::load(&config.agent.pin_dir)?;
    let result = run_attached(
        config,
        root,
        catalog,
        &mut redirect,
        created,
        inherited,
        handover,
    )
    .await;
    match result {
        Ok(Exit::Stopped) => redirect.detach(),
        // The successor owns programs and pins now.
        Ok(Exit::HandedOver) => {}
        // The agent being upgraded still relies on the pinned programs.
        Err(_) if inherited.is_upgrade() => {}
        Err(_) => redirect.detach(),
    }
    result
}

/// Makes sure every workload's cgroup exists and opens its network
/// namespace when it has one; returns where each workload lives, in config
/// order, and adds the cgroup directories it made to `created`.
fn workload_placements(
    config: &Config,
    root: &Path,
    created: &mut Vec<PathBuf>,
) -> io::Result<Vec<Placement>> {
    config
        .workloads
        .iter()
        .map(|w| place_workload(w, root, created, None))
        .collect()
}

/// Where one workload lives. A namespace `previous` already holds open for
/// the same workload, path and cgroup is taken over rather than opened
/// again, so that what is keyed by it (health checks, listeners) stays.
fn place_workload(
    w: &crate::config::WorkloadSpec,
    root: &Path,
    created: &mut Vec<PathBuf>,
    previous: Option<&Catalog>,
) -> io::Result<Placement> {
    let path = root.join(w.cgroup());
    created.extend(cgroup::create_all(&path)?);
    let id = cgroup::cgroup_id(&path)?;
    let netns = match &w.netns {
        Some(ns) => {
            let known = previous
                .and_then(|c| c.workloads().iter().find(|o| o.name == w.name.value))
                .filter(|o| o.cgroup_id == id)
                .and_then(|o| o.netns.clone())
                .filter(|n| n.path() == ns.value);
            match known {
                Some(n) => Some(n),
                None => Some(Arc::new(Netns::open(&ns.value).map_err(|e| {
                    io::Error::new(e.kind(), format!("workload `{}`: {e}", w.name.value))
                })?)),
            }
        }
        None => None,
    };
    Ok(Placement {
        cgroup: path,
        cgroup_id: id,
        netns,
    })
}

/// Outbound listeners inside workloads' own network namespaces (pods), one
/// per namespace, opened and closed as the catalog's workloads change.
struct PodListeners {
    addr: SocketAddr,
    open: HashMap<PathBuf, PodListener>,
    /// The namespaces with an open listener, for the admin API.
    listening: Arc<Mutex<Vec<PathBuf>>>,
}

struct PodListener {
    trigger: drain::DrainTrigger,
    cookie: u64,
}

impl PodListeners {
    /// Opens a listener for every namespace in `catalog` without one, and
    /// closes (drains) those whose namespace is gone from it.
    fn sync(
        &mut self,
        catalog: &Catalog,
        ctx: &Arc<OutboundContext>,
        inherited: &Inherited,
        handover: &handover::Offered,
        drain_timeout: Duration,
    ) {
        let wanted: HashMap<&Path, &Arc<Netns>> = catalog
            .workloads()
            .iter()
            .filter_map(|w| w.netns.as_ref().map(|ns| (ns.path(), ns)))
            .collect();
        let gone: Vec<PathBuf> = self
            .open
            .keys()
            .filter(|p| !wanted.contains_key(p.as_path()))
            .cloned()
            .collect();
        for path in gone {
            let Some(pod) = self.open.remove(&path) else {
                continue;
            };
            handover.remove(pod.cookie);
            pod.trigger.start();
            info!(
                "closed the outbound listener in {}; draining {} open connections",
                path.display(),
                pod.trigger.active()
            );
            tokio::spawn(async move {
                let left = pod.trigger.wait_idle(drain_timeout).await;
                if left > 0 {
                    warn!(
                        "{}: {left} connections still open at the drain deadline",
                        path.display()
                    );
                }
            });
        }
        for (path, netns) in wanted {
            if self.open.contains_key(path) {
                continue;
            }
            match OutboundListener::bind_in(self.addr, inherited, Some(netns)) {
                Ok(listener) => {
                    let cookie = listener.netns_cookie();
                    let twin = OutboundListener::bind_v6_twin(self.addr, inherited, Some(netns));
                    let (trigger, watch) = drain::channel();
                    for listener in std::iter::once(listener).chain(twin) {
                        if let Ok(fd) = dup(listener.socket()) {
                            handover.add(cookie, fd);
                        }
                        tokio::spawn(listener.serve(ctx.clone(), watch.clone()));
                    }
                    info!("outbound listener {} open in {}", self.addr, path.display());
                    self.open
                        .insert(path.to_owned(), PodListener { trigger, cookie });
                }
                // One pod that cannot be entered must not stop the others.
                Err(e) => warn!("no outbound listener in {}: {e}; skipping", path.display()),
            }
        }
        *self.listening.lock().expect("pod listener view") = self.open.keys().cloned().collect();
    }

    /// Stops every listener. With `refuse`, the listening sockets stop
    /// listening for every holder of a descriptor (the handover offer too),
    /// so that new connects are refused at once.
    fn stop(&self, refuse: bool) {
        for pod in self.open.values() {
            if refuse {
                pod.trigger.refuse();
            } else {
                pod.trigger.start();
            }
        }
    }

    /// Waits for the connections of every (stopped) listener.
    async fn drain(self, deadline: Duration) -> usize {
        let mut left = 0;
        for pod in self.open.values() {
            left += pod.trigger.wait_idle(deadline).await;
        }
        left
    }
}

async fn run_attached(
    config: &Config,
    root: &Path,
    catalog: Catalog,
    redirect: &mut Redirect,
    created: &mut Vec<PathBuf>,
    inherited: &Inherited,
    handover: &Handover,
) -> Result<Exit, AgentError> {
    let (trigger, watch) = drain::channel();
    let trace = TraceLog::default();
    if let Some(logger) = redirect.take_logger(trace.clone()) {
        tokio::spawn(pump_ebpf_log(logger, watch.clone()));
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
        cgroup_root_level: Path::new(&config.node.cgroup_root.value)
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .count() as u32,
    })?;
    redirect.sync_services(&kernel_entries(&catalog, now_ms()))?;
    let kernel_events = redirect.take_kernel_events()?;
    // The connect hook lets marked sockets through only from this cgroup.
    let agent_cgroup = own_cgroup_id().map_err(AgentError::Cgroup)?;
    redirect.register_agent(agent_cgroup)?;
    let audit = Audit::start(&config.audit).map_err(AgentError::Audit)?;
    let refusal_log = Arc::new(LogLimiter::default());

    let outbound = SocketAddr::V4(config.agent.outbound);
    let listener = OutboundListener::bind(outbound, inherited).map_err(AgentError::Listener)?;
    let listener6 = OutboundListener::bind_v6_twin(outbound, inherited, None);
    let offered = handover::Offered::default();
    offered.add_fixed(dup(listener.socket()).map_err(AgentError::Listener)?);
    if let Some(l) = &listener6 {
        offered.add_fixed(dup(l.socket()).map_err(AgentError::Listener)?);
    }
    let services = catalog.services().count();
    let workloads = catalog.workloads().len();
    let checkers = HealthCheckers::start(&catalog, config.agent.mark, &watch);
    let identities = Arc::new(ArcSwap::from_pointee(identities_of(&catalog)));
    let tls = TlsContext::new(&config.mesh, &config.agent.state_dir, &identities.load())?;
    tokio::spawn(tls::keep_fresh(
        tls.clone(),
        identities.clone(),
        watch.clone(),
    ));
    let inbound_addr = config.inbound_address();
    let inbound = InboundListener::bind(inbound_addr, inherited).map_err(AgentError::Inbound)?;
    let inbound_limits = InboundLimits::new(config.mesh.inbound_limits);
    let (inbound_runtime, _stop_inbound_runtime) =
        start_inbound_runtime().map_err(AgentError::Runtime)?;
    offered.add_fixed(dup(inbound.socket()).map_err(AgentError::Inbound)?);
    let catalog = Arc::new(ArcSwap::from_pointee(catalog));
    let inbound_stats = Arc::new(InboundStats::default());
    let inbound_ctx = Arc::new(InboundContext {
        catalog: catalog.clone(),
        tls: tls.clone(),
        mark: config.agent.mark,
        handshake_timeout: config.mesh.inbound_handshake_timeout.0,
        connect_timeout: config.agent.connect_timeout.0,
        stats: inbound_stats.clone(),
        audit: audit.clone(),
        log: refusal_log.clone(),
        limits: inbound_limits.clone(),
    });
    let capture_ctx = Arc::new(CaptureContext {
        catalog: catalog.clone(),
        mark: config.agent.mark,
        connect_timeout: config.agent.connect_timeout.0,
        stats: inbound_stats.clone(),
        audit: audit.clone(),
        log: refusal_log.clone(),
    });
    let kernel = Arc::new(KernelView {
        stats: redirect.take_stats()?,
        records: RecordMaps::from_pin(&config.agent.pin_dir)?,
    });
    let metrics = Metrics::new(Some(Box::new(StateCollector {
        catalog: catalog.clone(),
        tls: tls.clone(),
        inbound: inbound_stats.clone(),
        kernel: kernel.clone(),
        audit: audit.clone(),
    })));
    metrics.declare_handover_refusals(handover::Refusal::ALL.map(handover::Refusal::name));
    let connections = Arc::new(Connections::default());
    let discovery = match &config.kubernetes {
        Some(k) => Some(
            discovery::start(
                k,
                discovery::NodeView {
                    name: config.node.name.value.clone(),
                    cgroup_root: root.to_owned(),
                    pod_cgroups: k.pod_cgroups.clone(),
                    peer_nodes: config.nodes.iter().map(|n| n.name.value.clone()).collect(),
                    trust_domain: config.mesh.trust_domain.value.clone(),
                },
                watch.clone(),
            )
            .await
            .map_err(AgentError::Kubernetes)?,
        ),
        None => None,
    };
    let ctx = Arc::new(OutboundContext {
        catalog: catalog.clone(),
        records: records.clone(),
        mark: config.agent.mark,
        tls: Some(tls.clone()),
        metrics: metrics.clone(),
        connections: connections.clone(),
        bypass,
        audit: audit.clone(),
        pods: discovery.as_ref().map(|d| d.pods.clone()),
    });
    let mut pods = PodListeners {
        addr: outbound,
        open: HashMap::new(),
        listening: Default::default(),
    };
    pods.sync(
        &catalog.load(),
        &ctx,
        inherited,
        &offered,
        config.agent.drain_timeout.0,
    );
    let mut captures = CaptureSet::new(SocketAddr::V4(config.agent.capture));
    captures.sync(&catalog.load(), redirect, &capture_ctx, inherited, &offered)?;

    // The admin API outlives the data plane's drain, so that it can answer
    // "stopping" until the end.
    let (admin_trigger, admin_watch) = drain::channel();
    let admin = Arc::new(AdminState {
        info: StaticInfo {
            node: config.node.name.value.clone(),
            config: config.source.display().to_string(),
            cgroup: root.display().to_string(),
            pin_dir: config.agent.pin_dir.display().to_string(),
            outbound: outbound.to_string(),
            inbound: inbound_addr.to_string(),
            admin: config.agent.admin.value.to_string(),
            metrics: config.agent.metrics.as_ref().map(|m| m.value.to_string()),
            trust_domain: config.mesh.trust_domain.value.clone(),
        },
        started: std::time::Instant::now(),
        catalog: catalog.clone(),
        metrics: metrics.clone(),
        connections,
        tls: tls.clone(),
        inbound: inbound_stats.clone(),
        kernel,
        attached: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        trace,
        trace_streams: Default::default(),
        pod_listeners: pods.listening.clone(),
        discovery_synced: discovery.as_ref().map(|d| d.synced.clone()),
    });
    // The full API on loopback; probes and metrics alone where the network
    // may reach them. Both are handed over in an upgrade and share the
    // admin drain.
    let mut surfaces = vec![(config.agent.admin.value, Surface::Admin)];
    if let Some(metrics) = &config.agent.metrics {
        surfaces.push((metrics.value, Surface::Metrics));
    }
    for (addr, surface) in surfaces {
        let error = |e| match surface {
            Surface::Admin => AgentError::Admin(e),
            Surface::Metrics => AgentError::Metrics(e),
        };
        let (listener, _) = crate::connect::listen(addr, 128, inherited).map_err(error)?;
        offered.add_fixed(dup(std::os::fd::AsFd::as_fd(&listener)).map_err(error)?);
        tokio::spawn(admin::serve(
            listener,
            admin.clone(),
            surface,
            admin_watch.clone(),
        ));
    }

    redirect.attach(root)?;
    admin.attached.store(true, Ordering::Release);
    let server = tokio::spawn(listener.serve(ctx.clone(), watch.clone()));
    let server6 = listener6.map(|l| tokio::spawn(l.serve(ctx.clone(), watch.clone())));
    let inbound_server = inbound
        .serve_on(&inbound_runtime, inbound_ctx, watch.clone())
        .map_err(AgentError::Inbound)?;
    tokio::spawn(give_back_memory(
        inbound_limits,
        inbound_stats.clone(),
        watch.clone(),
    ));
    tokio::spawn(sweep_records(records, cookie_records, watch.clone()));
    let tables_changed = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(fastpath::pump_kernel_events(
        kernel_events,
        catalog.clone(),
        metrics.clone(),
        audit.clone(),
        tables_changed.clone(),
        watch.clone(),
    ));
    // From here on this agent serves; the one it replaces may stop.
    inherited.ready();
    let (handed_over_tx, handed_over) = tokio::sync::oneshot::channel();
    // Bound before "ready" is said: a successor started right after finds
    // this agent, not the previous one's closed socket.
    let socket_file = match handover.listen() {
        Ok(listening) => {
            let file = listening.file();
            tokio::spawn(handover::offer(
                listening,
                offered.clone(),
                metrics.clone(),
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
    info!(
        "sluice agent ready: node {}, {services} services, {workloads} workloads, outbound {outbound}, \
         inbound mTLS {inbound_addr} (trust domain {})",
        config.node.name.value, config.mesh.trust_domain.value
    );

    let mut live = Live {
        config,
        root,
        catalog,
        checkers,
        redirect,
        created,
        drain: watch,
        tls,
        identities,
        metrics,
        tables_changed,
        tables_failing: false,
        pods,
        captures,
        capture_ctx,
        agent_cgroup,
        outbound_ctx: ctx,
        offered,
        discovery: discovery.map(|d| d.updates),
        discovered: None,
        unplaced: HashSet::new(),
        file_text: std::fs::read_to_string(&config.source).unwrap_or_default(),
        applied_discovery: None,
        applied_file_text: String::new(),
    };
    let exit = live.serve_until_stopped(handed_over).await;
    // After a handover the path is the successor's; it is left alone.
    if exit == Exit::Stopped
        && let Some(file) = &socket_file
    {
        file.remove_if_ours();
    }
    let pods = std::mem::replace(
        &mut live.pods,
        PodListeners {
            addr: outbound,
            open: HashMap::new(),
            listening: Default::default(),
        },
    );
    let captures = std::mem::replace(
        &mut live.captures,
        CaptureSet::new(SocketAddr::V4(config.agent.capture)),
    );
    admin.stopping.store(true, Ordering::Release);
    if exit == Exit::HandedOver {
        // The successor answers on the same admin and metrics sockets.
        admin_trigger.start();
    }
    info!(
        "stopping: no new connections; draining {} open (up to {})",
        trigger.active(),
        config.agent.drain_timeout
    );
    // A stop refuses new connects at once; an upgrade leaves the sockets
    // listening for the successor.
    let refuse = exit == Exit::Stopped;
    if refuse {
        trigger.refuse();
    } else {
        trigger.start();
    }
    pods.stop(refuse);
    captures.stop(refuse);
    let outbound6 = server6.into_iter().map(|task| ("outbound IPv6", task));
    for (name, task) in [("outbound", server), ("inbound", inbound_server)]
        .into_iter()
        .chain(outbound6)
    {
        if let Err(e) = task.await {
            error!("{name} listener task failed: {e}");
        }
    }
    let left = trigger.wait_idle(config.agent.drain_timeout.0).await
        + pods.drain(config.agent.drain_timeout.0).await
        + captures.drain(config.agent.drain_timeout.0).await;
    admin_trigger.start();
    if left > 0 {
        warn!("drain deadline passed with {left} connections open; closing them");
    } else if exit == Exit::HandedOver {
        info!("drained; the new agent has taken over");
    } else {
        info!("drained; detaching");
    }
    Ok(exit)
}

/// A one-thread runtime of its own for the inbound port, running until the
/// returned sender is dropped (after the drain).
fn start_inbound_runtime() -> io::Result<(tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>)>
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("sluice-inbound".into())
        .spawn(move || {
            runtime.block_on(async {
                let _ = stopped.await;
            });
        })?;
    Ok((handle, stop))
}

/// How often the allocator is asked to give freed memory back.
const TRIM_EVERY: Duration = Duration::from_secs(2);
/// Connections (open at the peak, or refused) since the last look that
/// make a trim worth it.
const TRIM_AFTER: usize = 64;

/// Gives memory back to the kernel after a burst of inbound connections
/// (a flood, or a peer's reconnect storm) has ended. glibc keeps freed
/// memory in its arenas for reuse, so without this the agent's RSS would
/// stay at the peak of the last flood; `malloc_trim` returns the free pages
/// of every arena. It runs only after a burst, never per connection.
async fn give_back_memory(
    limits: Arc<InboundLimits>,
    stats: Arc<InboundStats>,
    mut drain: DrainWatch,
) {
    let refused = |s: &InboundStats| -> u64 { Refusal::ALL.iter().map(|r| s.refused(*r)).sum() };
    let mut last_refused = refused(&stats);
    let mut tick = tokio::time::interval(TRIM_EVERY);
    loop {
        tokio::select! {
            _ = drain.draining() => return,
            _ = tick.tick() => {}
        }
        let peak = limits.take_peak();
        let now_refused = refused(&stats);
        let burst =
            peak.saturating_sub(limits.connections()) + (now_refused - last_refused) as usize;
        last_refused = now_refused;
        if burst >= TRIM_AFTER {
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only walks the allocator's own state.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// The id of the cgroup this agent runs in.
fn own_cgroup_id() -> io::Result<u64> {
    let mount = cgroup::cgroup2_mount()
        .ok_or_else(|| io::Error::other("cgroup v2 is not mounted (see /proc/mounts)"))?;
    let own = cgroup::own_cgroup(&mount)?;
    cgroup::cgroup_id(&own)
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

/// What changes while the agent runs: the catalog and what hangs off it.
struct Live<'a> {
    /// The config the agent started with; `agent` and `node` changes need
    /// a restart and are compared against it.
    config: &'a Config,
    root: &'a Path,
    catalog: Arc<ArcSwap<Catalog>>,
    checkers: HealthCheckers,
    redirect: &'a mut Redirect,
    created: &'a mut Vec<PathBuf>,
    drain: DrainWatch,
    tls: Arc<TlsContext>,
    identities: Arc<ArcSwap<Vec<Identity>>>,
    metrics: Arc<Metrics>,
    /// Notified when a kernel-balanced connect failed.
    tables_changed: Arc<tokio::sync::Notify>,
    tables_failing: bool,
    pods: PodListeners,
    captures: CaptureSet,
    capture_ctx: Arc<CaptureContext>,
    /// This agent's cgroup, written again now and then into the connect
    /// hook's LRU set of agent cgroups.
    agent_cgroup: u64,
    outbound_ctx: Arc<OutboundContext>,
    offered: handover::Offered,
    /// Kubernetes discovery's updates, and the latest one.
    discovery: Option<DiscoveryUpdates>,
    discovered: Option<Arc<discovery::Translated>>,
    /// Pods that could not be placed, each reported once.
    unplaced: HashSet<String>,
    /// The config file as last read (and found valid on its own).
    file_text: String,
    /// The discovery update and file text the running catalog was built
    /// from, which the next update is compared with.
    applied_discovery: Option<Arc<discovery::Translated>>,
    applied_file_text: String,
}

type DiscoveryUpdates = tokio::sync::watch::Receiver<Option<Arc<discovery::Translated>>>;

/// What asked for the catalog to be rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The config file changed (or SIGHUP).
    File,
    /// Kubernetes discovery saw a change.
    Kubernetes,
}

/// The next discovery update; pending forever without discovery.
async fn discovery_changed(
    updates: &mut Option<DiscoveryUpdates>,
) -> Option<Arc<discovery::Translated>> {
    let Some(rx) = updates else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        return std::future::pending().await;
    }
    rx.borrow_and_update().clone()
}

/// The same discovery settings, but for `health_check`, which a reload
/// applies at once.
fn same_discovery(
    a: Option<&crate::config::KubernetesConfig>,
    b: Option<&crate::config::KubernetesConfig>,
) -> bool {
    let strip = |k: Option<&crate::config::KubernetesConfig>| {
        k.cloned().map(|mut k| {
            k.health_check = None;
            k
        })
    };
    strip(a) == strip(b)
}

/// The identities of this node's workloads.
fn identities_of(catalog: &Catalog) -> Vec<Identity> {
    let mut ids: Vec<Identity> = catalog
        .workloads()
        .iter()
        .map(|w| w.identity.clone())
        .collect();
    ids.sort_by_key(|id| id.to_string());
    ids.dedup();
    ids
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Live<'_> {
    /// Applies config changes until SIGTERM or SIGINT, or until a
    /// successor has taken over.
    async fn serve_until_stopped(
        &mut self,
        mut handed_over: tokio::sync::oneshot::Receiver<()>,
    ) -> Exit {
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            error!("cannot watch SIGTERM/SIGHUP; stopping");
            return Exit::Stopped;
        };
        let path = self.config.source.clone();
        let mut seen = modified(&path);
        let mut poll = tokio::time::interval(CONFIG_POLL);
        let mut refresh = tokio::time::interval(TABLE_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let changed = self.tables_changed.clone();
        let mut reregister = tokio::time::interval(AGENT_REREGISTER);
        let mut discovered = self.discovery.take();
        loop {
            tokio::select! {
                _ = refresh.tick() => self.refresh_tables(),
                _ = reregister.tick() => {
                    if let Err(e) = self.redirect.register_agent(self.agent_cgroup) {
                        warn!("cannot renew this agent's cgroup in the connect hook: {e}");
                    }
                }
                _ = changed.notified() => self.refresh_tables(),
                _ = term.recv() => {
                    info!("SIGTERM received");
                    return Exit::Stopped;
                }
                _ = tokio::signal::ctrl_c() => {
                    info!("SIGINT received");
                    return Exit::Stopped;
                }
                Ok(()) = &mut handed_over => {
                    info!("upgrade: the new agent is serving; draining");
                    return Exit::HandedOver;
                }
                _ = hup.recv() => {
                    seen = modified(&path);
                    self.reload(&path, Trigger::File);
                }
                _ = poll.tick() => {
                    let now = modified(&path);
                    if now != seen {
                        seen = now;
                        self.reload(&path, Trigger::File);
                    }
                }
                Some(found) = discovery_changed(&mut discovered) => {
                    self.discovered = Some(found);
                    if !self.apply_service_changes(&path) {
                        self.reload(&path, Trigger::Kubernetes);
                    }
                }
            }
        }
    }

    /// Brings the kernel's backend tables in line with ejections, health
    /// and ejection expiry.
    fn refresh_tables(&mut self) {
        let catalog = self.catalog.load();
        let entries = kernel_tables(&catalog, now_ms());
        if entries.is_empty() {
            return;
        }
        match self.redirect.refresh_tables(&entries) {
            Ok(_) if self.tables_failing => {
                self.tables_failing = false;
                info!("the kernel's backend tables are up to date again");
            }
            Err(e) if !self.tables_failing => {
                self.tables_failing = true;
                warn!("cannot update the kernel's backend tables (they keep their last set): {e}");
            }
            _ => {}
        }
    }

    /// Applies a discovery update that changed services only (no workload,
    /// node or file change since the running catalog was built) by
    /// building just those services into the running catalog
    /// ([`Catalog::with_services`]). False when it takes a whole rebuild.
    fn apply_service_changes(&mut self, path: &Path) -> bool {
        let (Some(applied), Some(found)) = (&self.applied_discovery, &self.discovered) else {
            return false;
        };
        if self.applied_file_text != self.file_text {
            return false;
        }
        let Some(changes) = discovery::service_changes(applied, found) else {
            return false;
        };
        let found = found.clone();
        match self.build_service_changes(path, &found, &changes) {
            Ok(()) => {
                self.metrics.catalog_update(false);
                debug!(
                    "kubernetes: {} services built anew, {} removed",
                    changes.changed.len(),
                    changes.removed.len()
                );
                self.applied_discovery = Some(found);
            }
            // Kept as the base: the refused change is tried again, with
            // whatever comes next, until it validates.
            Err(why) => error!(
                "kubernetes: the discovered change was refused; the running catalog stays in force: {why}"
            ),
        }
        true
    }

    fn build_service_changes(
        &mut self,
        path: &Path,
        found: &discovery::Translated,
        changes: &discovery::ServiceChanges,
    ) -> Result<(), String> {
        // The file's services, the workloads and the nodes, with only the
        // changed services: enough to validate those against everything
        // they name.
        let mut config = Config::from_text(&self.file_text, path).map_err(|e| e.to_string())?;
        keep_start_overrides(&mut config);
        let from_file = config.services.len();
        discovery::merge_parts(
            &mut config,
            &changes.changed,
            &found.workloads,
            &found.nodes,
        )?;
        let specs: Vec<&crate::config::ServiceSpec> = config.services[from_file..].iter().collect();
        // An address held by a running service that stays is not free.
        let running = self.catalog.load();
        let leaving: HashSet<(&str, &str)> = changes
            .removed
            .iter()
            .map(|(ns, name)| (ns.as_str(), name.as_str()))
            .chain(
                specs
                    .iter()
                    .map(|s| (s.namespace.as_str(), s.name.value.as_str())),
            )
            .collect();
        for s in &specs {
            let vip = SocketAddr::new(s.address.value, s.port.value);
            if let Some(other) = running.service(vip)
                && !leaving.contains(&(other.namespace.as_str(), other.name.as_str()))
            {
                return Err(format!(
                    "service {}/{}: {vip} is the address of service {}",
                    s.namespace,
                    s.name.value,
                    other.qualified_name()
                ));
            }
        }
        let catalog = running.with_services(&config, &specs, &changes.removed);
        let named: Vec<(&str, &str)> = leaving.iter().copied().collect();
        let (write, drop) = kernel_delta(&running, &catalog, &named, now_ms());
        self.redirect
            .update_services(&write, &drop)
            .map_err(|e| e.to_string())?;
        self.checkers
            .sync(&catalog, self.config.agent.mark, &self.drain);
        self.catalog.store(Arc::new(catalog));
        self.sync_captures();
        Ok(())
    }

    /// Opens and closes capture listeners and hooks as the running
    /// catalog's captured workloads say.
    fn sync_captures(&mut self) {
        if let Err(e) = self.captures.sync(
            &self.catalog.load(),
            self.redirect,
            &self.capture_ctx,
            &Inherited::none(),
            &self.offered,
        ) {
            error!("{e}");
        }
    }

    /// Places every workload of `config`. A discovered pod that cannot be
    /// placed (its namespace gone between the API server's word and ours)
    /// is left out with its endpoints, and named once; a workload of the
    /// file that cannot be placed refuses the whole config.
    fn place_workloads(&mut self, config: &mut Config) -> io::Result<Vec<Placement>> {
        let previous = self.catalog.load();
        let discovered: HashSet<String> = self
            .discovered
            .as_ref()
            .map(|d| {
                d.workloads
                    .iter()
                    .filter_map(|w| w["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let mut placements = Vec::with_capacity(config.workloads.len());
        let mut left_out = HashSet::new();
        for w in &config.workloads {
            match place_workload(w, self.root, self.created, Some(&previous)) {
                Ok(p) => placements.push(p),
                Err(e) if discovered.contains(&w.name.value) => {
                    if self.unplaced.insert(e.to_string()) {
                        warn!("kubernetes: {e}; the pod is left out until it can be placed");
                    }
                    left_out.insert(w.name.value.clone());
                }
                Err(e) => return Err(e),
            }
        }
        if !left_out.is_empty() {
            config
                .workloads
                .retain(|w| !left_out.contains(&w.name.value));
            for s in &mut config.services {
                s.endpoints.retain(|e| {
                    e.workload
                        .as_ref()
                        .is_none_or(|w| !left_out.contains(&w.value))
                });
            }
        }
        Ok(placements)
    }

    /// Loads the file again and applies it, or keeps the running config.
    fn reload(&mut self, path: &Path, trigger: Trigger) {
        let refuse = |this: &Self, why: &str| match trigger {
            Trigger::File => {
                this.metrics.reload(false);
                error!("config reload refused; the running config stays in force:\n{why}");
            }
            Trigger::Kubernetes => error!(
                "kubernetes: the discovered catalog was refused; the running catalog stays in force: {why}"
            ),
        };
        let loaded = match trigger {
            Trigger::File => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|text| {
                    let config = Config::from_text(&text, path).map_err(|e| e.to_string())?;
                    self.file_text = text;
                    Ok(config)
                }),
            Trigger::Kubernetes => {
                Config::from_text(&self.file_text, path).map_err(|e| e.to_string())
            }
        };
        let mut new = match loaded {
            Ok(new) => new,
            Err(e) => return refuse(self, &e),
        };
        keep_start_overrides(&mut new);
        if let Some(found) = &self.discovered
            && let Err(e) = discovery::merge(&mut new, found)
        {
            return refuse(self, &e);
        }
        if trigger == Trigger::File
            && (new.agent != self.config.agent
                || new.node.name.value != self.config.node.name.value
                || new.node.cgroup_root.value != self.config.node.cgroup_root.value
                || new.node.address != self.config.node.address
                || new.mesh.trust_domain.value != self.config.mesh.trust_domain.value
                || new.mesh.certificates != self.config.mesh.certificates
                || !same_discovery(new.kubernetes.as_ref(), self.config.kubernetes.as_ref()))
        {
            warn!(
                "config reload: changes under `agent`, `node` (name, cgroup_root, address), \
                 `mesh` (trust_domain, certificates) and `kubernetes` (but its health_check) \
                 apply at the next restart; the rest applies now"
            );
        }
        let cgroups = match self.place_workloads(&mut new) {
            Ok(c) => c,
            Err(e) => return refuse(self, &e.to_string()),
        };
        let catalog = Catalog::from_config(&new, &cgroups, Some(&self.catalog.load()));
        if let Err(e) = self
            .redirect
            .sync_services(&kernel_entries(&catalog, now_ms()))
        {
            return refuse(self, &e.to_string());
        }
        let services = catalog.services().count();
        let identities = identities_of(&catalog);
        self.tls.set_identities(&identities);
        if let Err(e) = self.tls.refresh(&identities, false) {
            error!("certificates for the new workloads: {e}");
        }
        self.identities.store(Arc::new(identities));
        // New checkers first, so that no endpoint goes unwatched.
        // Checks of new endpoints start before the catalog that has them is
        // in force; those of unchanged endpoints keep running.
        self.checkers
            .sync(&catalog, self.config.agent.mark, &self.drain);
        self.catalog.store(Arc::new(catalog));
        self.pods.sync(
            &self.catalog.load(),
            &self.outbound_ctx,
            &Inherited::none(),
            &self.offered,
            self.config.agent.drain_timeout.0,
        );
        self.sync_captures();
        self.applied_discovery = self.discovered.clone();
        self.applied_file_text.clone_from(&self.file_text);
        match trigger {
            Trigger::File => {
                self.metrics.reload(true);
                info!(
                    "config reloaded: {services} services, {} workloads",
                    new.workloads.len()
                );
            }
            Trigger::Kubernetes => {
                self.metrics.catalog_update(true);
                debug!(
                    "kubernetes: catalog updated: {services} services, {} workloads",
                    new.workloads.len()
                );
            }
        }
    }
}

/// Forwards the programs' aya-log events to the agent's log.
async fn pump_ebpf_log(logger: aya_log::EbpfLogger<TraceLog>, drain: DrainWatch) {
    fastpath::drain_ring(logger, "eBPF log events", drain, None, |logger| {
        logger.flush()
    })
    .await
}

/// Removes records of connects that never reached `accept()` (refused,
/// timed out, abandoned). The LRU maps bound them anyway; this keeps the
/// maps honest for `sluice maps`.
async fn sweep_records(
    by_peer: Arc<records::PeerRecords>,
    by_cookie: aya::maps::Map,
    mut drain: DrainWatch,
) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = drain.draining() => return,
            _ = tick.tick() => {
                let n = records::sweep::<u64>(&by_cookie, STALE_AFTER)
                    + records::sweep::<sluice_maps::PeerKey>(by_peer.map(), STALE_AFTER);
                if n > 0 {
                    info!("swept {n} stale redirect records");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Either driver's name finds the kubelet's root under the other;
    /// anything else, or a root that exists, is taken as written.
    #[test]
    fn the_kubelet_root_is_found_under_either_driver() {
        let mount =
            std::env::temp_dir().join(format!("sluice-kubelet-root-{}", std::process::id()));
        std::fs::create_dir_all(mount.join("k/kubepods")).unwrap();
        std::fs::create_dir_all(mount.join("s/kubepods.slice")).unwrap();
        assert_eq!(
            kubelet_root(&mount, "k/kubepods.slice").as_deref(),
            Some("k/kubepods")
        );
        assert_eq!(
            kubelet_root(&mount, "s/kubepods").as_deref(),
            Some("s/kubepods.slice")
        );
        assert_eq!(kubelet_root(&mount, "k/kubepods"), None);
        assert_eq!(kubelet_root(&mount, "x/kubepods.slice"), None);
        assert_eq!(kubelet_root(&mount, "k/other"), None);
        std::fs::remove_dir_all(&mount).unwrap();
    }
}
