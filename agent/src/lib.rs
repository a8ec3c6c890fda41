//! Sluice: a sidecar-less, per-node service-mesh agent.
//!
//! eBPF hooks ([`redirect`]) catch workload connections at `connect()` and
//! hand them to the userspace data plane ([`proxy`]), which picks an
//! endpoint ([`lb`]) from the [`catalog`] and carries the bytes. See
//! DESIGN.md for the whole picture.

pub mod accept;
pub mod admin;
pub mod audit;
pub mod authz;
pub mod capture;
pub mod carry;
pub mod catalog;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connect;
pub mod daemon;
pub mod discovery;
pub mod drain;
pub mod fastpath;
pub mod handover;
pub mod lb;
pub mod netns;
pub mod proxy;
pub mod redirect;
pub mod resilience;
pub mod route;
pub mod telemetry;
pub mod tls;
