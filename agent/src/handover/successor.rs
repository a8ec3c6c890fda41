//! Step 4 of a handover, from each side: the running agent sends its open
//! connections to its [`Successor`]; the new agent receives them from its
//! [`Predecessor`]. What a connection is, and how it goes on, is the
//! proxy's business: here it is two descriptors and an opaque record.

use std::{
    io,
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
};

use super::wire;

/// Most connections in one batch: two descriptors each, within what one
/// message carries.
pub const MAX_BATCH: usize = wire::MAX_FDS / 2;

/// Open connections on their way: two descriptors each (the accepted one,
/// then the one the agent opened), in the order of `records`, which says
/// the rest.
#[derive(Debug, Default)]
pub struct Batch {
    pub fds: Vec<OwnedFd>,
    pub records: Vec<u8>,
}

/// The running agent's end of the stream to the agent that took over.
#[derive(Debug)]
pub struct Successor {
    pub(super) stream: UnixStream,
    /// Whether it takes open connections (a successor of an older version
    /// takes the sockets only: the connections drain here).
    pub(super) moves: bool,
}

impl Successor {
    /// Whether the open connections can go to it.
    pub fn takes_connections(&self) -> bool {
        self.moves
    }

    /// Sends one batch of at most [`MAX_BATCH`] connections. Blocking.
    pub fn send(&mut self, batch: &Batch) -> io::Result<()> {
        let fds: Vec<RawFd> = batch.fds.iter().map(|fd| fd.as_raw_fd()).collect();
        wire::send_batch(&mut self.stream, &fds, &batch.records)
    }

    /// Says that no connection follows. Blocking.
    pub fn done(mut self) -> io::Result<()> {
        wire::send_done(&mut self.stream)
    }
}

/// The new agent's end of the stream from the agent it replaced.
#[derive(Debug)]
pub struct Predecessor(pub(super) UnixStream);

impl Predecessor {
    /// The next batch, or none once the previous agent said it sent all.
    /// Blocking.
    pub fn receive(&mut self) -> io::Result<Option<Batch>> {
        Ok(wire::receive_batch(&mut self.0)?.map(|(fds, records)| Batch { fds, records }))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// Batches arrive whole and in order, each descriptor working, until
    /// `DONE`.
    #[test]
    fn batches_arrive_in_order_with_their_descriptors_then_done() {
        let (old, new) = UnixStream::pair().unwrap();
        let mut successor = Successor {
            stream: old,
            moves: true,
        };
        let mut predecessor = Predecessor(new);
        let sender = std::thread::spawn(move || {
            for round in 0..3u8 {
                let pairs: Vec<(UnixStream, UnixStream)> = (0..MAX_BATCH)
                    .map(|_| UnixStream::pair().unwrap())
                    .collect();
                let mut batch = Batch {
                    records: vec![round; 100_000 * usize::from(round)],
                    ..Batch::default()
                };
                let mut kept = Vec::new();
                for (ours, theirs) in pairs {
                    batch.fds.push(OwnedFd::from(theirs));
                    kept.push(ours);
                }
                successor.send(&batch).unwrap();
                for (i, mut ours) in kept.into_iter().enumerate() {
                    ours.write_all(&[round, i as u8]).unwrap();
                }
            }
            successor.done().unwrap();
        });
        for round in 0..3u8 {
            let batch = predecessor.receive().unwrap().expect("a batch");
            assert_eq!(batch.records.len(), 100_000 * usize::from(round));
            assert!(batch.records.iter().all(|b| *b == round));
            assert_eq!(batch.fds.len(), MAX_BATCH);
            for (i, fd) in batch.fds.into_iter().enumerate() {
                let mut got = [0u8; 2];
                UnixStream::from(fd).read_exact(&mut got).unwrap();
                assert_eq!(got, [round, i as u8], "round {round}, descriptor {i}");
            }
        }
        assert!(predecessor.receive().unwrap().is_none(), "DONE ends it");
        sender.join().unwrap();
    }

    /// A predecessor gone before `DONE`, or one that says something else,
    /// is an error rather than an end.
    #[test]
    fn a_cut_or_garbled_stream_is_an_error() {
        let (old, new) = UnixStream::pair().unwrap();
        drop(old);
        let e = Predecessor(new).receive().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");

        let (mut old, new) = UnixStream::pair().unwrap();
        old.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        let e = Predecessor(new).receive().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
}
