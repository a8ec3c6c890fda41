//! `sluice agent`: puts the pieces together and runs until SIGTERM.
//!
//! Start: preflight, workload cgroups, load programs, fill maps, bind the
//! outbound listener, and only then attach (a redirect must always find a
//! listener). Stop: stop accepting, drain open connections up to
//! `agent.drain_timeout`, detach, remove pins and the cgroups it created.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use log::{error, info, warn};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{
    catalog::Catalog,
    config::Config,
    drain::{self, DrainWatch},
    proxy::{OutboundContext, OutboundListener},
    redirect::{
        ProgramSettings, Redirect, RedirectError, cgroup,
        preflight::{self, PreflightError},
        records,
    },
};

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
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
}

/// Runs the agent until SIGTERM or SIGINT, then drains and cleans up.
pub fn run(config: Config) -> Result<(), AgentError> {
    let cgroup_mount = preflight::check(&config.agent.pin_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.agent.worker_threads)
        .thread_name("sluice-worker")
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    runtime.block_on(serve(config, cgroup_mount))
}

async fn serve(config: Config, cgroup_mount: PathBuf) -> Result<(), AgentError> {
    let root = cgroup_mount.join(&config.node.cgroup_root.value);
    let mut created = Vec::new();
    let result = start_and_wait(&config, &root, &mut created).await;
    for (dir, e) in cgroup::remove_created(&created) {
        warn!("cgroup {} left in place: {e}", dir.display());
    }
    result
}

async fn start_and_wait(
    config: &Config,
    root: &Path,
    created: &mut Vec<PathBuf>,
) -> Result<(), AgentError> {
    created.extend(cgroup::create_all(root).map_err(AgentError::Cgroup)?);
    let mut workload_cgroups = Vec::with_capacity(config.workloads.len());
    for w in &config.workloads {
        let path = root.join(w.cgroup());
        created.extend(cgroup::create_all(&path).map_err(AgentError::Cgroup)?);
        let id = cgroup::cgroup_id(&path).map_err(AgentError::Cgroup)?;
        workload_cgroups.push((path, id));
    }
    let catalog = Catalog::from_config(config, &workload_cgroups);

    let mut redirect = Redirect::load(&config.agent.pin_dir)?;
    let result = run_attached(config, root, catalog, &mut redirect).await;
    redirect.detach();
    result
}

async fn run_attached(
    config: &Config,
    root: &Path,
    catalog: Catalog,
    redirect: &mut Redirect,
) -> Result<(), AgentError> {
    let (trigger, watch) = drain::channel();
    if let Some(logger) = redirect.take_logger() {
        tokio::spawn(pump_ebpf_log(logger, watch.clone()));
    }
    let records = Arc::new(redirect.take_peer_records()?);
    let cookie_records = redirect.take_cookie_records()?;
    redirect.configure(ProgramSettings {
        outbound: config.agent.outbound,
        agent_mark: config.agent.mark,
        log: config.agent.ebpf_log,
    })?;
    redirect.sync_services(&catalog.service_map())?;

    let outbound = SocketAddr::V4(config.agent.outbound);
    let listener = OutboundListener::bind(outbound).map_err(AgentError::Listener)?;
    let services = catalog.services().count();
    let workloads = catalog.workloads().len();
    let ctx = Arc::new(OutboundContext {
        catalog: Arc::new(ArcSwap::from_pointee(catalog)),
        records: records.clone(),
        connect_timeout: config.agent.connect_timeout.0,
        mark: config.agent.mark,
    });

    redirect.attach(root)?;
    let server = tokio::spawn(listener.serve(ctx, watch.clone()));
    tokio::spawn(sweep_records(records, cookie_records, watch));
    info!(
        "sluice agent ready: node {}, {services} services, {workloads} workloads, outbound {outbound}",
        config.node.name.value
    );

    wait_for_stop_signal().await;
    info!(
        "stopping: no new connections; draining {} open (up to {})",
        trigger.active(),
        config.agent.drain_timeout
    );
    trigger.start();
    if let Err(e) = server.await {
        error!("outbound listener task failed: {e}");
    }
    let left = trigger.wait_idle(config.agent.drain_timeout.0).await;
    if left > 0 {
        warn!("drain deadline passed with {left} connections open; closing them");
    } else {
        info!("drained; detaching");
    }
    Ok(())
}

async fn wait_for_stop_signal() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot watch SIGTERM ({e}); stopping");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
    }
}

/// Forwards the programs' aya-log events to the agent's log.
async fn pump_ebpf_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>, mut drain: DrainWatch) {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open and
    // unchanged until the AsyncFd (which owns the logger) is dropped.
    let mut fd = match unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!("eBPF log events are unavailable: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = drain.draining() => return,
            ready = fd.readable_mut() => match ready {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    warn!("eBPF log reader stopped: {e}");
                    return;
                }
            },
        }
    }
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
