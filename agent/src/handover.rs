//! Zero-downtime restart: a new agent takes the running agent's listening
//! sockets over a Unix socket, so that not one connect is refused while the
//! versions change.
//!
//! The socket is abstract (no file), named after the agent's pin
//! directory: abstract sockets belong to a network namespace, so only an
//! agent in the same namespace with the same pins (the same node agent, in
//! another version) can reach it, and nothing is left behind by a crash.
//!
//! 1. The new agent connects and asks (`HELLO`).
//! 2. The old agent sends every listening socket it has (SCM_RIGHTS) and
//!    keeps accepting on them.
//! 3. The new agent reuses the pinned maps, attaches its programs (which
//!    replaces the old links), starts accepting on the same sockets, and
//!    says `READY`.
//! 4. The old agent stops accepting, drains its open connections, and
//!    exits without detaching anything or removing any pin: they are the
//!    new agent's now.
//!
//! Both processes accept from the same sockets for a moment, and each
//! connection is accepted by exactly one of them, so the kernel's accept
//! queue is never dropped. If the new agent dies before `READY`, the old one
//! notices the closed stream and goes on serving.

use std::{
    io::{self, Write},
    mem::size_of,
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::Path,
    sync::Mutex,
    time::Duration,
};

use log::{info, warn};
use tokio::{io::AsyncReadExt, net::UnixListener, sync::oneshot};

use crate::drain::DrainWatch;

const HELLO: &[u8] = b"sluice-handover/1 HELLO\n";
const READY: &[u8] = b"READY\n";
/// Most listening sockets one handover carries: outbound, inbound, admin,
/// metrics, and one outbound listener per pod on the node.
const MAX_FDS: usize = 253;
/// How long the old agent waits for `READY` before it gives up on this
/// successor and goes on serving.
const READY_WITHIN: Duration = Duration::from_secs(60);
const BIND_RETRY: Duration = Duration::from_millis(20);
const BIND_WITHIN: Duration = Duration::from_secs(30);

/// The abstract name the running agent listens on for a successor.
pub fn socket_name(pin_dir: &Path) -> String {
    let name = format!("sluice-handover:{}", pin_dir.display());
    // Abstract names are at most 107 bytes; a long pin directory stands
    // in by its hash (FNV-1a) rather than making the agent fail.
    if name.len() <= 100 {
        return name;
    }
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("sluice-handover:{hash:016x}")
}

fn address(name: &str) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

/// Listening sockets received from the previous agent, taken one by one
/// by the listeners that bind the same address.
#[derive(Default)]
pub struct Inherited {
    /// (local address, network namespace cookie, socket).
    sockets: Mutex<Vec<(SocketAddr, u64, OwnedFd)>>,
    /// The stream to the old agent; `READY` goes there.
    stream: Mutex<Option<UnixStream>>,
}

impl Inherited {
    /// Nothing inherited: every listener binds its own socket.
    pub fn none() -> Inherited {
        Inherited::default()
    }

    /// Whether a previous agent handed its sockets over.
    pub fn is_upgrade(&self) -> bool {
        self.stream.lock().expect("handover lock").is_some()
    }

    /// The inherited listening socket bound to `addr` in the network
    /// namespace with cookie `netns`, if any.
    pub fn take(&self, addr: SocketAddr, netns: u64) -> Option<OwnedFd> {
        let mut sockets = self.sockets.lock().expect("handover lock");
        let i = sockets
            .iter()
            .position(|(a, n, _)| *a == addr && *n == netns)?;
        Some(sockets.swap_remove(i).2)
    }

    /// Tells the previous agent to stop accepting and drain. The sockets it
    /// sent that no listener took are closed here.
    pub fn ready(&self) {
        let unused: Vec<SocketAddr> = self
            .sockets
            .lock()
            .expect("handover lock")
            .drain(..)
            .map(|(a, _, _)| a)
            .collect();
        if !unused.is_empty() {
            warn!("inherited listening sockets no longer configured, closed: {unused:?}");
        }
        if let Some(mut stream) = self.stream.lock().expect("handover lock").take() {
            match stream.write_all(READY) {
                Ok(()) => info!("upgrade: serving; the previous agent drains and exits"),
                Err(e) => warn!("upgrade: cannot tell the previous agent to drain: {e}"),
            }
        }
    }
}

