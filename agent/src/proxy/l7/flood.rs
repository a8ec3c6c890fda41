//! A guard on an HTTP/2 client's bytes: it reads the frame headers as they
//! pass and ends the connection when the client sends PINGs or SETTINGS
//! faster than any client needs (each asks the agent for an answer, and
//! h2 answers every one). Resets of streams (rapid reset) and header
//! blocks over the limit are h2's to refuse; this adds the control-frame
//! floods it lets through.

use std::{
    io,
    ops::ControlFlow,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{
    h2frames::{ACK, Frames, PING, SETTINGS, Seen},
    resilience::RateLimiter,
};

/// What a client may send: this many PING and SETTINGS frames at once,
/// then this many a second.
const CONTROL_BURST: u32 = 1_000;
const CONTROL_PER_SECOND: u32 = 100;

/// The client connection preface, before the first frame.
const PREFACE_LEN: usize = 24;

/// Why the guard ended a connection: the I/O error h2 sees (which keeps
/// only its message, so the guard also raises [`FloodGuard::tripped`]).
#[derive(Debug, thiserror::Error)]
#[error("HTTP/2 control frames (PING, SETTINGS) beyond {CONTROL_PER_SECOND} a second")]
pub(super) struct Flooded;

pub(super) struct FloodGuard<T> {
    io: T,
    frames: Frames,
    control: RateLimiter,
    /// Raised when the guard ends the connection.
    tripped: Arc<AtomicBool>,
}

impl<T> FloodGuard<T> {
    pub(super) fn new(io: T) -> FloodGuard<T> {
        FloodGuard {
            io,
            frames: Frames::after(PREFACE_LEN),
            control: RateLimiter::new(CONTROL_PER_SECOND, CONTROL_BURST, false),
            tripped: Arc::default(),
        }
    }

    /// Whether the guard ended the connection, readable after the guard
    /// went into the HTTP/2 server.
    pub(super) fn tripped(&self) -> Arc<AtomicBool> {
        self.tripped.clone()
    }

    /// Follows the frames through `bytes`; false once a flood is seen.
    fn watch(&mut self, bytes: &[u8]) -> bool {
        let control = &mut self.control;
        let walked = self.frames.walk(bytes, |seen| match seen {
            Seen::Header(h)
                if matches!(h.kind, PING | SETTINGS)
                    && h.flags & ACK == 0
                    && control.admit(None).is_err() =>
            {
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        });
        walked.is_continue()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FloodGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let added = ready!(crate::poll_read_added(&mut this.io, cx, buf))?;
        if !this.watch(added) {
            this.tripped.store(true, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, Flooded)));
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(impl[T: AsyncWrite + Unpin] FloodGuard<T>);

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame header: `len` payload bytes of `kind` with `flags`.
    fn frame(kind: u8, flags: u8, len: usize) -> Vec<u8> {
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        f.resize(9 + len, 0);
        f
    }

    #[test]
    fn frames_are_followed_across_reads_and_a_ping_flood_is_seen() {
        let mut guard = FloodGuard::new(());
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // DATA with a payload that looks like PING headers: not counted.
        bytes.extend(frame(0x0, 0, 9 * 2_000));
        assert!(guard.watch(&bytes));
        let pings: Vec<u8> = (0..CONTROL_BURST).flat_map(|_| frame(PING, 0, 8)).collect();
        // Split at odd places: the headers straddle reads.
        for chunk in pings.chunks(7) {
            assert!(guard.watch(chunk));
        }
        // ACKs are answers, not asks.
        assert!(guard.watch(&frame(PING, ACK, 8)));
        assert!(!guard.watch(&frame(PING, 0, 8)), "one over the burst");
    }
}
