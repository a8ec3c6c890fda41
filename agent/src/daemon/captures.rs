//! Inbound capture, kept in line with the catalog: a capture listener in
//! each network namespace that holds a captured workload (a pod's, or the
//! node's own for workloads there), the sk_lookup hook attached to that
//! namespace, and the CAPTURE map naming what is captured and how.
//!
//! Why sk_lookup: it runs in the destination's network namespace when the
//! kernel looks for the socket of an arriving connection, so it sees every
//! connect from outside (another pod, another node, the host) and none
//! made inside over loopback, and it needs neither iptables nor a change
//! to the workload. cgroup hooks could not do this: the caller's socket
//! lives in another cgroup or on another machine, and the workload's
//! listening socket sees a connection only once it is established.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use log::{info, warn};
use sluice_maps::{
    CAPTURE_STRICT, CaptureKey, CaptureValue, MAX_CAPTURE_LISTENERS, capture_slot_v6, key_addr,
};

use crate::{
    catalog::{Catalog, capture::InboundMode},
    drain::{self, DrainTrigger},
    handover::{Inherited, Offered},
    netns::{self, Netns},
    proxy::{ProxyInputs, capture::CaptureListener},
    redirect::{Redirect, RedirectError},
};

/// Why capture could not be set up as the catalog asks.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "inbound capture is unavailable on this kernel (sk_lookup refused), so strict workloads \
         cannot be protected: {workloads}; make them permissive or run a kernel with sk_lookup \
         (Linux 5.9+)"
    )]
    Unavailable { workloads: String },
    #[error("inbound capture: {0}")]
    Kernel(#[from] RedirectError),
    #[error("capture listener: {0}")]
    Listener(std::io::Error),
}

/// One network namespace's capture.
struct Open {
    trigger: DrainTrigger,
    cookie: u64,
    /// The IPv4 listener's slot; the IPv6 one, when it could listen, is at
    /// [`capture_slot_v6`] of it.
    slot: u32,
    /// Whether the namespace is a pod's (its offer leaves with the pod).
    pod: bool,
}

/// The capture listeners and kernel state of this agent.
pub(super) struct CaptureSet {
    addr: SocketAddr,
    /// By namespace path; `None` is the node's own namespace.
    open: HashMap<Option<PathBuf>, Open>,
    free: Vec<u32>,
    next: u32,
    warned_unavailable: bool,
}

impl CaptureSet {
    pub fn new(addr: SocketAddr) -> CaptureSet {
        CaptureSet {
            addr,
            open: HashMap::new(),
            free: Vec::new(),
            next: 0,
            warned_unavailable: false,
        }
    }

