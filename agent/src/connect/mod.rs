//! Every socket the agent makes is made here, in the host's network
//! namespace or a pod's the same way: upstream sockets carry the agent's
//! mark and the same options; listening sockets are taken over from the
//! agent being upgraded when it offers one for the same address and
//! namespace, and bound afresh otherwise.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::{
    handover::Inherited,
    netns::{Netns, netns_cookie},
};

/// `stream` registered with `runtime`'s reactor instead of the current
/// one: a connection set up on one runtime, carried on another.
pub fn rebind(stream: TcpStream, runtime: &tokio::runtime::Handle) -> io::Result<TcpStream> {
    let std = stream.into_std()?;
    let _inside = runtime.enter();
    TcpStream::from_std(std)
}

/// Keeps at most `bytes` unsent in the socket's send queue: a connection
/// that many streams share (a tunnel) then queues a bulk stream's data in
/// HTTP/2, where a small stream's frame can overtake it, instead of
/// megabytes deep in the kernel. Sent bytes in flight are not limited.
pub fn limit_unsent(stream: &TcpStream, bytes: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    setsockopt_u32(
        stream.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_NOTSENT_LOWAT,
        bytes,
    )
}

fn setsockopt_u32(fd: RawFd, level: libc::c_int, name: libc::c_int, value: u32) -> io::Result<()> {
    // SAFETY: passes a pointer to a live u32 and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const u32).cast(),
            size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A listening socket on `addr` (address reuse on, so a restarted agent
/// binds at once), in the agent's network namespace; during an upgrade,
/// the previous agent's socket for `addr` instead.
pub fn listen(
    addr: SocketAddr,
    backlog: u32,
    inherited: &Inherited,
) -> io::Result<(TcpListener, u64)> {
    listen_in(addr, backlog, inherited, None)
}

/// [`listen`] inside `netns` (a pod's namespace) when given. Inherited
/// sockets are matched by address and namespace.
pub fn listen_in(
    addr: SocketAddr,
    backlog: u32,
    inherited: &Inherited,
    netns: Option<&Netns>,
) -> io::Result<(TcpListener, u64)> {
    // The namespace's cookie, to find an inherited socket of the same one.
    let probe = socket_in(addr, netns)?;
    let cookie = netns_cookie(&probe)?;
    drop(probe);
    if let Some(fd) = inherited.take(addr, cookie) {
        let listener = std::net::TcpListener::from(fd);
        listener.set_nonblocking(true)?;
        let cookie = netns_cookie(&listener)?;
        return Ok((TcpListener::from_std(listener)?, cookie));
    }
    let socket = socket_in(addr, netns)?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
    let cookie = netns_cookie(&socket)?;
    Ok((socket.listen(backlog)?, cookie))
}

/// A listening socket in one network namespace, as every listener of the
/// data plane holds it: the socket, and the cookie of its namespace (which
/// keys it in the handover and the sockmap bypass).
pub struct BoundListener {
    listener: TcpListener,
    netns_cookie: u64,
}

impl BoundListener {
    /// [`listen_in`], kept with its namespace's cookie.
    pub fn bind_in(
        addr: SocketAddr,
        backlog: u32,
        inherited: &Inherited,
        netns: Option<&Netns>,
    ) -> io::Result<BoundListener> {
        let (listener, netns_cookie) = listen_in(addr, backlog, inherited, netns)?;
        Ok(BoundListener {
            listener,
            netns_cookie,
        })
    }

    /// Cookie of the network namespace it listens in.
    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// The listening socket, for handing over to a successor (and the
    /// capture hook's SOCKMAP).
    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.listener)
    }

    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }
}

/// A TCP socket of `addr`'s family, made inside `netns` when given (it
/// stays in that namespace).
fn socket_in(addr: SocketAddr, netns: Option<&Netns>) -> io::Result<TcpSocket> {
    let _inside = netns.map(Netns::enter).transpose()?;
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

/// Connects to `addr` from a socket marked `mark` (so the connect hook lets
/// it through), giving up after `timeout`; the socket is made in `netns`
/// (the calling pod's namespace) when given.
pub async fn connect_marked(
    addr: SocketAddr,
    mark: u32,
    timeout: Duration,
    netns: Option<&Netns>,
) -> io::Result<TcpStream> {
    let socket = socket_in(addr, netns)?;
    setsockopt_u32(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_MARK, mark)?;
    socket.set_nodelay(true)?;
    match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {}ms", timeout.as_millis()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};

    use super::*;

    fn inode(fd: impl AsFd) -> u64 {
        // SAFETY: fstat on a valid descriptor into a zeroed local struct.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            assert_eq!(libc::fstat(fd.as_fd().as_raw_fd(), &mut st), 0);
            st.st_ino
        }
    }

    #[tokio::test]
    async fn an_offered_listening_socket_is_taken_over_not_bound_again() {
        let old = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = old.local_addr().unwrap();
        let cookie = netns_cookie(&old).unwrap();
        let old_inode = inode(&old);
        let inherited = Inherited::with_sockets(vec![(addr, cookie, OwnedFd::from(old))]);
        let bound = BoundListener::bind_in(addr, 16, &inherited, None).unwrap();
        assert_eq!(inode(bound.socket()), old_inode, "the same socket");
        assert_eq!(bound.netns_cookie(), cookie);
        // Taken once: a second listener on the address binds its own, which
        // the first (still listening) refuses.
        let again = BoundListener::bind_in(addr, 16, &inherited, None);
        assert!(again.is_err());
        assert!(
            again.err().unwrap().to_string().contains(&addr.to_string()),
            "the error names the address"
        );
    }

    #[tokio::test]
    async fn every_upstream_socket_carries_the_agents_mark() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = connect_marked(addr, 0x5a5a, Duration::from_secs(5), None)
            .await
            .unwrap();
        let mut mark = 0u32;
        let mut len = size_of::<u32>() as libc::socklen_t;
        // SAFETY: out-pointers to live locals of the right size.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mut mark as *mut u32).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(mark, 0x5a5a);
        assert!(stream.nodelay().unwrap());
    }
}
