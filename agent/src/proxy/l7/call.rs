//! One request's context: who asks for what (a [`Call`]), and what became
//! of it along the way (a [`Note`]: retries, the endpoint, what the agent
//! did), for its access-log line and its counts.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU32, AtomicUsize, Ordering},
    },
};

use crate::{
    catalog::{Service, Workload},
    proxy::outbound::OutboundContext,
    telemetry::requests::ResponseFlag,
};

/// Who asks, for what.
pub(super) struct Call<'a> {
    pub ctx: &'a OutboundContext,
    pub service: &'a Arc<Service>,
    pub source: Option<&'a Workload>,
    pub peer: SocketAddr,
    pub note: &'a Note,
}

/// What became of a request, for its access-log line and its count.
#[derive(Debug, Default)]
pub(super) struct Note {
    pub(super) retries: AtomicU32,
    flag: AtomicU8,
    /// The endpoint of the last attempt, as its index plus one (0: none).
    pub(super) endpoint: AtomicUsize,
}

impl Note {
    pub(super) fn flag(&self, flag: ResponseFlag) {
        self.flag.store(flag as u8, Ordering::Relaxed);
    }

    pub(super) fn flagged(&self) -> ResponseFlag {
        ResponseFlag::from_u8(self.flag.load(Ordering::Relaxed))
    }

    pub(super) fn retries(&self) -> u32 {
        self.retries.load(Ordering::Relaxed)
    }

    /// The index of the endpoint that answered (or was tried last).
    pub(super) fn endpoint(&self) -> Option<usize> {
        self.endpoint.load(Ordering::Relaxed).checked_sub(1)
    }
}
