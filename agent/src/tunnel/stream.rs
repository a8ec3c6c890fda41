//! One application connection inside a tunnel: an HTTP/2 CONNECT stream
//! read and written as a byte stream, with TCP's semantics carried over:
//! a shutdown is END_STREAM (a half-close; the other direction goes on),
//! a reset is RST_STREAM with CONNECT_ERROR (RFC 9113 section 8.5), and a
//! reset from the peer reads and writes as `ConnectionReset`.
//!
//! Flow control is end to end: window is given back to the peer only for
//! bytes a reader has taken, and a write takes only the window the peer
//! has granted, so a slow reader on either side slows its writer instead
//! of filling memory.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::oneshot,
};

use super::{
    control::Token,
    io_error,
    moves::{Listed, Moves},
    pool::Slot,
};
use crate::{
    buffers,
    carry::copy::{Duplex, ReadSide},
};

mod pause;

pub use pause::{Paused, Quiesce};

/// How long the asking end of a pause waits for the peer's end of it.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A CONNECT stream, either end. Dropping it before both directions have
/// ended cancels the stream (RST_STREAM CANCEL), or resets it with
/// CONNECT_ERROR after [`Duplex::reset_on_close`].
pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read; its window goes back as it is read.
    unread: Bytes,
    /// END_STREAM was sent.
    finished: bool,
    /// Drop resets with CONNECT_ERROR (the peer resets its TCP side).
    reset: AtomicBool,
    /// This end opened the stream (the CONNECT's caller): when both ends
    /// pause it at once, its pause stands.
    calling: bool,
    /// The stream's place in its pool connection, given back on drop.
    slot: Option<Slot>,
    /// Its place among the connection's pausable streams (see `moves`).
    listed: Option<Listed>,
    /// The window this end grants the peer on each stream of the
    /// connection (SETTINGS_INITIAL_WINDOW_SIZE): all a stopped peer can
    /// have in flight, so the most a paused stream reads after its copy
    /// stopped. (A u32 beside the flags: the stream's size stays 120
    /// bytes, part of every tunnelled connection's idle cost.)
    window: u32,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("id", &self.id())
            .field("unread", &self.unread.len())
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl TunnelStream {
    pub(super) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        calling: bool,
        window: u32,
    ) -> TunnelStream {
        TunnelStream {
            send,
            recv,
            unread: Bytes::new(),
            finished: false,
            reset: AtomicBool::new(false),
            calling,
            slot: None,
            listed: None,
            window,
        }
    }

    /// Lists the stream among its connection's pausable ones.
    pub(super) fn with_moves(mut self, moves: &Arc<Moves>) -> TunnelStream {
        self.listed = Some(moves.list(self.id()));
        self
    }

    pub(super) fn with_slot(mut self, slot: Slot) -> TunnelStream {
        self.slot = Some(slot);
        self
    }

    /// The pool connection the stream rides (None on the called end), to
    /// ask later whether it still takes new streams.
    pub fn connection(&self) -> Option<super::TunnelClient> {
        self.slot.as_ref().map(Slot::client)
    }

    /// The HTTP/2 stream id (for logs).
    pub fn id(&self) -> u32 {
        self.send.stream_id().as_u32()
    }

    /// Where the peer's `pause` of this stream arrives (once: the first
    /// call takes it). None for a stream of a connection without moves.
    pub fn take_pause(&mut self) -> Option<oneshot::Receiver<Token>> {
        self.listed.as_mut()?.paused.take()
    }

    /// Gives back where the peer's pause arrives (taken with
    /// [`TunnelStream::take_pause`]), for [`TunnelStream::pause`] to hear
    /// a pause of the peer's that comes as this end pauses too.
    pub fn give_back_pause(&mut self, paused: oneshot::Receiver<Token>) {
        if let Some(listed) = self.listed.as_mut() {
            listed.paused = Some(paused);
        }
    }

    /// Whether this stream can be paused from this end now: the peer
    /// speaks moves, and its control stream is open.
    pub fn can_pause(&self) -> bool {
        self.listed
            .as_ref()
            .is_some_and(|l| l.moves().speaks_moves())
    }

    /// The peer agent's node, as its control stream named it (on the
    /// called end).
    pub fn peer_node(&self) -> Option<String> {
        let listed = self.listed.as_ref()?;
        listed.moves().peer_node().map(str::to_owned)
    }

    /// The reading and the writing half, usable at once.
    pub fn split(&mut self) -> (TunnelReadHalf<'_>, TunnelWriteHalf<'_>) {
        let TunnelStream {
            send,
            recv,
            unread,
            finished,
            ..
        } = self;
        (
            TunnelReadHalf { recv, unread },
            TunnelWriteHalf { send, finished },
        )
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Relaxed) {
            self.send.send_reset(Reason::CONNECT_ERROR);
        }
    }
}

