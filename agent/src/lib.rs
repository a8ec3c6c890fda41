//! Sluice: a sidecar-less, per-node service-mesh agent.
//!
//! The folders follow one connection, then the parts that keep them fed:
//!
//! ```text
//!  caught      redirect/   eBPF programs at connect(): the kernel maps, records
//!     |        fastpath    outcomes of the connects the kernel balanced itself
//!  accepted    accept/     the accept loop every listener runs; inbound bounds
//!     |        proxy/      the handlers: outbound, inbound (mTLS), capture
//!  routed      route/      choose an endpoint: eligible set, locality, panic,
//!     |                    balancing (lb/), health checks; authz/ for callers
//!  connected   connect/    the one socket maker (marks, pod namespaces, handover)
//!  carried     carry/      copy both ways (and suspend it for a handover), the
//!                          mTLS preamble; tls/ for streams (session/: the
//!                          record layer that moves); tunnel/ HTTP/2 CONNECT;
//!                          or, for request services, proxy/l7 with request/
//!                          (retry rules, replay bodies, upstream pools)
//!  observed    telemetry/  metrics families, counters; audit/; admin/ views
//!
//!  state       catalog/    services, endpoints, workloads: one immutable snapshot
//!              resilience/ per-endpoint and per-service breaker state; clock
//!  sources     config/     the file; discovery/ Kubernetes
//!  running     daemon/     composes the above and runs until SIGTERM; drain,
//!                          handover (upgrades: sockets, state, open
//!                          connections); cli/ the `sluice` command
//! ```
//!
//! Imports point down this picture (the data plane reads the catalog, the
//! catalog reads config and state), never back up: `layout.rs` fails the
//! build's tests on an import loop between top-level modules, and on a file
//! over 500 lines that does not say why. See DESIGN.md for the whole flow.

/// `impl AsyncWrite` for a wrapper whose writes go straight to its field
/// `io` (the wrappers watch or guard what is read): `write_through!(impl[T:
/// AsyncWrite + Unpin] Wrapper<T>);`.
macro_rules! write_through {
    (impl[$($generics:tt)*] $wrapper:ty) => {
        impl<$($generics)*> tokio::io::AsyncWrite for $wrapper {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
            }
        }
    };
}

/// Reads into `buf` from `io`; on success, the bytes this read added
/// (none at the end of the stream). For the wrappers that watch what they
/// read; their writes pass through (`write_through!`).
pub(crate) fn poll_read_added<'b, T: tokio::io::AsyncRead + Unpin>(
    io: &mut T,
    cx: &mut std::task::Context<'_>,
    buf: &'b mut tokio::io::ReadBuf<'_>,
) -> std::task::Poll<std::io::Result<&'b [u8]>> {
    let before = buf.filled().len();
    std::task::ready!(std::pin::Pin::new(io).poll_read(cx, buf))?;
    std::task::Poll::Ready(Ok(&buf.filled()[before..]))
}

pub mod accept;
pub mod admin;
pub mod audit;
pub mod authz;
pub mod buffers;
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
pub mod h2frames;
pub mod handover;
pub mod lb;
pub mod netns;
pub mod proxy;
pub mod redirect;
pub mod request;
pub mod resilience;
pub mod route;
pub mod telemetry;
pub mod tls;
pub mod tunnel;

#[cfg(test)]
mod layout;
