//! What the two agents say on the handover stream, and how descriptors
//! ride along (SCM_RIGHTS):
//!
//! 1. successor: `HELLO`;
//! 2. running agent: `SOCKETS`, carrying every listening socket;
//! 3. successor, once it serves on them: `READY`;
//! 4. running agent: its open connections, in batches (a fixed header
//!    carrying the descriptors, then the records), then `DONE`.
//!
//! Anything else, or a stream closed between steps 1 and 3, ends the
//! exchange and each side goes on as if it had not begun. A stream closed
//! in step 4 ends it there: what was sent is the successor's.

use std::{
    io::{self, Write},
    mem::size_of,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    time::Duration,
};

use tokio::io::AsyncReadExt;

const HELLO: &[u8] = b"sluice-handover/1 HELLO\n";
const SOCKETS: &[u8] = b"SOCKETS\n";
const READY: &[u8] = b"READY\n";
/// Step 4's header: a tag, then the descriptor count and the length of
/// the records that follow, both u32 little-endian.
const BATCH_HEADER: usize = 16;
const MOVED_TAG: &[u8; 8] = b"MOVED\0\0\0";
const DONE_TAG: &[u8; 8] = b"DONE\0\0\0\0";
/// Largest records of one batch: a bound on what a confused or hostile
/// peer can make the successor allocate.
const MAX_RECORDS: usize = 64 << 20;

/// Most listening sockets one handover carries: outbound, inbound, admin,
/// metrics, and one outbound listener per pod on the node. The kernel
/// passes no more in one message (SCM_MAX_FD).
pub(super) const MAX_FDS: usize = 253;

/// The successor's side of steps 1 and 2, on a blocking stream whose read
/// timeout bounds the wait: asks, and returns the sockets received.
pub(super) fn ask(stream: &mut UnixStream) -> io::Result<Vec<OwnedFd>> {
    stream.write_all(HELLO)?;
    let mut buf = [0u8; 64];
    let (n, fds) = recv_fds(stream, &mut buf)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "it closed the stream without an answer",
        ));
    }
    if fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "it answered without sockets: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
        ));
    }
    Ok(fds)
}

/// The running agent's side of step 1: whether the peer asked for a
/// handover, word for word, within `within`.
pub(super) async fn asked(stream: &mut tokio::net::UnixStream, within: Duration) -> bool {
    let mut hello = [0u8; HELLO.len()];
    let read = tokio::time::timeout(within, stream.read_exact(&mut hello)).await;
    read.is_ok_and(|r| r.is_ok()) && hello == HELLO
}

/// The running agent's side of step 2.
pub(super) fn send_sockets(stream: &impl AsRawFd, fds: &[RawFd]) -> io::Result<()> {
    send_fds(stream, SOCKETS, fds)
}

/// The running agent's side of step 3: whether the successor said it
/// serves, within `within`. A closed stream answers at once: no.
pub(super) async fn ready(stream: &mut tokio::net::UnixStream, within: Duration) -> bool {
    let mut ready = [0u8; READY.len()];
    let read = tokio::time::timeout(within, stream.read_exact(&mut ready)).await;
    read.is_ok_and(|r| r.is_ok()) && ready == READY
}

/// The successor's side of step 3.
pub(super) fn say_ready(stream: &mut UnixStream) -> io::Result<()> {
    stream.write_all(READY)
}

/// Step 4, one batch: `fds` (at most [`MAX_FDS`]) and `records`, on a
/// blocking stream.
pub(super) fn send_batch(stream: &mut UnixStream, fds: &[RawFd], records: &[u8]) -> io::Result<()> {
    let header = batch_header(MOVED_TAG, fds.len(), records.len())?;
    send_fds(stream, &header, fds)?;
    stream.write_all(records)
}

/// Step 4's end.
pub(super) fn send_done(stream: &mut UnixStream) -> io::Result<()> {
    stream.write_all(&batch_header(DONE_TAG, 0, 0)?)
}

fn batch_header(tag: &[u8; 8], fds: usize, records: usize) -> io::Result<[u8; BATCH_HEADER]> {
    if records > MAX_RECORDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{records} bytes of records are more than a batch carries ({MAX_RECORDS})"),
        ));
    }
    let mut header = [0u8; BATCH_HEADER];
    header[..8].copy_from_slice(tag);
    header[8..12].copy_from_slice(&(fds as u32).to_le_bytes());
    header[12..].copy_from_slice(&(records as u32).to_le_bytes());
    Ok(header)
}