/// Asks a running agent for its listening sockets. `Ok(None)` when no
/// agent answers at `name`.
pub fn take_over(name: &str) -> io::Result<Option<Inherited>> {
    let mut stream = match UnixStream::connect_addr(&address(name)?) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(None),
        Err(e) => return Err(e),
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(HELLO)?;
    let mut buf = [0u8; 64];
    let (n, fds) = recv_fds(&stream, &mut buf)?;
    if n == 0 || fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the agent at @{name} answered without sockets: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
        ));
    }
    let mut sockets = Vec::with_capacity(fds.len());
    for fd in fds {
        let std_listener = std::net::TcpListener::from(fd);
        let addr = std_listener.local_addr()?;
        let netns = crate::proxy::socket::netns_cookie(&std_listener)?;
        sockets.push((addr, netns, OwnedFd::from(std_listener)));
    }
    info!(
        "upgrade: took over {} listening sockets from the running agent",
        sockets.len()
    );
    stream.set_read_timeout(None)?;
    Ok(Some(Inherited {
        sockets: Mutex::new(sockets),
        stream: Mutex::new(Some(stream)),
    }))
}

/// The listening sockets this agent would hand over now: the fixed ones
/// (outbound, inbound, admin, metrics) and one per pod namespace, which come and go
/// with the pods (keyed by namespace cookie).
#[derive(Default, Clone)]
pub struct Offered {
    sockets: std::sync::Arc<Mutex<Vec<OfferedSocket>>>,
}

/// A listening socket on offer: `Some(cookie)` for a pod's listener, which
/// leaves the offer with its pod.
type OfferedSocket = (Option<u64>, OwnedFd);

impl Offered {
    pub fn add_fixed(&self, fd: OwnedFd) {
        self.sockets.lock().expect("handover lock").push((None, fd));
    }

    pub fn add(&self, netns_cookie: u64, fd: OwnedFd) {
        self.sockets
            .lock()
            .expect("handover lock")
            .push((Some(netns_cookie), fd));
    }

    pub fn remove(&self, netns_cookie: u64) {
        self.sockets
            .lock()
            .expect("handover lock")
            .retain(|(c, _)| *c != Some(netns_cookie));
    }

    fn raw(&self) -> Vec<RawFd> {
        let sockets = self.sockets.lock().expect("handover lock");
        sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect()
    }
}

/// The running agent's side: offers `sockets` to a successor on the
/// abstract socket `name`. Resolves `handed_over` once a successor said
/// `READY`. Right after an upgrade the previous agent still holds the name
/// for a moment; binding is retried until it lets go.
pub async fn offer(
    name: String,
    sockets: Offered,
    handed_over: oneshot::Sender<()>,
    mut drain: DrainWatch,
) {
    let mut waited = Duration::ZERO;
    let listener = loop {
        match listen(&name) {
            Ok(l) => break l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && waited < BIND_WITHIN => {
                tokio::select! {
                    _ = drain.draining() => return,
                    _ = tokio::time::sleep(BIND_RETRY) => waited += BIND_RETRY,
                }
            }
            Err(e) => {
                return warn!(
                    "cannot listen for a successor at @{name} ({e}); an upgrade will start cold"
                );
            }
        }
    };
    loop {
        let mut stream = tokio::select! {
            _ = drain.draining() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!("handover socket: {e}");
                    continue;
                }
            },
        };
        let mut hello = [0u8; HELLO.len()];
        let asked = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut hello))
            .await
            .is_ok_and(|r| r.is_ok());
        if !asked || hello != HELLO {
            warn!("handover socket: a peer connected without asking for a handover");
            continue;
        }
        let raw = sockets.raw();
        if raw.len() > MAX_FDS {
            warn!(
                "upgrade: {} listening sockets are more than a handover carries ({MAX_FDS})",
                raw.len()
            );
            continue;
        }
        if let Err(e) = send_fds(stream.as_fd().as_raw_fd(), b"SOCKETS\n", &raw) {
            warn!("upgrade: cannot hand the listening sockets over: {e}");
            continue;
        }
        info!("upgrade: a new agent took the listening sockets; waiting for it to be ready");
        let mut ready = [0u8; READY.len()];
        match tokio::time::timeout(READY_WITHIN, stream.read_exact(&mut ready)).await {
            Ok(Ok(_)) if ready == READY => {
                let _ = handed_over.send(());
                return;
            }
            _ => warn!("upgrade: the new agent went away before it was ready; still serving"),
        }
    }
}

/// Binds the handover socket. Fails with AddrInUse while another agent
/// (the one this one replaces, until it has read `READY`) holds the name.
fn listen(name: &str) -> io::Result<UnixListener> {
    let std_listener = std::os::unix::net::UnixListener::bind_addr(&address(name)?)?;
    std_listener.set_nonblocking(true)?;
    UnixListener::from_std(std_listener)
}

fn send_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
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
        if libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn recv_fds(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
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
