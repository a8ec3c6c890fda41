//! What changes while the agent runs: the config file (polled, and at
//! SIGHUP) and Kubernetes discovery's updates each build a new catalog,
//! which is validated, placed (cgroups, namespaces), written to the kernel
//! and swapped in whole; what hangs off the catalog (health checks,
//! certificates, pod and capture listeners) follows. A refused change keeps
//! the running catalog.

use std::{
    collections::HashSet,
    io,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use log::{debug, error, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use super::{
    Exit,
    captures::CaptureSet,
    placement::{StartOverrides, place_workload},
    pods::PodListeners,
};
use crate::{
    catalog::{Catalog, Placement, state::EndpointStates},
    clock::now_ms,
    config::{Config, Entries, Origin},
    discovery,
    drain::DrainWatch,
    handover::{Inherited, Offered, Successor},
    proxy::{OutboundContext, ProxyInputs},
    redirect::{
        Redirect,
        cgroup::CreatedCgroups,
        entries::{kernel_delta, kernel_entries, kernel_tables},
    },
    route::health::HealthCheckers,
    tls::Identity,
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

/// What changes while the agent runs: the catalog and what hangs off it.
pub(super) struct Live<'a> {
    /// The config the agent started with; changes that need a restart
    /// (`config::RESTART_ONLY`) are compared against it.
    pub(super) config: &'a Config,
    pub(super) overrides: StartOverrides,
    pub(super) root: &'a Path,
    pub(super) checkers: HealthCheckers,
    pub(super) redirect: &'a mut Redirect,
    pub(super) created: &'a mut CreatedCgroups,
    pub(super) drain: DrainWatch,
    pub(super) identities: Arc<ArcSwap<Vec<Identity>>>,
    /// Notified when a kernel-balanced connect failed.
    pub(super) tables_changed: Arc<tokio::sync::Notify>,
    pub(super) tables_failing: bool,
    pub(super) pods: PodListeners,
    pub(super) captures: CaptureSet,
    /// What the handlers share; the catalog in it is what changes.
    pub(super) inputs: Arc<ProxyInputs>,
    /// This agent's cgroup, written again now and then into the connect
    /// hook's LRU set of agent cgroups.
    pub(super) agent_cgroup: u64,
    /// The outbound handlers' context, for the pods' listeners.
    pub(super) outbound: Arc<OutboundContext>,
    pub(super) offered: Offered,
    /// Kubernetes discovery's updates, and the latest one.
    pub(super) discovery: Option<DiscoveryUpdates>,
    pub(super) discovered: Option<Arc<discovery::Translated>>,
    /// Pods that could not be placed, each reported once.
    pub(super) unplaced: HashSet<String>,
    /// The config file as last read (and found valid on its own), with
    /// the start's overrides; none while the start's is the last read.
    pub(super) file: Option<Arc<Config>>,
    /// Counts the files read: which one the running catalog was built
    /// from is told by it.
    pub(super) file_generation: u64,
    /// The discovery update and file generation the running catalog was
    /// built from, which the next update is compared with.
    pub(super) applied_discovery: Option<Arc<discovery::Translated>>,
    pub(super) applied_file_generation: u64,
    /// The agent that took over, once one did: the open connections go
    /// there.
    pub(super) successor: Option<Successor>,
    /// The previous agent's endpoint state, for the first catalog built
    /// with Kubernetes' services.
    pub(super) carried: Option<EndpointStates>,
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

/// The identities of this node's workloads.
pub(super) fn identities_of(catalog: &Catalog) -> Vec<Identity> {
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
    pub async fn serve_until_stopped(
        &mut self,
        mut handed_over: tokio::sync::oneshot::Receiver<Successor>,
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
                Ok(successor) = &mut handed_over => {
                    info!("upgrade: the new agent is serving; handing the open connections over");
                    self.successor = Some(successor);
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
                    if !self.apply_service_changes() {
                        self.reload(&path, Trigger::Kubernetes);
                    }
                }
            }
        }
    }

    /// Brings the kernel's backend tables in line with ejections, health
    /// and ejection expiry.
    fn refresh_tables(&mut self) {
        let catalog = self.inputs.catalog.load();
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
    fn apply_service_changes(&mut self) -> bool {
        let (Some(applied), Some(found)) = (&self.applied_discovery, &self.discovered) else {
            return false;
        };
        if self.applied_file_generation != self.file_generation {
            return false;
        }
        let Some(changes) = discovery::service_changes(applied, found) else {
            return false;
        };
        let found = found.clone();
        match self.build_service_changes(&found, &changes) {
            Ok(()) => {
                self.inputs.metrics.catalog_update(false);
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
        found: &discovery::Translated,
        changes: &discovery::ServiceChanges,
    ) -> Result<(), String> {
        // The file's services, the workloads and the nodes, with only the
        // changed services: enough to validate those against everything
        // they name.
        let file = self.file.clone();
        let file = file.as_deref().unwrap_or(self.config);
        let changed = Entries::with(file, &changes.changed, &found.workloads, &found.nodes);
        discovery::check(&changed).map_err(|e| e.to_string())?;
        let specs = changed.second_services();
        // An address held by a running service that stays is not free.
        let running = self.inputs.catalog.load();
        let leaving: HashSet<(&str, &str)> = changes
            .removed
            .iter()
            .map(|(ns, name)| (ns.as_str(), name.as_str()))
            .chain(
                specs
                    .iter()
                    .map(|s| (s.namespace.as_str(), s.name.as_str())),
            )
            .collect();
        for s in specs {
            let vip = SocketAddr::new(*s.address, *s.port);
            if let Some(other) = running.service(vip)
                && !leaving.contains(&(other.namespace.as_str(), other.name.as_str()))
            {
                return Err(format!(
                    "service {}/{}: {vip} is the address of service {}",
                    s.namespace,
                    s.name.get(),
                    other.qualified_name()
                ));
            }
        }
        let catalog = running.with_services(&changed, &changes.removed);
        let named: Vec<(&str, &str)> = leaving.iter().copied().collect();
        let (write, drop) = kernel_delta(&running, &catalog, &named, now_ms());
        self.redirect
            .update_services(&write, &drop)
            .map_err(|e| e.to_string())?;
        self.checkers
            .sync(&catalog, self.config.agent.mark, &self.drain);
        self.inputs.catalog.store(Arc::new(catalog));
        self.sync_captures();
        Ok(())
    }

    /// Opens and closes capture listeners and hooks as the running
    /// catalog's captured workloads say.
    fn sync_captures(&mut self) {
        if let Err(e) = self.captures.sync(
            &self.inputs.catalog.load(),
            self.redirect,
            &self.inputs,
            &Inherited::none(),
            &self.offered,
        ) {
            error!("{e}");
        }
    }

    /// Places every workload of `entries`. A discovered pod that cannot be
    /// placed (its namespace gone between the API server's word and ours)
    /// is left out of `entries` (its endpoints with it: the catalog keeps
    /// no endpoint of a workload it does not have), and named once; a
    /// workload of the file that cannot be placed refuses the whole config.
    fn place_workloads(&mut self, entries: &mut Entries) -> io::Result<Vec<Placement>> {
        let previous = self.inputs.catalog.load();
        let mut placements = Vec::with_capacity(entries.workloads().len());
        let mut left_out = HashSet::new();
        for (i, w) in entries.workloads().iter().enumerate() {
            match place_workload(w, self.root, self.created, Some(&previous)) {
                Ok(p) => placements.push(p),
                Err(e) if entries.workload_origin(i) == Origin::Second => {
                    if self.unplaced.insert(e.to_string()) {
                        warn!("kubernetes: {e}; the pod is left out until it can be placed");
                    }
                    left_out.insert(w.name.get().clone());
                }
                Err(e) => return Err(e),
            }
        }
        if !left_out.is_empty() {
            entries.retain_second_workloads(|w| !left_out.contains(w.name.get()));
        }
        Ok(placements)
    }

    /// Loads the file again (or takes a discovery update), builds the next
    /// catalog and puts it in force; on any refusal the running catalog
    /// stays.
    fn reload(&mut self, path: &Path, trigger: Trigger) {
        let built = self
            .next_file(path, trigger)
            .and_then(|file| self.build_catalog(&file));
        let catalog = match built {
            Ok(built) => built,
            Err(why) => {
                return match trigger {
                    Trigger::File => {
                        self.inputs.metrics.reload(false);
                        error!("config reload refused; the running config stays in force:\n{why}");
                    }
                    Trigger::Kubernetes => error!(
                        "kubernetes: the discovered catalog was refused; the running catalog \
                         stays in force: {why}"
                    ),
                };
            }
        };
        let (services, workloads) = (catalog.services().count(), catalog.workloads().len());
        self.put_in_force(catalog);
        match trigger {
            Trigger::File => {
                self.inputs.metrics.reload(true);
                info!("config reloaded: {services} services, {workloads} workloads");
                self.note_restart_only_changes();
            }
            Trigger::Kubernetes => {
                self.inputs.metrics.catalog_update(true);
                debug!("kubernetes: catalog updated: {services} services, {workloads} workloads");
            }
        }
    }

    /// The config file to build from, with the start's overrides: read
    /// again when it changed, else the last one read.
    fn next_file(&mut self, path: &Path, trigger: Trigger) -> Result<Arc<Config>, String> {
        if trigger == Trigger::Kubernetes
            && let Some(file) = &self.file
        {
            return Ok(file.clone());
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut next = Config::from_text(&text, path).map_err(|e| e.to_string())?;
        self.overrides.apply(&mut next);
        let next = Arc::new(next);
        self.file = Some(next.clone());
        self.file_generation += 1;
        Ok(next)
    }

    /// Says which changes of the file now in force wait for a restart:
    /// logged, and kept in `sluice_config_restart_pending` (which `sluice
    /// status` reads) until a later file takes them back.
    fn note_restart_only_changes(&self) {
        let Some(file) = &self.file else { return };
        let pending = self.config.restart_only_changes(file);
        if !pending.is_empty() {
            warn!(
                "config reload: changes to {} apply at the next restart; the rest applies now",
                pending.join(", ")
            );
        }
        self.inputs.metrics.set_restart_pending(&pending);
    }

    /// Checks the file's entries (its restart-only fields as running)
    /// with discovery's beside them, places their workloads, builds their
    /// catalog over the running one's state and writes its services to the
    /// kernel.
    fn build_catalog(&mut self, file: &Config) -> Result<Catalog, String> {
        let file = &file.keeping_restart_only_of(self.config);
        let found = self.discovered.clone();
        let mut entries = match &found {
            Some(found) => discovery::entries(file, found),
            None => Entries::file(file),
        };
        discovery::check(&entries).map_err(|e| e.to_string())?;
        let placements = self
            .place_workloads(&mut entries)
            .map_err(|e| e.to_string())?;
        let catalog = Catalog::build(&entries, &placements, Some(&self.inputs.catalog.load()));
        self.redirect
            .sync_services(&kernel_entries(&catalog, now_ms()))
            .map_err(|e| e.to_string())?;
        Ok(catalog)
    }

    /// Swaps `catalog` in, with what hangs off it: certificates for its
    /// identities, health checks, pod and capture listeners.
    fn put_in_force(&mut self, catalog: Catalog) {
        let identities = identities_of(&catalog);
        self.inputs.tls.set_identities(&identities);
        if let Err(e) = self.inputs.tls.refresh(&identities, false) {
            error!("certificates for the new workloads: {e}");
        }
        self.identities.store(Arc::new(identities));
        if self.discovered.is_some()
            && let Some(states) = self.carried.take()
        {
            let restored = catalog.restore_endpoint_states(&states, now_ms());
            info!("upgrade: the state of {restored} discovered endpoints carried over");
        }
        // New checkers first, so that no endpoint goes unwatched.
        // Checks of new endpoints start before the catalog that has them is
        // in force; those of unchanged endpoints keep running.
        self.checkers
            .sync(&catalog, self.config.agent.mark, &self.drain);
        self.inputs.catalog.store(Arc::new(catalog));
        self.pods.sync(
            &self.inputs.catalog.load(),
            &self.outbound,
            &Inherited::none(),
            &self.offered,
            self.config.agent.drain_timeout.0,
        );
        self.sync_captures();
        self.applied_discovery = self.discovered.clone();
        self.applied_file_generation = self.file_generation;
    }
}
