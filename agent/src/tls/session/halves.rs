//! The two halves of a session, borrowed so that both directions run at
//! once (the copy loop reads one way while it writes the other), and the
//! socket I/O that moves records between them and the TCP stream.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    sync::atomic::{AtomicBool, Ordering},
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::tcp,
};

use super::{
    SessionError,
    record::{Rx, Tx},
};
use crate::buffers;

/// The reading half: decrypts records as the reader asks for bytes.
///
/// Reads are cancel-safe: a read dropped while it waits loses nothing
/// (received bytes stay in the session), so a copy loop may be stopped at a
/// read, for instance to suspend the session.
pub struct TlsReadHalf<'a> {
    pub(super) tcp: tcp::ReadHalf<'a>,
    pub(super) rx: &'a mut Rx,
    /// Set when the peer asks for a KeyUpdate; the writing half answers.
    pub(super) answer: &'a AtomicBool,
}

impl TlsReadHalf<'_> {
    /// Waits until decrypted bytes are ready, or the peer's close_notify
    /// came (then [`Rx::plaintext`] is empty: EOF).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let rx = &mut *self.rx;
            if !rx.plaintext().is_empty() || rx.closed {
                return Poll::Ready(Ok(()));
            }
            if rx.open_next(self.answer)? {
                continue;
            }
            // A whole record is still missing: read. No buffer is held
            // while waiting for the socket.
            ready!(self.tcp.as_ref().poll_read_ready(cx))?;
            rx.make_room();
            match self.tcp.as_ref().try_read_buf(&mut rx.buf) {
                Ok(0) => return Poll::Ready(Err(SessionError::Truncated.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => rx.release_if_empty(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Reads what is available into `buf` (resized to `size` if empty):
    /// the shape of the copy loop's `ReadSide::read_some`, with buffers
    /// released as `RELEASE_WHEN_DRAINED = true` expects (nothing is held
    /// while waiting). 0 is EOF: the peer's close_notify.
    pub async fn read_some(&mut self, buf: &mut Vec<u8>, size: usize) -> io::Result<usize> {
        poll_fn(|cx| {
            let filled = self.poll_fill(cx);
            if filled.is_pending() {
                // The copy keeps its buffer after a full read; an idle
                // connection must not hold it while nothing comes.
                buffers::give_back(buf);
            }
            filled
        })
        .await?;
        let plain = self.rx.plaintext();
        if plain.is_empty() {
            return Ok(0);
        }
        if buf.is_empty() {
            *buf = buffers::take(size.max(1));
        }
        let n = plain.len().min(buf.len());
        buf[..n].copy_from_slice(&plain[..n]);
        self.rx.consume(n);
        Ok(n)
    }
}

impl AsyncRead for TlsReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_fill(cx))?;
        let plain = this.rx.plaintext();
        let n = plain.len().min(buf.remaining());
        buf.put_slice(&plain[..n]);
        this.rx.consume(n);
        Poll::Ready(Ok(()))
    }
}

/// The writing half: seals what it is given into records of at most
/// 16 KiB, renewing its keys when the peer asks or the suite's limit nears.
///
/// Like tokio-rustls, `poll_write` takes bytes once they are sealed and
/// writes what the socket accepts; a record the socket could not take
/// whole is finished by the next write, flush or shutdown. So a caller that
/// then waits on something else must flush first.
pub struct TlsWriteHalf<'a> {
    pub(super) tcp: tcp::WriteHalf<'a>,
    pub(super) tx: &'a mut Tx,
    pub(super) answer: &'a AtomicBool,
}

impl TlsWriteHalf<'_> {
    /// Writes the sealed bytes not yet written.
    pub(super) fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.tx.unwritten().is_empty() {
            ready!(self.tcp.as_ref().poll_write_ready(cx))?;
            match self.tcp.as_ref().try_write(self.tx.unwritten()) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.tx.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsWriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if this.tx.closed {
            return Poll::Ready(Err(SessionError::WriteAfterClose.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let answer = this.answer.swap(false, Ordering::Relaxed);
        let n = this.tx.push_data(buf, answer);
        // The bytes are taken; whatever the socket does not accept now
        // goes first at the next call.
        match this.poll_drain(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(n)),
        }
    }

    /// All the parts in one record (up to a record's worth): an HTTP/2
    /// frame's header and payload cost one record and one write, not two.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        parts: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if this.tx.closed {
            return Poll::Ready(Err(SessionError::WriteAfterClose.into()));
        }
        if parts.iter().all(|p| p.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        let answer = this.answer.swap(false, Ordering::Relaxed);
        let n = this.tx.push_data_vectored(parts, answer);
        match this.poll_drain(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(n)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_drain(cx)
    }

    /// Sends close_notify, then a FIN: a half-close, the reading half
    /// goes on until the peer closes too.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if !this.tx.closed {
            this.tx.push_close_notify();
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
