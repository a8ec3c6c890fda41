//! The outbound listener: connections the connect hook redirected land here.
//! One listener per workload network namespace; in the local default that
//! is the host's namespace only.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use log::{debug, warn};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::socket::{connect_marked, netns_cookie};
use crate::{
    catalog::Catalog,
    drain::{ConnectionGuard, DrainWatch},
    redirect::PeerRecords,
};

/// Per-direction copy buffer. Large enough for a payment request or reply
/// in one read; the benchmark issue tunes it.
const COPY_BUFFER: usize = 16 * 1024;
/// Pending connections the kernel queues for one listener.
const BACKLOG: u32 = 4096;

/// What every outbound connection needs, shared by all listeners.
pub struct OutboundContext {
    /// Swapped whole on change; read without a lock.
    pub catalog: Arc<ArcSwap<Catalog>>,
    pub records: Arc<PeerRecords>,
    pub connect_timeout: Duration,
    pub mark: u32,
}

/// A bound outbound listener in one network namespace.
pub struct OutboundListener {
    listener: TcpListener,
    netns_cookie: u64,
}

impl OutboundListener {
    /// Binds `addr` in the current network namespace.
    pub fn bind(addr: SocketAddr) -> io::Result<OutboundListener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket
            .bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
        let netns_cookie = netns_cookie(&socket)?;
        let listener = socket.listen(BACKLOG)?;
        Ok(OutboundListener {
            listener,
            netns_cookie,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until the drain starts, then closes the listener (new
    /// redirected connects are refused at once) and returns. Connections
    /// already accepted go on in their own tasks, tracked by `drain`.
    pub async fn serve(self, ctx: Arc<OutboundContext>, mut drain: DrainWatch) {
        loop {
            let accepted = tokio::select! {
                biased;
                _ = drain.draining() => break,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((client, peer)) => {
                    let guard = drain.track();
                    let ctx = ctx.clone();
                    let netns = self.netns_cookie;
                    tokio::spawn(async move { handle(ctx, client, peer, netns, guard).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    warn!("outbound listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Closes a connection with a reset, so the caller fails fast instead of
/// waiting for bytes that will never come.
fn reset(stream: TcpStream) {
    // If the option cannot be set the close is an ordinary FIN: still prompt.
    let _ = stream.set_zero_linger();
}

async fn handle(
    ctx: Arc<OutboundContext>,
    client: TcpStream,
    peer: SocketAddr,
    netns: u64,
    _guard: ConnectionGuard,
) {
    let record = match ctx.records.take(netns, peer) {
        Ok(Some(record)) => record,
        Ok(None) => {
            debug!("{peer}: connected to the outbound listener without a redirect; closing");
            return reset(client);
        }
        Err(e) => {
            warn!("{peer}: cannot read the redirect record: {e}; closing");
            return reset(client);
        }
    };
    let catalog = ctx.catalog.load();
    let Some(service) = catalog.service(record.original_dst) else {
        warn!(
            "{peer}: dialled {}, which is no longer a meshed service; closing",
            record.original_dst
        );
        return reset(client);
    };
    let Some(endpoint) = service.pick() else {
        warn!(
            "service {}: no endpoint to send {peer} to; closing",
            service.qualified_name()
        );
        return reset(client);
    };
    let upstream = match connect_marked(endpoint.addr, ctx.mark, ctx.connect_timeout).await {
        Ok(upstream) => upstream,
        Err(e) => {
            warn!(
                "service {}: endpoint {}: connect failed: {e}; resetting the client connection",
                service.qualified_name(),
                endpoint.addr
            );
            return reset(client);
        }
    };
    // Release the snapshot: a long connection must not pin an old catalog.
    drop(catalog);
    copy(client, upstream).await;
}

/// Copies both ways until both sides have closed; a FIN from one side is
/// passed on as a FIN (half-close), a reset as a reset.
async fn copy(mut client: TcpStream, mut upstream: TcpStream) {
    let _ = client.set_nodelay(true);
    match tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        COPY_BUFFER,
        COPY_BUFFER,
    )
    .await
    {
        Ok(_) => {}
        Err(e) => {
            debug!("copy ended with {e}");
            reset(client);
            reset(upstream);
        }
    }
}