/// The successor's side of step 4: the next batch (descriptors and
/// records), or none after `DONE`. A batch whose descriptors do not match
/// its header is an error (and its descriptors are closed).
pub(super) fn receive_batch(
    stream: &mut UnixStream,
) -> io::Result<Option<(Vec<OwnedFd>, Vec<u8>)>> {
    let mut header = [0u8; BATCH_HEADER];
    let (n, fds) = recv_fds(stream, &mut header)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the previous agent closed the stream before DONE",
        ));
    }
    // The header is sent in one message; a short read is only possible
    // if it was cut, and the rest follows.
    std::io::Read::read_exact(stream, &mut header[n..])?;
    let count = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
    let len = u32::from_le_bytes(header[12..].try_into().expect("4 bytes")) as usize;
    match &header[..8] {
        tag if tag == DONE_TAG => Ok(None),
        tag if tag == MOVED_TAG => {
            if fds.len() != count || len > MAX_RECORDS {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "a batch says {count} descriptors and {len} bytes, and carries {} \
                         descriptors",
                        fds.len()
                    ),
                ));
            }
            let mut records = vec![0u8; len];
            std::io::Read::read_exact(stream, &mut records)?;
            Ok(Some((fds, records)))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a batch: {:?}", String::from_utf8_lossy(other)),
        )),
    }
}

/// Sends `data` with `fds` attached, all in one message; more than
/// [`MAX_FDS`] are refused before anything is sent.
fn send_fds(sock: &impl AsRawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} listening sockets are more than a handover carries ({MAX_FDS})",
                fds.len()
            ),
        ));
    }
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the
    // sendmsg call, and the control buffer is CMSG_SPACE bytes as the
    // CMSG_* macros expect.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        if libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives one message into `buf`: its length (0: the peer closed) and
/// the descriptors it carried, owned here, close-on-exec.
fn recv_fds(stream: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: as in send_fds; the kernel writes at most msg_controllen
    // bytes of control data, and every fd it passes is new and ours.
    unsafe {
        let space = libc::CMSG_SPACE((size_of::<RawFd>() * MAX_FDS) as u32) as usize;
        let mut control = vec![0u8; space];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut fds = Vec::new();
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((n as usize, fds))
    }
}

#[cfg(test)]
mod tests {
    use std::io::{PipeReader, PipeWriter, Read};

    use super::*;

    /// What arrives at `b` of one message, at most 64 bytes.
    fn receive(b: &UnixStream) -> (Vec<u8>, Vec<OwnedFd>) {
        let mut buf = [0u8; 64];
        let (n, fds) = recv_fds(b, &mut buf).unwrap();
        (buf[..n].to_vec(), fds)
    }

    /// Writes `byte` through a received descriptor of a pipe's write end.
    fn write_through(fd: OwnedFd, byte: u8) {
        PipeWriter::from(fd).write_all(&[byte]).unwrap();
    }

    fn read_byte(reader: &mut PipeReader) -> u8 {
        let mut byte = [0u8; 1];
        reader.read_exact(&mut byte).unwrap();
        byte[0]
    }

