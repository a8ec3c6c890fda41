//! HTTP/2 frames (RFC 9113, 4.1) followed through a byte stream as it
//! passes, however its reads or writes cut it. The agent's watchers on
//! HTTP/2 connections (a client's control-frame flood, an endpoint's
//! SETTINGS, the streams h2 refuses on a tunnel) each see the frames'
//! headers and payload bytes from this one walker.

use std::ops::ControlFlow;

/// A frame header's length: length (24 bits), type, flags, stream (32).
pub const HEADER: usize = 9;
/// Frame types, and the ACK flag of SETTINGS and PING.
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const ACK: u8 = 0x1;

/// What a frame's header says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub flags: u8,
    /// Its payload's length.
    pub len: usize,
}

/// What a walk passes over, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen<'a> {
    /// A frame's header is whole.
    Header(Header),
    /// Bytes of that frame's payload, in pieces as they come.
    Payload(Header, &'a [u8]),
    /// That frame's payload is whole (at once after an empty one's header).
    End(Header),
}

/// Where a byte stream stands among its frames.
#[derive(Debug, Default)]
pub struct Frames {
    /// Bytes still to pass that are no frame (a client's preface).
    skip: usize,
    head: [u8; HEADER],
    have: usize,
    /// The frame whose payload is passing, and how much of it is left.
    current: Header,
    left: usize,
}

impl Frames {
    /// Frames that begin after `skip` bytes of something else (a client's
    /// 24-byte connection preface).
    pub fn after(skip: usize) -> Frames {
        Frames {
            skip,
            ..Frames::default()
        }
    }

    /// Whether the bytes so far end where a frame would begin.
    pub fn between_frames(&self) -> bool {
        self.skip == 0 && self.have == 0 && self.left == 0
    }

    /// Walks `bytes`, telling `seen` what they hold; stops where `seen`
    /// breaks, and says so.
    pub fn walk(
        &mut self,
        mut bytes: &[u8],
        mut seen: impl FnMut(Seen<'_>) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                seen(Seen::Payload(self.current, &bytes[..n]))?;
                bytes = &bytes[n..];
                if self.left == 0 {
                    seen(Seen::End(self.current))?;
                }
                continue;
            }
            let n = (HEADER - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have < HEADER {
                break;
            }
            self.have = 0;
            let h = &self.head;
            self.current = Header {
                kind: h[3],
                flags: h[4],
                len: usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]),
            };
            self.left = self.current.len;
            seen(Seen::Header(self.current))?;
            if self.left == 0 {
                seen(Seen::End(self.current))?;
            }
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything a walk sees, as owned parts: the payload pieces joined.
    fn walked(bytes: &[u8], cut: usize) -> Vec<(Header, Vec<u8>)> {
        let mut frames = Frames::after(3);
        let mut out: Vec<(Header, Vec<u8>)> = Vec::new();
        for piece in bytes.chunks(cut) {
            let _ = frames.walk(piece, |seen| {
                match seen {
                    Seen::Header(h) => out.push((h, Vec::new())),
                    Seen::Payload(h, part) => {
                        let last = out.last_mut().expect("a header first");
                        assert_eq!(last.0, h);
                        last.1.extend_from_slice(part);
                    }
                    Seen::End(h) => {
                        assert_eq!(out.last().map(|l| (l.0, l.1.len())), Some((h, h.len)))
                    }
                }
                ControlFlow::Continue(())
            });
        }
        out
    }

    #[test]
    fn frames_are_followed_however_the_bytes_are_cut() {
        let mut bytes = b"PRI".to_vec();
        bytes.extend([0, 0, 2, SETTINGS, 0, 0, 0, 0, 0, 7, 8]);
        bytes.extend([0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0]);
        bytes.extend([0, 0, 4, RST_STREAM, 0, 0, 0, 0, 1, 0, 0, 0, 7]);
        let expected = vec![
            (
                Header {
                    kind: SETTINGS,
                    flags: 0,
                    len: 2,
                },
                vec![7, 8],
            ),
            (
                Header {
                    kind: SETTINGS,
                    flags: ACK,
                    len: 0,
                },
                vec![],
            ),
            (
                Header {
                    kind: RST_STREAM,
                    flags: 0,
                    len: 4,
                },
                vec![0, 0, 0, 7],
            ),
        ];
        for cut in [1, 2, 5, 9, 10, bytes.len()] {
            assert_eq!(walked(&bytes, cut), expected, "{cut} at a time");
        }
    }

    #[test]
    fn a_walk_stops_where_it_is_told() {
        let bytes = [0, 0, 0, PING, 0, 0, 0, 0, 0, 0, 0, 0, PING, 0, 0, 0, 0, 0];
        let mut pings = 0;
        let stopped = Frames::default().walk(&bytes, |seen| {
            pings += u32::from(matches!(seen, Seen::Header(_)));
            match pings {
                1 => ControlFlow::Continue(()),
                _ => ControlFlow::Break(()),
            }
        });
        assert_eq!((stopped, pings), (ControlFlow::Break(()), 2));
    }
}