    /// Opens, attaches and fills what `catalog` asks for and closes what it
    /// no longer names. One namespace that cannot be entered does not stop
    /// the others.
    pub fn sync(
        &mut self,
        catalog: &Catalog,
        redirect: &mut Redirect,
        ctx: &Arc<ProxyInputs>,
        inherited: &Inherited,
        offered: &Offered,
    ) -> Result<(), CaptureError> {
        let mut wanted: HashMap<Option<PathBuf>, Option<Arc<Netns>>> = HashMap::new();
        for (_, target) in catalog.capture_keys() {
            let ns = target.workload.netns.clone();
            wanted.insert(ns.as_ref().map(|n| n.path().to_owned()), ns);
        }
        if !redirect.capture().available() {
            let strict: Vec<String> = catalog
                .capture_keys()
                .filter(|(_, t)| t.mode == InboundMode::Strict)
                .map(|(_, t)| t.workload.qualified_name())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if !strict.is_empty() {
                return Err(CaptureError::Unavailable {
                    workloads: strict.join(", "),
                });
            }
            if !wanted.is_empty() && !self.warned_unavailable {
                self.warned_unavailable = true;
                warn!(
                    "inbound capture is unavailable on this kernel: permissive workloads are \
                     reachable in plaintext without being counted"
                );
            }
            return Ok(());
        }
        let gone: Vec<Option<PathBuf>> = self
            .open
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(open) = self.open.remove(&key) {
                open.trigger.start();
                redirect.capture().clear_listener(open.slot);
                redirect
                    .capture()
                    .clear_listener(capture_slot_v6(open.slot));
                if open.pod {
                    // Its outbound listener's offer goes with it, as the
                    // pod's namespace does.
                    offered.remove(open.cookie);
                }
                self.free.push(open.slot);
            }
        }
        for (key, ns) in &wanted {
            if self.open.contains_key(key) {
                continue;
            }
            match self.open_in(ns.as_deref(), redirect, ctx, inherited, offered) {
                Ok(open) => {
                    info!(
                        "capture listener {} open in {}",
                        self.addr,
                        key.as_ref()
                            .map_or("the node's namespace".into(), |p| p.display().to_string())
                    );
                    self.open.insert(key.clone(), open);
                }
                Err(e) => warn!(
                    "no inbound capture in {}: {e}; its workloads are not protected",
                    key.as_ref()
                        .map_or("the node's namespace".into(), |p| p.display().to_string())
                ),
            }
        }
        let mut entries = Vec::new();
        for (addr, target) in catalog.capture_keys() {
            let key = target.workload.netns.as_ref().map(|n| n.path().to_owned());
            let Some(open) = self.open.get(&key) else {
                continue;
            };
            entries.push((
                CaptureKey {
                    addr: key_addr(addr.ip()),
                    port: addr.port(),
                    _pad: 0,
                },
                CaptureValue {
                    listener: open.slot,
                    flags: if target.mode == InboundMode::Strict {
                        CAPTURE_STRICT
                    } else {
                        0
                    },
                },
            ));
        }
        redirect.capture().sync(&entries)?;
        let keep: HashSet<u64> = self.open.values().map(|o| o.cookie).collect();
        redirect.capture().detach_others(&keep);
        Ok(())
    }

    fn open_in(
        &mut self,
        netns: Option<&Netns>,
        redirect: &mut Redirect,
        ctx: &Arc<ProxyInputs>,
        inherited: &Inherited,
        offered: &Offered,
    ) -> Result<Open, CaptureError> {
        let io_err = CaptureError::Listener;
        let listener = CaptureListener::bind_in(self.addr, inherited, netns).map_err(io_err)?;
        let cookie = listener.netns_cookie();
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.next < MAX_CAPTURE_LISTENERS => {
                self.next += 1;
                self.next - 1
            }
            None => {
                return Err(io_err(std::io::Error::other(format!(
                    "more than {MAX_CAPTURE_LISTENERS} captured namespaces"
                ))));
            }
        };
        let attach = |redirect: &mut Redirect| -> Result<(), CaptureError> {
            redirect.capture().set_listener(slot, listener.socket())?;
            let ns_fd = match netns {
                Some(ns) => ns.fd(),
                None => netns::home().ok_or_else(|| {
                    io_err(std::io::Error::other("the agent's namespace is unknown"))
                })?,
            };
            redirect.attach_capture(cookie, ns_fd)?;
            Ok(())
        };
        if let Err(e) = attach(redirect) {
            self.free.push(slot);
            return Err(e);
        }
        // The kernel steers an IPv6 connect to an IPv6 socket only: a
        // second listener on the namespace's [::1], same port. Without it
        // (IPv6 off in the namespace) the hook refuses IPv6 from outside
        // to a strict workload itself, unaudited.
        let v6 = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), self.addr.port());
        let listener6 = match CaptureListener::bind_in(v6, inherited, netns) {
            Ok(l) => match redirect
                .capture()
                .set_listener(capture_slot_v6(slot), l.socket())
            {
                Ok(()) => Some(l),
                Err(e) => {
                    warn!("no IPv6 capture listener {v6} in network namespace {cookie}: {e}");
                    None
                }
            },
            Err(e) => {
                warn!(
                    "no IPv6 capture listener {v6} in network namespace {cookie}: {e}; IPv6 \
                     connects from outside to its strict workloads are refused unaudited"
                );
                None
            }
        };
        let (trigger, watch) = drain::channel();
        for l in std::iter::once(listener).chain(listener6) {
            let offer = l.socket().try_clone_to_owned().map_err(io_err)?;
            if netns.is_some() {
                offered.add(cookie, offer);
            } else {
                offered.add_fixed(offer);
            }
            tokio::spawn(l.serve(ctx.clone(), watch.clone()));
        }
        Ok(Open {
            trigger,
            cookie,
            slot,
            pod: netns.is_some(),
        })
    }

    /// The drains of the capture listeners, one per namespace.
    pub fn triggers(&self) -> impl Iterator<Item = &DrainTrigger> {
        self.open.values().map(|o| &o.trigger)
    }
}