    #[test]
    fn a_message_arrives_whole_with_each_descriptor_working() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut pipes: Vec<(PipeReader, PipeWriter)> =
            (0..5).map(|_| std::io::pipe().unwrap()).collect();
        let raw: Vec<RawFd> = pipes.iter().map(|(_, w)| w.as_raw_fd()).collect();
        send_fds(&a, SOCKETS, &raw).unwrap();
        let (data, fds) = receive(&b);
        assert_eq!(data, SOCKETS);
        assert_eq!(fds.len(), 5);
        // In the order sent: each received descriptor is its pipe's
        // write end, and a new one (not the number sent).
        for (i, fd) in fds.into_iter().enumerate() {
            assert!(!raw.contains(&fd.as_raw_fd()));
            write_through(fd, b'a' + i as u8);
        }
        for (i, (reader, _)) in pipes.iter_mut().enumerate() {
            assert_eq!(read_byte(reader), b'a' + i as u8, "pipe {i}");
        }
    }

    #[test]
    fn as_many_descriptors_as_a_handover_carries_arrive_and_one_more_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut reader, writer) = std::io::pipe().unwrap();
        // The same pipe MAX_FDS times: as many descriptors, few files.
        let raw = vec![writer.as_raw_fd(); MAX_FDS];
        send_fds(&a, SOCKETS, &raw).unwrap();
        let (data, fds) = receive(&b);
        assert_eq!(data, SOCKETS);
        assert_eq!(fds.len(), MAX_FDS);
        for fd in fds {
            write_through(fd, b'x');
        }
        let mut all = vec![0u8; MAX_FDS];
        reader.read_exact(&mut all).unwrap();
        assert!(all.iter().all(|b| *b == b'x'));

        let too_many = vec![writer.as_raw_fd(); MAX_FDS + 1];
        let e = send_fds(&a, SOCKETS, &too_many).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains(&format!("({MAX_FDS})")), "{e}");
        // Nothing went out.
        b.set_nonblocking(true).unwrap();
        let e = recv_fds(&b, &mut [0u8; 64]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_message_without_descriptors_arrives_and_is_no_handover() {
        let (a, b) = UnixStream::pair().unwrap();
        send_fds(&a, SOCKETS, &[]).unwrap();
        let (data, fds) = receive(&b);
        assert_eq!(data, SOCKETS);
        assert!(fds.is_empty());

        // A successor asking gets that answer refused.
        let (mut successor, agent) = UnixStream::pair().unwrap();
        send_sockets(&agent, &[]).unwrap();
        let e = ask(&mut successor).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("without sockets"), "{e}");
    }

    #[test]
    fn a_successor_asks_and_gets_the_sockets() {
        let (mut successor, agent) = UnixStream::pair().unwrap();
        let (mut reader, writer) = std::io::pipe().unwrap();
        send_sockets(&agent, &[writer.as_raw_fd()]).unwrap();
        let fds = ask(&mut successor).unwrap();
        assert_eq!(fds.len(), 1);
        write_through(fds.into_iter().next().unwrap(), b'k');
        assert_eq!(read_byte(&mut reader), b'k');
        // What the successor said first.
        let mut agent = agent;
        let mut hello = vec![0u8; HELLO.len()];
        agent.read_exact(&mut hello).unwrap();
        assert_eq!(hello, HELLO);
    }

    #[test]
    fn a_running_agent_that_closes_or_answers_otherwise_hands_nothing_over() {
        // It reads the question and goes away.
        let (mut successor, mut agent) = UnixStream::pair().unwrap();
        std::thread::scope(|s| {
            s.spawn(move || {
                let mut hello = vec![0u8; HELLO.len()];
                agent.read_exact(&mut hello).unwrap();
            });
            let e = ask(&mut successor).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        });

        // Something that is not a handover answers.
        let (mut successor, mut agent) = UnixStream::pair().unwrap();
        agent.write_all(b"HTTP/1.1 400 Bad Request\r\n").unwrap();
        let e = ask(&mut successor).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("HTTP/1.1 400"), "{e}");

        // Nobody is there any more when it asks.
        let (mut successor, agent) = UnixStream::pair().unwrap();
        drop(agent);
        let e = ask(&mut successor).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }

    #[test]
    fn sockets_for_a_successor_that_went_away_are_an_error_not_a_signal() {
        let (successor, agent) = UnixStream::pair().unwrap();
        drop(successor);
        let (_reader, writer) = std::io::pipe().unwrap();
        let e = send_sockets(&agent, &[writer.as_raw_fd()]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }

    /// A pair of async streams: the peer (as a blocking std stream) and
    /// the running agent's end.
    fn async_pair() -> (UnixStream, tokio::net::UnixStream) {
        let (peer, agent) = UnixStream::pair().unwrap();
        agent.set_nonblocking(true).unwrap();
        (peer, tokio::net::UnixStream::from_std(agent).unwrap())
    }

    const WITHIN: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn only_the_whole_hello_is_a_question() {
        let (mut peer, mut agent) = async_pair();
        peer.write_all(HELLO).unwrap();
        assert!(asked(&mut agent, WITHIN).await);

        let (mut peer, mut agent) = async_pair();
        peer.write_all(b"sluice-handover/2 HELLO\n").unwrap();
        assert!(!asked(&mut agent, WITHIN).await, "another version");

        // Cut short by a close: no wait for the time limit.
        let (mut peer, mut agent) = async_pair();
        peer.write_all(&HELLO[..10]).unwrap();
        drop(peer);
        let started = tokio::time::Instant::now();
        assert!(!asked(&mut agent, WITHIN).await, "closed after a part");
        assert_eq!(started.elapsed(), Duration::ZERO);

        // Cut short and silent: until the time limit.
        let (mut peer, mut agent) = async_pair();
        peer.write_all(&HELLO[..10]).unwrap();
        let started = tokio::time::Instant::now();
        assert!(!asked(&mut agent, WITHIN).await, "silent after a part");
        assert_eq!(started.elapsed(), WITHIN);
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_whole_ready_lets_the_running_agent_go() {
        let (mut peer, mut agent) = async_pair();
        say_ready(&mut peer).unwrap();
        assert!(ready(&mut agent, WITHIN).await);

        let (mut peer, mut agent) = async_pair();
        peer.write_all(b"READX\n").unwrap();
        assert!(!ready(&mut agent, WITHIN).await, "garbled");

        let (mut peer, mut agent) = async_pair();
        peer.write_all(b"REA").unwrap();
        drop(peer);
        let started = tokio::time::Instant::now();
        assert!(!ready(&mut agent, WITHIN).await, "closed after a part");
        assert_eq!(started.elapsed(), Duration::ZERO);

        let (_peer, mut agent) = async_pair();
        let started = tokio::time::Instant::now();
        assert!(!ready(&mut agent, WITHIN).await, "silent");
        assert_eq!(started.elapsed(), WITHIN);
    }
}
