//! Where a connection is accepted: one loop every listener of the agent
//! runs (the outbound and capture listeners, the inbound mTLS port, the
//! admin API), which stops with the drain, and the bounds on what peers may
//! hold on the inbound port before they have proved who they are.

pub mod limits;

use std::time::Duration;

use log::warn;
use tokio::net::{TcpListener, TcpStream};

use crate::drain::{ConnectionGuard, DrainWatch};

/// Accepts on `listener` until the drain starts, handing each connection
/// to `on_accept` with a guard that counts it until dropped. Accept errors
/// (EMFILE and friends) are logged and followed by a short pause instead of
/// a spin. Every listener of the agent runs this loop.
pub async fn accept_until_drained(
    listener: &TcpListener,
    drain: &mut DrainWatch,
    name: &str,
    mut on_accept: impl FnMut(TcpStream, std::net::SocketAddr, ConnectionGuard),
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = drain.draining() => {
                if drain.is_refusing() {
                    stop_listening(listener, name);
                }
                return;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => on_accept(stream, peer, drain.track()),
            Err(e) => {
                warn!("{name} listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Stops a listening socket for every descriptor of it at once (the
/// handover offer holds another): closing ours would leave it listening.
fn stop_listening(listener: &TcpListener, name: &str) {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown on a valid descriptor; on a listening TCP socket
    // SHUT_RD makes the kernel stop listening (inet_shutdown).
    if unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RD) } != 0 {
        warn!(
            "{name} listener: cannot stop listening: {}",
            std::io::Error::last_os_error()
        );
    }
}
