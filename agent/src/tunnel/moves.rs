//! Which streams of one tunnel connection a `pause` can reach, and the
//! task that speaks the connection's control stream (see `control`).
//!
//! Every stream opened or accepted on a connection is listed here under
//! its id until it is dropped. A `pause` from the peer takes the stream
//! off the list and hands the token to the stream's holder, which stops
//! its copy and answers ([`TunnelStream::quiesce`]). A `pause` of our own
//! goes out through the same task. A stream of a peer that opened no
//! control stream (ztunnel, an older agent) cannot be paused: it finishes
//! where it is.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use log::debug;
use tokio::sync::{Notify, mpsc, oneshot};

use super::control::{ControlStream, Message, Token};

/// The pausable streams of one tunnel connection.
#[derive(Debug, Default)]
pub struct Moves {
    streams: Mutex<HashMap<u32, oneshot::Sender<Token>>>,
    /// Our way to the control stream, once it is open (never, with a peer
    /// that does not speak moves).
    outgoing: OnceLock<mpsc::UnboundedSender<Message>>,
    /// The node the peer agent runs on, as its control stream named it
    /// (on the called end; the calling end knows whom it dialled).
    peer_node: OnceLock<String>,
    /// GOAWAY went out: the control stream ends with the last stream.
    going_away: AtomicBool,
    /// A stream left the list (for an ending connection to look again).
    left: Notify,
}

/// A listed stream's side of [`Moves`]: the peer's pause arrives on it,
/// and dropping it takes the stream off the list.
#[derive(Debug)]
pub(super) struct Listed {
    moves: Arc<Moves>,
    id: u32,
    pub(super) paused: Option<oneshot::Receiver<Token>>,
}

impl Listed {
    pub(super) fn moves(&self) -> &Moves {
        &self.moves
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.moves.unlist(self.id);
    }
}

// Nothing panics while holding the lock; a poisoned one still holds a
// consistent list.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Moves {
    pub(super) fn list(self: &Arc<Moves>, id: u32) -> Listed {
        let (pause, paused) = oneshot::channel();
        lock(&self.streams).insert(id, pause);
        Listed {
            moves: self.clone(),
            id,
            paused: Some(paused),
        }
    }

    fn unlist(&self, id: u32) {
        let mut streams = lock(&self.streams);
        if streams.remove(&id).is_some() && streams.is_empty() {
            self.left.notify_waiters();
        }
    }

    /// Whether the peer speaks moves (its control stream is open).
    pub fn speaks_moves(&self) -> bool {
        self.outgoing.get().is_some_and(|tx| !tx.is_closed())
    }

    /// The peer agent's node, as its control stream named it.
    pub fn peer_node(&self) -> Option<&str> {
        self.peer_node.get().map(String::as_str)
    }

    /// Sends `message` to the peer; false when no control stream carries it.
    pub fn send(&self, message: Message) -> bool {
        self.outgoing
            .get()
            .is_some_and(|tx| tx.send(message).is_ok())
    }

    /// The peer asked to pause `stream`: its holder hears the token. A
    /// stream that ended meanwhile has nobody to hear it.
    fn paused(&self, stream: u32, token: Token) {
        let pause = lock(&self.streams).remove(&stream);
        match pause {
            Some(pause) => {
                let _ = pause.send(token);
            }
            None => debug!("tunnel control: pause of stream {stream}, which is not open"),
        }
    }

    /// GOAWAY went out: once the last stream is gone, the control stream
    /// ends too, so the connection can close.
    pub(super) fn go_away(&self) {
        self.going_away.store(true, Ordering::Release);
        self.left.notify_waiters();
    }

    /// Resolves once GOAWAY went out and no stream is left.
    async fn drained(&self) {
        loop {
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            if self.going_away.load(Ordering::Acquire) && lock(&self.streams).is_empty() {
                return;
            }
            left.await;
        }
    }

    /// Takes `control` as the connection's control stream (at once: its
    /// streams can be paused from here on), and returns the task that
    /// speaks it until the peer closes it, it breaks, or `stop` resolves
    /// (on the calling end: the pool let the connection go; on the called
    /// end: GOAWAY went out and the last stream ended). A second control
    /// stream is ignored.
    pub(super) fn start(
        self: Arc<Moves>,
        control: ControlStream,
        peer_node: Option<String>,
        stop: impl Future<Output = ()>,
    ) -> impl Future<Output = ()> {
        let (tx, outgoing) = mpsc::unbounded_channel();
        let first = self.outgoing.set(tx).is_ok();
        if first && let Some(node) = peer_node {
            let _ = self.peer_node.set(node);
        }
        async move {
            if first {
                self.run(control, outgoing, stop).await;
            } else {
                debug!("tunnel control: a second control stream on one connection; ignored");
            }
        }
    }

    async fn run(
        &self,
        mut control: ControlStream,
        mut outgoing: mpsc::UnboundedReceiver<Message>,
        stop: impl Future<Output = ()>,
    ) {
        let drained = self.drained();
        tokio::pin!(stop, drained);
        loop {
            // Both reads are cancel-safe: a control line is taken whole or
            // stays in the stream's buffer.
            tokio::select! {
                biased;
                () = &mut stop => break,
                () = &mut drained => break,
                message = outgoing.recv() => {
                    let Some(message) = message else { break };
                    if let Err(e) = control.send(message).await {
                        debug!("tunnel control: cannot send: {e}");
                        break;
                    }
                }
                message = control.next() => match message {
                    Ok(Some(Message::Pause { stream, token })) => self.paused(stream, token),
                    Ok(None) => break,
                    Err(e) => {
                        debug!("tunnel control: {e}");
                        break;
                    }
                },
            }
        }
        // Closed: later moves are refused at once, and the streams finish
        // where they are.
        outgoing.close();
    }
}
