//! The outbound listener inside each pod's own network namespace: a pod's
//! connects are redirected to its namespace's 127.0.0.1, so the agent
//! listens there too, opened and drained as pods come and go.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use log::{info, warn};

use super::dup;
use crate::{
    catalog::Catalog,
    drain,
    handover::{Inherited, Offered},
    netns::Netns,
    proxy::{OutboundContext, OutboundListener},
};

/// Outbound listeners inside workloads' own network namespaces (pods), one
/// per namespace, opened and closed as the catalog's workloads change.
pub(super) struct PodListeners {
    addr: SocketAddr,
    open: HashMap<PathBuf, PodListener>,
    /// The namespaces with an open listener, for the admin API.
    pub listening: Arc<Mutex<Vec<PathBuf>>>,
}

struct PodListener {
    trigger: drain::DrainTrigger,
    cookie: u64,
}

impl PodListeners {
    pub fn new(addr: SocketAddr) -> PodListeners {
        PodListeners {
            addr,
            open: HashMap::new(),
            listening: Default::default(),
        }
    }

    /// Opens a listener for every namespace in `catalog` without one, and
    /// closes (drains) those whose namespace is gone from it.
    pub fn sync(
        &mut self,
        catalog: &Catalog,
        ctx: &Arc<OutboundContext>,
        inherited: &Inherited,
        handover: &Offered,
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

    /// The drains of the pods' listeners, one per namespace.
    pub fn triggers(&self) -> impl Iterator<Item = &drain::DrainTrigger> {
        self.open.values().map(|o| &o.trigger)
    }
}
