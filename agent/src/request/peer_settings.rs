//! The stream limit an HTTP/2 endpoint sets, read off its connection: a
//! server's SETTINGS_MAX_CONCURRENT_STREAMS is how many requests one
//! connection to it may carry at once, its first frame is a SETTINGS
//! (RFC 9113, 3.4), and it may send others later. hyper keeps the peer's
//! settings to itself, so the frames are looked at as their bytes pass:
//! a read costs a look at each frame header in it, and a SETTINGS frame's
//! payload is read.

use std::{
    io,
    ops::ControlFlow,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::oneshot,
};

use super::pool::Streams;
use crate::h2frames::{ACK, Frames, SETTINGS, Seen};

/// SETTINGS_MAX_CONCURRENT_STREAMS, the setting's identifier.
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// A SETTINGS frame longer than this is not read (settings are six bytes
/// each; RFC 9113 defines six of them): what a peer can make this hold.
const MOST: usize = 16 * 6;

/// An endpoint's connection whose SETTINGS frames' stream limit, when
/// they set one, limits its `streams`.
pub struct PeerSettings<T> {
    io: T,
    streams: Arc<Streams>,
    frames: Frames,
    /// The current frame's payload when it is a SETTINGS being read.
    settings: Option<Vec<u8>>,
    /// Told once the first frame has been read.
    read: Option<oneshot::Sender<()>>,
}

impl<T> PeerSettings<T> {
    /// `io`, and what says when its first frame has been read: hyper's
    /// handshake does not wait for the server's SETTINGS, and the
    /// requests that waited for the connection would all take it before
    /// its limit is known.
    pub fn new(io: T, streams: Arc<Streams>) -> (PeerSettings<T>, oneshot::Receiver<()>) {
        let (read, first_read) = oneshot::channel();
        let watched = PeerSettings {
            io,
            streams,
            frames: Frames::default(),
            settings: None,
            read: Some(read),
        };
        (watched, first_read)
    }

    /// The first frame has been read (or the connection ended first).
    fn first_read(&mut self) {
        if let Some(read) = self.read.take() {
            let _ = read.send(());
        }
    }

    /// Takes in `bytes` just read: a SETTINGS frame's stream limit, if it
    /// sets one, is the connection's from the frame's end on.
    fn look(&mut self, bytes: &[u8]) {
        let PeerSettings {
            streams,
            frames,
            settings,
            read,
            ..
        } = self;
        let _ = frames.walk(bytes, |seen| {
            match seen {
                Seen::Header(h) if h.kind == SETTINGS && h.flags & ACK == 0 && h.len <= MOST => {
                    *settings = Some(Vec::with_capacity(h.len));
                }
                Seen::Payload(_, part) => {
                    if let Some(payload) = settings.as_mut() {
                        payload.extend_from_slice(part);
                    }
                }
                Seen::End(_) => {
                    if let Some(most) = settings.take().and_then(|p| stream_limit(&p)) {
                        streams.set_limit(most);
                    }
                    if let Some(read) = read.take() {
                        let _ = read.send(());
                    }
                }
                Seen::Header(_) => {}
            }
            ControlFlow::Continue(())
        });
    }
}

/// SETTINGS_MAX_CONCURRENT_STREAMS in a SETTINGS frame's payload (the
/// last one, as a receiver applies them in order).
fn stream_limit(payload: &[u8]) -> Option<u32> {
    payload
        .chunks_exact(6)
        .filter(|s| u16::from_be_bytes([s[0], s[1]]) == MAX_CONCURRENT_STREAMS)
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
        .next_back()
}

impl<T: AsyncRead + Unpin> AsyncRead for PeerSettings<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match crate::poll_read_added(&mut this.io, cx, buf) {
            Poll::Ready(Ok(added)) if !added.is_empty() => this.look(added),
            // It ended or failed.
            Poll::Ready(read) => {
                this.first_read();
                return Poll::Ready(read.map(|_| ()));
            }
            Poll::Pending => return Poll::Pending,
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(impl[T: AsyncWrite + Unpin] PeerSettings<T>);

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        frame_with(kind, 0, payload)
    }

    fn frame_with(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![
            (n >> 16) as u8,
            (n >> 8) as u8,
            n as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        f.extend_from_slice(payload);
        f
    }

    /// What `limit` is after a peer sent `bytes`, `chunk` at a time.
    async fn limit_after(bytes: &[u8], chunk: usize) -> u32 {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let streams = Arc::new(Streams::default());
        let (mut watched, mut first_read) = PeerSettings::new(ours, streams.clone());
        for piece in bytes.chunks(chunk) {
            theirs.write_all(piece).await.unwrap();
            let mut got = vec![0; piece.len()];
            watched.read_exact(&mut got).await.unwrap();
            assert_eq!(got, piece, "the bytes pass unchanged");
        }
        assert_eq!(
            first_read.try_recv(),
            Ok(()),
            "told once the first frame is in"
        );
        streams.limit()
    }

    #[tokio::test]
    async fn a_servers_stream_limit_lowers_the_connections_in_any_read_sizes() {
        // SETTINGS_HEADER_TABLE_SIZE 4096, SETTINGS_MAX_CONCURRENT_STREAMS 10.
        let settings = [0, 1, 0, 0, 16, 0, 0, 3, 0, 0, 0, 10];
        let mut bytes = frame(SETTINGS, &settings);
        bytes.extend(frame(0x8, &[0, 0, 1, 0]));
        for chunk in [1, 4, 9, 13, bytes.len()] {
            assert_eq!(limit_after(&bytes, chunk).await, 10, "{chunk} at a time");
        }
    }

    #[tokio::test]
    async fn the_limit_is_at_least_one_and_at_most_ours() {
        let higher = frame(SETTINGS, &[0, 3, 0, 0, 1, 0]);
        assert_eq!(limit_after(&higher, 5).await, 100, "ours is the most");
        let none = frame(SETTINGS, &[0, 4, 0, 1, 0, 0]);
        assert_eq!(limit_after(&none, 5).await, 100, "no limit set");
        let zero = frame(SETTINGS, &[0, 3, 0, 0, 0, 0]);
        assert_eq!(limit_after(&zero, 5).await, 1, "at least one");
    }

    /// A server may change its limit at any time: each SETTINGS frame's
    /// counts, lower or higher, and nothing else's (an ACK, a DATA
    /// frame's payload that looks like one).
    #[tokio::test]
    async fn a_later_settings_frame_changes_the_limit() {
        let first = frame(SETTINGS, &[0, 3, 0, 0, 0, 10]);
        let mut bytes = first.clone();
        bytes.extend(frame(0x8, &[0, 0, 1, 0]));
        bytes.extend(frame(SETTINGS, &[0, 3, 0, 0, 0, 5]));
        for chunk in [1, 7, 9, 20, bytes.len()] {
            assert_eq!(
                limit_after(&bytes, chunk).await,
                5,
                "lowered, {chunk} at a time"
            );
        }
        let mut raised = first.clone();
        raised.extend(frame(SETTINGS, &[0, 3, 0, 0, 0, 50]));
        assert_eq!(limit_after(&raised, 4).await, 50, "raised");
        let mut ack = first.clone();
        ack.extend(frame_with(SETTINGS, ACK, &[]));
        // A DATA frame whose payload is a SETTINGS frame's bytes.
        ack.extend(frame(0x0, &frame(SETTINGS, &[0, 3, 0, 0, 0, 2])));
        assert_eq!(limit_after(&ack, 3).await, 10, "only SETTINGS frames count");
    }
}
