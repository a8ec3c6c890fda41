//! What the kernel's SERVICES and BACKENDS maps should hold for a catalog:
//! each service's key and flags, and for those the kernel balances, the
//! endpoints [`crate::route::kernel_set`] deems eligible now.

use std::sync::Arc;

use sluice_maps::{Backend, SERVICE_FAIL_OPEN, SERVICE_KERNEL, ServiceKey, key_addr};

use crate::{
    catalog::{Catalog, Service},
    clock::Millis,
    config::{Mode, OnAgentDown},
    route::kernel_set,
};

/// What the SERVICES and BACKENDS maps should hold now: every service
/// (IPv4 and IPv6 alike, in the maps' one key form) with its flags
/// and, for those the kernel may balance (kernel mode, or fail-open
/// while the agent is down), the endpoints the resilience layer deems
/// eligible at `now`, with their weights.
pub fn kernel_entries(catalog: &Catalog, now: Millis) -> Vec<KernelEntry> {
    entries(catalog, now, false)
}

/// [`kernel_entries`] of the services that have a backend table.
pub fn kernel_tables(catalog: &Catalog, now: Millis) -> Vec<KernelEntry> {
    entries(catalog, now, true)
}

/// What the kernel's SERVICES map needs to go from `running` to
/// `next` for the services `named` (namespace, name), those a watch
/// event changed: the entries to write, and the keys of addresses no
/// service of `next` holds any more.
pub fn kernel_delta(
    running: &Catalog,
    next: &Catalog,
    named: &[(&str, &str)],
    now: Millis,
) -> (Vec<KernelEntry>, Vec<ServiceKey>) {
    // A few names: a scan each costs less than an index of thousands.
    let find = |c: &'_ Catalog, (ns, name): &(&str, &str)| -> Option<Arc<Service>> {
        c.services()
            .find(|s| s.name == *name && s.namespace == *ns)
            .cloned()
    };
    let mut write = Vec::new();
    let mut drop = Vec::new();
    for name in named {
        if let Some(s) = find(next, name) {
            write.push(kernel_entry(&s, now));
        }
        if let Some(old) = find(running, name)
            && next.service(old.vip).is_none()
        {
            drop.push(ServiceKey {
                addr: key_addr(old.vip.ip()),
                port: old.vip.port(),
                _pad: 0,
            });
        }
    }
    (write, drop)
}

fn entries(catalog: &Catalog, now: Millis, tables_only: bool) -> Vec<KernelEntry> {
    catalog
        .services()
        .filter(|s| !tables_only || kernel_flags(s) != 0)
        .map(|s| kernel_entry(s, now))
        .collect()
}

/// What the connect hook does with a service: balance it in the kernel,
/// or pass it on while the agent is down, or neither.
fn kernel_flags(s: &Service) -> u32 {
    if s.mode == Mode::Kernel {
        SERVICE_KERNEL
    } else if s.on_agent_down == OnAgentDown::FailOpen {
        SERVICE_FAIL_OPEN
    } else {
        0
    }
}

/// One service as the kernel sees it.
fn kernel_entry(s: &Service, now: Millis) -> KernelEntry {
    let flags = kernel_flags(s);
    let weighted = s.balancer.honours_weights();
    let members = if flags == 0 {
        Vec::new()
    } else {
        kernel_set(s, now)
            .into_iter()
            .filter_map(|i| {
                let e = &s.endpoints[i];
                // Validation keeps each service to its
                // address's family; a connect hook could not
                // cross over.
                if e.addr.is_ipv4() != s.vip.is_ipv4() {
                    return None;
                }
                let backend = Backend {
                    addr: key_addr(e.addr.ip()),
                    port: e.addr.port(),
                    _pad: 0,
                };
                Some((backend, if weighted { e.weight } else { 1 }))
            })
            .collect()
    };
    KernelEntry {
        key: ServiceKey {
            addr: key_addr(s.vip.ip()),
            port: s.vip.port(),
            _pad: 0,
        },
        id: s.id,
        flags,
        members,
    }
}

/// One service as the kernel sees it; see [`kernel_entries`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelEntry {
    pub key: ServiceKey,
    pub id: u32,
    pub flags: u32,
    /// Backends with their weights; empty: no table.
    pub members: Vec<(Backend, u32)>,
}
