//! What the two agents say on the handover stream, and how descriptors
//! ride along (SCM_RIGHTS):
//!
//! 1. successor: `HELLO` (version 2; an agent of version 1 is asked again
//!    in its own words, and then steps 2's state and 4 are left out);
//! 2. running agent: `SOCKETS`, carrying every listening socket, then
//!    `STATE`: what its endpoints' breakers, outlier detection and health
//!    checks know;
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

/// What each version says first; of one length.
const HELLO_V1: &[u8] = b"sluice-handover/1 HELLO\n";
const HELLO_V2: &[u8] = b"sluice-handover/2 HELLO\n";

/// The handover protocol a successor speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Sockets only: open connections drain in the old agent.
    V1,
    /// Sockets, endpoint state, and the open connections.
    V2,
}

impl Version {
    fn hello(self) -> &'static [u8] {
        match self {
            Version::V1 => HELLO_V1,
            Version::V2 => HELLO_V2,
        }
    }
}
const SOCKETS: &[u8] = b"SOCKETS\n";
const READY: &[u8] = b"READY\n";
/// Step 4's header: a tag, then the descriptor count and the length of
/// the records that follow, both u32 little-endian.
const BATCH_HEADER: usize = 16;
const MOVED_TAG: &[u8; 8] = b"MOVED\0\0\0";
const STATE_TAG: &[u8; 8] = b"STATE\0\0\0";
const DONE_TAG: &[u8; 8] = b"DONE\0\0\0\0";
/// Largest records of one batch: a bound on what a confused or hostile
/// peer can make the successor allocate.
const MAX_RECORDS: usize = 64 << 20;

/// Most listening sockets one handover carries: outbound, inbound, admin,
/// metrics, and one outbound listener per pod on the node. The kernel
/// passes no more in one message (SCM_MAX_FD).
pub(super) const MAX_FDS: usize = 253;

/// The successor's side of steps 1 and 2, on a blocking stream whose read
/// timeout bounds the wait: asks, and returns the sockets received, and
/// (version 2) the running agent's state.
pub(super) fn ask(
    stream: &mut UnixStream,
    version: Version,
) -> io::Result<(Vec<OwnedFd>, Option<Vec<u8>>)> {
    let fds = ask_sockets(stream, version)?;
    let state = match version {
        Version::V1 => None,
        Version::V2 => Some(receive_state(stream)?),
    };
    Ok((fds, state))
}

fn ask_sockets(stream: &mut UnixStream, version: Version) -> io::Result<Vec<OwnedFd>> {
    stream.write_all(version.hello())?;
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

/// The running agent's side of step 1: the version of the handover the
/// peer asked for, word for word, within `within`; none for anything else.
pub(super) async fn asked(
    stream: &mut tokio::net::UnixStream,
    within: Duration,
) -> Option<Version> {
    let mut hello = [0u8; HELLO_V2.len()];
    let read = tokio::time::timeout(within, stream.read_exact(&mut hello)).await;
    if !read.is_ok_and(|r| r.is_ok()) {
        return None;
    }
    [Version::V2, Version::V1]
        .into_iter()
        .find(|v| hello == v.hello())
}

/// The running agent's state, after the sockets (version 2).
pub(super) async fn send_state(
    stream: &mut tokio::net::UnixStream,
    state: &[u8],
) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let header = batch_header(STATE_TAG, 0, state.len())?;
    stream.write_all(&header).await?;
    stream.write_all(state).await
}

fn receive_state(stream: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut header = [0u8; BATCH_HEADER];
    std::io::Read::read_exact(stream, &mut header)?;
    let len = u32::from_le_bytes(header[12..].try_into().expect("4 bytes")) as usize;
    if &header[..8] != STATE_TAG || len > MAX_RECORDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "not the running agent's state: {:?}",
                String::from_utf8_lossy(&header[..8])
            ),
        ));
    }
    let mut state = vec![0u8; len];
    std::io::Read::read_exact(stream, &mut state)?;
    Ok(state)
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
mod tests;