/// The reading half of a [`TunnelStream`].
pub struct TunnelReadHalf<'a> {
    recv: &'a mut RecvStream,
    unread: &'a mut Bytes,
}

/// The writing half of a [`TunnelStream`].
pub struct TunnelWriteHalf<'a> {
    send: &'a mut SendStream<Bytes>,
    finished: &'a mut bool,
}

impl TunnelReadHalf<'_> {
    /// Waits until bytes are unread, or the peer's END_STREAM came (then
    /// none are: EOF).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                // An empty DATA frame carries no bytes; look again.
                Some(Ok(chunk)) => *self.unread = chunk,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => break,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Copies up to `out.len()` unread bytes into `out` and gives their
    /// window back to the peer.
    fn take(&mut self, out: &mut [u8]) -> usize {
        let n = self.unread.len().min(out.len());
        out[..n].copy_from_slice(&self.unread[..n]);
        self.unread.advance(n);
        if self.unread.is_empty() {
            // An empty slice still holds the whole buffer HTTP/2 read the
            // frame into (shared with other frames): let it go, or every
            // quiet stream keeps kilobytes alive.
            *self.unread = Bytes::new();
        }
        // Fails only once the stream is reset, which the next read tells.
        let _ = self.recv.flow_control().release_capacity(n);
        n
    }
}

impl ReadSide for TunnelReadHalf<'_> {
    // HTTP/2 holds received bytes itself: the copy holds no buffer of its
    // own while the stream is quiet.
    const RELEASE_WHEN_DRAINED: bool = true;

    async fn read_some(&mut self, buf: &mut Vec<u8>, size: usize) -> io::Result<usize> {
        poll_fn(|cx| {
            let filled = self.poll_fill(cx);
            if filled.is_pending() {
                // The copy keeps its buffer after a full read; a quiet
                // stream must not hold it while nothing comes.
                buffers::give_back(buf);
            }
            filled
        })
        .await?;
        if self.unread.is_empty() {
            return Ok(0);
        }
        if buf.is_empty() {
            *buf = buffers::take(size.max(1));
        }
        Ok(self.take(buf))
    }
}

impl AsyncRead for TunnelReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_fill(cx))?;
        let n = this.unread.len().min(buf.remaining());
        let taken = this.take(buf.initialize_unfilled_to(n));
        buf.advance(taken);
        Poll::Ready(Ok(()))
    }
}

impl TunnelWriteHalf<'_> {
    /// Why the stream takes no more bytes: the peer's reset, or our own
    /// end.
    fn ended(&mut self, cx: &mut Context<'_>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("the peer reset the tunnel stream ({reason})"),
            ),
            Poll::Ready(Err(e)) => io_error(e),
            Poll::Pending => io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the tunnel stream's end",
            ),
        }
    }
}

impl AsyncWrite for TunnelWriteHalf<'_> {
    /// Takes as many bytes as the peer's window (and the stream's send
    /// buffer) has room for, waiting while there is none.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if *this.finished {
            return Poll::Ready(Err(this.ended(cx)));
        }
        let mut room = this.send.capacity();
        if room == 0 {
            this.send.reserve_capacity(buf.len());
            room = match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(room)) => room,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(this.ended(cx))),
            };
        }
        let n = room.min(buf.len());
        match this
            .send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
        {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(this.ended(cx))),
        }
    }

    /// HTTP/2 writes queued frames itself; nothing is held here.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends END_STREAM: a half-close, reading goes on.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if *this.finished {
            return Poll::Ready(Ok(()));
        }
        // Whatever the peer still grants is given back: nothing more comes.
        this.send.reserve_capacity(0);
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => {
                *this.finished = true;
                Poll::Ready(Ok(()))
            }
            Err(_) => Poll::Ready(Err(this.ended(cx))),
        }
    }
}

impl Duplex for TunnelStream {
    fn halves(&mut self) -> (impl ReadSide + '_, impl AsyncWrite + Unpin + Send + '_) {
        self.split()
    }

    fn reset_on_close(&self) {
        self.reset.store(true, Ordering::Relaxed);
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (mut read, _) = self.get_mut().split();
        Pin::new(&mut read).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let (_, mut write) = self.get_mut().split();
        Pin::new(&mut write).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (_, mut write) = self.get_mut().split();
        Pin::new(&mut write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (_, mut write) = self.get_mut().split();
        Pin::new(&mut write).poll_shutdown(cx)
    }
}
