//! The stream limit an HTTP/2 endpoint sets, read off its connection: the
//! first frame a server sends is its SETTINGS (RFC 9113, 3.4), and its
//! SETTINGS_MAX_CONCURRENT_STREAMS is how many requests one connection to
//! it may carry at once. hyper keeps the peer's settings to itself, so the
//! bytes are looked at as they pass, until that frame has (a later change
//! of the setting is not followed); after it, a read costs one branch.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::oneshot,
};

use super::pool::Streams;

/// SETTINGS, the frame type (RFC 9113, 6.5).
const SETTINGS: u8 = 0x4;
/// SETTINGS_MAX_CONCURRENT_STREAMS, the setting's identifier.
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// A frame's header: length (24 bits), type, flags, stream (32 bits).
const HEADER: usize = 9;
/// A server's first SETTINGS frame longer than this is not read (its
/// settings are six bytes each; RFC 9113 defines six of them).
const MOST: usize = 16 * 6;

/// An endpoint's connection whose first frame's stream limit, when it
/// sets one, limits its `streams`.
pub struct PeerSettings<T> {
    io: T,
    streams: Arc<Streams>,
    /// The first frame's bytes so far; None once it has been read (or is
    /// not one this looks at).
    first: Option<Vec<u8>>,
    /// Told once it has.
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
            first: Some(Vec::new()),
            read: Some(read),
        };
        (watched, first_read)
    }

    fn done(&mut self) {
        self.first = None;
        if let Some(read) = self.read.take() {
            let _ = read.send(());
        }
    }

    /// Takes in `bytes` just read, while the first frame is not whole.
    fn look(&mut self, bytes: &[u8]) {
        let Some(first) = self.first.as_mut() else {
            return;
        };
        first.extend_from_slice(bytes);
        if first.len() < HEADER {
            return;
        }
        let length =
            usize::from(first[0]) << 16 | usize::from(first[1]) << 8 | usize::from(first[2]);
        if first[3] != SETTINGS || length > MOST {
            return self.done();
        }
        if first.len() < HEADER + length {
            return;
        }
        let payload = &first[HEADER..HEADER + length];
        if let Some(most) = stream_limit(payload) {
            self.streams.limit_to(most);
        }
        self.done();
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
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if self.first.is_some() {
            match &read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => {
                    let this = &mut *self;
                    this.look(&buf.filled()[before..]);
                }
                // It ended or failed first.
                Poll::Ready(_) => self.done(),
                Poll::Pending => {}
            }
        }
        read
    }
}

write_through!(impl[T: AsyncWrite + Unpin] PeerSettings<T>);

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![
            (n >> 16) as u8,
            (n >> 8) as u8,
            n as u8,
            kind,
            0,
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
    async fn only_a_lower_limit_in_the_first_frame_counts() {
        let higher = frame(SETTINGS, &[0, 3, 0, 0, 1, 0]);
        assert_eq!(limit_after(&higher, 5).await, 100, "ours is the most");
        let none = frame(SETTINGS, &[0, 4, 0, 1, 0, 0]);
        assert_eq!(limit_after(&none, 5).await, 100, "no limit set");
        let zero = frame(SETTINGS, &[0, 3, 0, 0, 0, 0]);
        assert_eq!(limit_after(&zero, 5).await, 1, "at least one");
        let mut later = frame(0x8, &[0, 0, 1, 0]);
        later.extend(frame(SETTINGS, &[0, 3, 0, 0, 0, 5]));
        assert_eq!(limit_after(&later, 5).await, 100, "not the first frame");
    }
}
