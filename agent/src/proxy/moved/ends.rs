//! The ends of a proxied connection as it leaves for the next agent.

use std::io;

use tokio::{net::TcpStream, sync::oneshot};

use crate::{
    carry::copy::Duplex,
    tls::session::{SessionState, TlsSession},
    tunnel::{Quiesce, TunnelStream, control::Token},
};

/// One end of a proxied connection, as it leaves for the next agent: its
/// socket, and its TLS session's state if it has one; or, for a tunnel
/// stream, the token its peer keeps the connection under.
pub trait Movable: Duplex + Sized {
    fn into_moving(self) -> impl Future<Output = io::Result<Leaving>>;

    /// Whether this end can leave now (a tunnel stream: when its peer
    /// agent speaks moves).
    fn can_move(&self) -> bool {
        true
    }

    /// Whether it is a tunnel stream (it leaves by a pause, and needs its
    /// connection's parties for that).
    fn is_tunnel(&self) -> bool {
        false
    }

    /// Where the peer agent's pause of this end arrives (a tunnel
    /// stream's; a socket has none).
    fn take_pause(&mut self) -> Option<oneshot::Receiver<Token>> {
        None
    }

    /// Gives back what [`Movable::take_pause`] took, as the end leaves.
    fn give_back_pause(&mut self, _paused: oneshot::Receiver<Token>) {}

    /// The peer agent's node, as its control stream named it (a tunnel
    /// stream's called end).
    fn peer_node(&self) -> Option<String> {
        None
    }

    /// Answers the peer agent's pause of this end; the bytes read
    /// meanwhile (a socket has nothing to answer).
    fn answer_pause(&mut self) -> impl Future<Output = io::Result<Vec<u8>>> {
        std::future::ready(Ok(Vec::new()))
    }

    /// Goes on over `stream`, the peer's successor's, in place of the
    /// paused stream; a socket gives it back.
    fn take_up(&mut self, stream: TunnelStream) -> Result<(), TunnelStream> {
        Err(stream)
    }
}

/// An end as it leaves.
#[expect(
    clippy::large_enum_variant,
    reason = "one per end of a connection, once, at a handover"
)]
pub enum Leaving {
    Socket(TcpStream, Option<SessionState>),
    /// A paused tunnel stream: its peer keeps the connection under
    /// `token`; `read` came from it after the copy stopped. With `park`,
    /// the other way round: the peer agent left at the same moment, and
    /// this side is to be kept under the peer's `token` for its
    /// successor.
    Tunnel {
        token: Token,
        read: Vec<u8>,
        peer_node: Option<String>,
        park: bool,
    },
}

impl Movable for TcpStream {
    async fn into_moving(self) -> io::Result<Leaving> {
        Ok(Leaving::Socket(self, None))
    }
}

impl Movable for TlsSession {
    async fn into_moving(self) -> io::Result<Leaving> {
        // Writes what was sealed and not yet written: no record is left
        // half sent.
        let (tcp, state) = self.suspend().await?;
        Ok(Leaving::Socket(tcp, Some(state)))
    }
}

impl Movable for TunnelStream {
    async fn into_moving(mut self) -> io::Result<Leaving> {
        let peer_node = TunnelStream::peer_node(&self);
        let paused = self.pause().await?;
        Ok(Leaving::Tunnel {
            token: paused.token,
            read: paused.read,
            peer_node,
            park: paused.park,
        })
    }

    fn can_move(&self) -> bool {
        self.can_pause()
    }

    fn is_tunnel(&self) -> bool {
        true
    }

    fn take_pause(&mut self) -> Option<oneshot::Receiver<Token>> {
        TunnelStream::take_pause(self)
    }

    fn give_back_pause(&mut self, paused: oneshot::Receiver<Token>) {
        TunnelStream::give_back_pause(self, paused);
    }

    fn peer_node(&self) -> Option<String> {
        TunnelStream::peer_node(self)
    }

    fn answer_pause(&mut self) -> impl Future<Output = io::Result<Vec<u8>>> {
        self.quiesce(Quiesce::Answering)
    }

    fn take_up(&mut self, stream: TunnelStream) -> Result<(), TunnelStream> {
        // The paused stream has ended both ways: it goes quietly.
        *self = stream;
        Ok(())
    }
}
