//! A new connection from the request path to an endpoint: dialled as
//! any connection (plain, a tunnel stream, or TLS of its own), then
//! spoken to in the service's HTTP.

use tokio::time::{Instant, timeout_at};

use super::call::Call;
use crate::{
    catalog::Endpoint,
    proxy::{
        tunnels::Carries,
        upstream::{DialError, Upstream, dial},
    },
    request::{Sender, pool::handshake},
};

/// Why no connection to an endpoint was made.
pub(super) enum NoConnection {
    /// The endpoint failed (counts against it).
    Endpoint(&'static str),
    /// Authorization at the endpoint's workload refused the caller.
    Denied,
    /// No plain path: the agent cannot carry requests there yet.
    NoPath,
    /// The request's deadline passed.
    TimedOut,
}

/// A new connection to `endpoint` that speaks the service's HTTP.
pub(super) async fn connect(
    call: &Call<'_>,
    endpoint: &Endpoint,
    http2: bool,
    deadline: Option<Instant>,
) -> Result<Sender, NoConnection> {
    let opening = async {
        let dialled = dial(
            call.ctx,
            call.service,
            endpoint,
            call.source,
            call.peer.ip(),
            Carries::Requests,
        );
        match Box::pin(dialled).await {
            Ok(upstream) => {
                let spoken = match upstream {
                    Upstream::Plain(tcp) => {
                        let _ = tcp.set_nodelay(true);
                        handshake(tcp, http2).await
                    }
                    // Another node's endpoint: a stream through the mTLS
                    // tunnel to its agent (which authorizes it), or a TLS
                    // connection of its own when tunnels are off. The
                    // stream does not move in an upgrade of the peer agent
                    // (`Carries::Requests`): the connection is retired from
                    // the pool when the tunnel connection goes away.
                    Upstream::Tunnel(stream, _) => {
                        let via = stream.connection().map(std::sync::Arc::new);
                        handshake(*stream, http2).await.map(|s| s.via(via))
                    }
                    Upstream::Tls(session) => handshake(*session, http2).await,
                };
                spoken.map_err(|_| NoConnection::Endpoint("the endpoint spoke no HTTP"))
            }
            Err(DialError::Caller(_)) => Err(NoConnection::NoPath),
            Err(DialError::Denied) => Err(NoConnection::Denied),
            Err(DialError::Endpoint(_)) => {
                Err(NoConnection::Endpoint("cannot connect to the endpoint"))
            }
        }
    };
    match deadline {
        Some(deadline) => timeout_at(deadline, opening)
            .await
            .unwrap_or(Err(NoConnection::TimedOut)),
        None => opening.await,
    }
}
