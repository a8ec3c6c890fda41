//! The byte stream under an HTTP/2 connection, written in batches.
//!
//! h2 writes a frame's header and a large payload as two writes, and with
//! a writer that says it takes vectored writes it flushes after every
//! payload above 256 bytes. Over TLS each write is a record and each flush
//! a `sendto`: 64 streams answering at once cost 64 records, 64 syscalls
//! and 64 TCP segments on both agents. [`Coalesce`] tells h2 it has no
//! vectored writes (so h2 copies payloads up to 1 KiB into its own buffer
//! and writes many frames at once), and gathers what h2 writes until h2
//! flushes or a record's worth is waiting, so one flush is one record and
//! one syscall.
//!
//! h2 flushes each time its connection task runs, and each stream's write
//! wakes that task: on a busy node that is a flush per frame. So a flush
//! first yields once, letting the tasks already woken (other streams with
//! bytes to send) run and add their frames; the next poll writes them all.
//! It waits on no I/O: only on tasks that would have run before the
//! runtime next looks at its sockets anyway. (Measured on the bench's
//! keep-alive workload: 60-63k to 66-69k requests/s.)

use std::{
    io,
    ops::ControlFlow,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::Notify,
};

use crate::h2frames::{Frames, Header, RST_STREAM, Seen};

/// The most held back: a whole TLS record's plaintext.
pub(super) const BATCH: usize = 16 * 1024;

/// A writer that holds writes back until a flush or a full batch.
pub struct Coalesce<T> {
    inner: T,
    /// Written by h2, not yet passed on; empty (no allocation) between
    /// flushes, so a quiet connection holds nothing here.
    held: Vec<u8>,
    /// How much of `held` the inner writer has taken.
    passed: usize,
    /// Whether this flush already let the tasks woken before it run.
    yielded: bool,
    /// On a server: the frames written, watched for streams h2 refused.
    watch: Option<(FrameScan, Arc<RefusedStreams>)>,
}

/// Streams the HTTP/2 library refused by itself (RST_STREAM with
/// REFUSED_STREAM: a peer over our SETTINGS_MAX_CONCURRENT_STREAMS). h2
/// never hands them on, so they are counted from the frames it writes.
#[derive(Debug, Default)]
pub struct RefusedStreams {
    count: AtomicU64,
    seen: Notify,
}

impl RefusedStreams {
    /// How many were refused since the last call.
    pub fn take(&self) -> u64 {
        self.count.swap(0, Ordering::Relaxed)
    }

    /// Resolves once one was refused (at once if one was since the last
    /// wait).
    pub async fn refused(&self) {
        self.seen.notified().await;
    }
}

/// The RST_STREAM(REFUSED_STREAM) frames in a stream of HTTP/2 frames as
/// written, however the writes cut it.
#[derive(Debug, Default)]
struct FrameScan {
    frames: Frames,
    /// A RST_STREAM's error code, and how much of it is in.
    code: [u8; 4],
    have: usize,
}

const REFUSED_STREAM: u32 = 0x7;

impl FrameScan {
    /// The RST_STREAM(REFUSED_STREAM) frames that `bytes` completes.
    fn refusals_in(&mut self, bytes: &[u8]) -> u64 {
        let mut refused = 0;
        let (code, have) = (&mut self.code, &mut self.have);
        let reset = |h: Header| h.kind == RST_STREAM && h.len == 4;
        let _ = self.frames.walk(bytes, |seen| {
            match seen {
                Seen::Payload(h, part) if reset(h) => {
                    code[*have..*have + part.len()].copy_from_slice(part);
                    *have += part.len();
                }
                Seen::End(h) if reset(h) => {
                    refused += u64::from(u32::from_be_bytes(*code) == REFUSED_STREAM);
                    *have = 0;
                }
                _ => {}
            }
            ControlFlow::Continue(())
        });
        refused
    }
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Coalesce<T> {
        Coalesce {
            inner,
            held: Vec::new(),
            passed: 0,
            yielded: false,
            watch: None,
        }
    }

    /// A server's writer: it also counts the streams h2 refuses.
    pub fn watching(inner: T, refused: Arc<RefusedStreams>) -> Coalesce<T> {
        Coalesce {
            watch: Some((FrameScan::default(), refused)),
            ..Coalesce::new(inner)
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Passes everything held on to the inner writer (not flushing it).
    fn poll_pass_on(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.passed < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.passed..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.passed += n;
        }
        self.held = Vec::new();
        self.passed = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.held.len() >= BATCH {
            ready!(this.poll_pass_on(cx))?;
        }
        if this.held.is_empty() {
            this.held.reserve_exact(BATCH);
        }
        let n = buf.len().min(BATCH - this.held.len());
        this.held.extend_from_slice(&buf[..n]);
        if let Some((scan, refused)) = &mut this.watch {
            let seen = scan.refusals_in(&buf[..n]);
            if seen > 0 {
                refused.count.fetch_add(seen, Ordering::Relaxed);
                refused.seen.notify_one();
            }
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.yielded && !this.held.is_empty() && this.held.len() < BATCH {
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.yielded = false;
        ready!(this.poll_pass_on(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pass_on(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }

    // Not vectored, on purpose: see the module's comment.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Records each write it is given.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_go_on_as_one_at_a_flush_or_a_full_batch() {
        let writes = Writes::default();
        let mut w = Coalesce::new(writes.clone());
        for frame in [&b"header"[..], b"payload", b"next"] {
            w.write_all(frame).await.unwrap();
        }
        assert!(writes.0.lock().unwrap().is_empty(), "held until a flush");
        // The flush yields once (woken at once), then writes.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut w).poll_flush(&mut cx).is_pending());
        assert!(writes.0.lock().unwrap().is_empty(), "not before the yield");
        w.flush().await.unwrap();
        assert_eq!(
            *writes.0.lock().unwrap(),
            vec![b"headerpayloadnext".to_vec()]
        );
        assert_eq!(w.held.capacity(), 0, "nothing held between flushes");

        // More than a batch: whole batches go on as they fill.
        let big = vec![7u8; BATCH * 2 + 10];
        w.write_all(&big).await.unwrap();
        w.shutdown().await.unwrap();
        let sizes: Vec<usize> = writes.0.lock().unwrap()[1..].iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![BATCH, BATCH, 10]);
    }

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, 0]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    #[test]
    fn refused_streams_are_seen_however_the_writes_cut_the_frames() {
        let code = |c: u32| c.to_be_bytes().to_vec();
        let mut frames = Vec::new();
        frames.extend(frame(0x4, 0, &[0; 6])); // SETTINGS
        frames.extend(frame(RST_STREAM, 101, &code(REFUSED_STREAM)));
        frames.extend(frame(0x0, 3, &[RST_STREAM; 40])); // DATA that looks like one
        frames.extend(frame(RST_STREAM, 5, &code(0x8))); // CANCEL: not a refusal
        frames.extend(frame(RST_STREAM, 103, &code(REFUSED_STREAM)));
        for cut in [1, 2, 5, 9, 13, frames.len()] {
            let mut scan = FrameScan::default();
            let seen: u64 = frames.chunks(cut).map(|c| scan.refusals_in(c)).sum();
            assert_eq!(seen, 2, "writes of {cut} bytes");
            let between = scan.frames.between_frames();
            assert_eq!((scan.have, between), (0, true), "ends between frames");
        }
    }
}
