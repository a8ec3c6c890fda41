//! The pause of a stream for a move (see `control`): both ends stop
//! where every byte either sent was read by the other.

use std::{future::poll_fn, io, sync::atomic::Ordering, time::Duration};

use tokio::sync::oneshot;

use super::{PAUSE_TIMEOUT, TunnelStream};
use crate::tunnel::{
    control::{Message, Token},
    io_error,
};

impl TunnelStream {
    /// Pauses the stream from this end, for a move: asks the peer on the
    /// control stream, then quiesces as the asking end. Returns the token
    /// the peer keeps its side under, and the bytes read meanwhile. When
    /// the peer pauses the stream at the same moment (both agents leave at
    /// once), the calling end's pause stands: the called end answers it
    /// instead, and its side is to be kept, under the peer's token, for
    /// the peer's successor ([`Paused::park`]). A peer that does not end
    /// its side within [`PAUSE_TIMEOUT`] (hung) fails the pause, and the
    /// stream is reset.
    pub async fn pause(&mut self) -> io::Result<Paused> {
        self.pause_within(PAUSE_TIMEOUT).await
    }

    pub(in crate::tunnel) async fn pause_within(&mut self, within: Duration) -> io::Result<Paused> {
        let token = Token::random();
        let stream = self.id();
        let asked = self
            .listed
            .as_ref()
            .is_some_and(|l| l.moves().send(Message::Pause { stream, token }));
        if !asked {
            return Err(io::Error::other(
                "the peer agent's control stream is not open: the stream cannot pause",
            ));
        }
        // Where the peer's own pause would arrive; the calling end does
        // not listen: its pause stands.
        let theirs = match self.calling {
            true => None,
            false => self.listed.as_mut().and_then(|l| l.paused.take()),
        };
        match tokio::time::timeout(within, self.ask_or_yield(token, theirs)).await {
            Ok(paused) => paused,
            Err(_) => {
                self.reset.store(true, Ordering::Relaxed);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the peer agent did not end its side of a paused stream within {within:?}"
                    ),
                ))
            }
        }
    }

    /// Quiesces as the asking end; or, when the peer's pause comes on
    /// `theirs` first, as the answering end, our side then to be kept
    /// under the peer's token.
    async fn ask_or_yield(
        &mut self,
        token: Token,
        theirs: Option<oneshot::Receiver<Token>>,
    ) -> io::Result<Paused> {
        let Some(mut theirs) = theirs else {
            let read = self.quiesce(Quiesce::Asking).await?;
            return Ok(Paused {
                token,
                read,
                park: false,
            });
        };
        let mut read = Vec::new();
        let peer = {
            let reading = self.read_to_end_within(&mut read);
            tokio::pin!(reading);
            tokio::select! {
                done = &mut reading => {
                    done?;
                    None
                }
                Ok(peer) = &mut theirs => Some(peer),
            }
        };
        use tokio::io::AsyncWriteExt;
        match peer {
            None => {
                self.shutdown().await?;
                Ok(Paused {
                    token,
                    read,
                    park: false,
                })
            }
            Some(peer) => {
                self.shutdown().await?;
                self.read_to_end_within(&mut read).await?;
                Ok(Paused {
                    token: peer,
                    read,
                    park: true,
                })
            }
        }
    }

    /// Stops the stream where both ends hold every byte the other sent,
    /// for a move (see `control`): END_STREAM and a read to the peer's
    /// END_STREAM, in `order`. Returns the bytes read meanwhile: no more
    /// than the stream's window, as none of it is given back.
    pub async fn quiesce(&mut self, order: Quiesce) -> io::Result<Vec<u8>> {
        use tokio::io::AsyncWriteExt;
        let mut rest = Vec::new();
        match order {
            Quiesce::Answering => {
                self.shutdown().await?;
                self.read_to_end_within(&mut rest).await?;
            }
            Quiesce::Asking => {
                self.read_to_end_within(&mut rest).await?;
                self.shutdown().await?;
            }
        }
        Ok(rest)
    }

    /// Reads to the peer's END_STREAM without giving window back, so the
    /// peer (whose copy may act on the pause late, still sending) can send
    /// no more than the window; HTTP/2 fails a peer that sends past it.
    /// The stream's end gives the window back to the connection. That
    /// bound (the stream window this end granted) is checked here too.
    async fn read_to_end_within(&mut self, rest: &mut Vec<u8>) -> io::Result<()> {
        rest.extend_from_slice(&std::mem::take(&mut self.unread));
        while let Some(chunk) = poll_fn(|cx| self.recv.poll_data(cx)).await {
            let chunk = chunk.map_err(io_error)?;
            if rest.len() + chunk.len() > self.window as usize {
                return Err(io::Error::other(format!(
                    "the peer sent over {} bytes (the stream window) on a paused stream",
                    self.window
                )));
            }
            rest.extend_from_slice(&chunk);
        }
        Ok(())
    }
}

/// What a pause from this end came to ([`TunnelStream::pause`]).
#[derive(Debug)]
pub struct Paused {
    /// The token the connection's two sides meet again under: ours (the
    /// peer keeps its side), or with `park` the peer's.
    pub token: Token,
    /// What the stream brought after the copy stopped.
    pub read: Vec<u8>,
    /// Both ends paused at once and the peer's pause stood: this side is
    /// to be kept, under the peer's token, for the peer's successor.
    pub park: bool,
}

/// Which end of a pause a [`TunnelStream::quiesce`] is. The asking end
/// sent `pause` and ends only after the answering end did: so the peer
/// never sees its END_STREAM before the pause, which would read as the
/// application's half-close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiesce {
    /// Got `pause`: END_STREAM at once, then read to the asker's.
    Answering,
    /// Sent `pause`: read to the answerer's END_STREAM, then send one.
    Asking,
}
