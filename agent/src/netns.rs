//! Workloads with their own network namespace (pods). A pod's 127.0.0.1
//! is its own loopback, so the agent opens an outbound listener inside each
//! pod's namespace, and opens that pod's upstream sockets there too, so the
//! pod's address stays the source and network policies still apply.
//!
//! A socket belongs to the namespace its creating thread was in when it
//! was created, and stays there. So the agent enters a pod's namespace
//! with setns(2) on the current thread, creates the socket, and returns to
//! its own namespace at once, in one synchronous step that never spans an
//! `.await` (see [`Netns::enter`]).

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// The agent's own network namespace, opened once at start.
static HOME: OnceLock<OwnedFd> = OnceLock::new();

/// Remembers the namespace the agent starts in. Call once, before any
/// [`Netns::enter`]; later calls keep the first.
pub fn remember_home() -> io::Result<()> {
    if HOME.get().is_none() {
        let fd = OwnedFd::from(File::open("/proc/thread-self/ns/net")?);
        let _ = HOME.set(fd);
    }
    Ok(())
}

/// The agent's own network namespace, once remembered.
pub fn home() -> Option<std::os::fd::BorrowedFd<'static>> {
    HOME.get().map(std::os::fd::AsFd::as_fd)
}

/// A workload's network namespace, held open by a descriptor so that its
/// path may go away (the pod ending) without the agent noticing late.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    fd: OwnedFd,
}

impl Netns {
    /// Opens the namespace at `path` (a bind-mounted namespace such as
    /// /var/run/netns/NAME, or /proc/PID/ns/net).
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open network namespace {}: {e}", path.display()),
            )
        })?;
        let netns = Netns {
            path: path.to_owned(),
            fd: OwnedFd::from(file),
        };
        // Refuse a file that is not a network namespace now, not at the
        // first connection.
        drop(netns.enter()?);
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's descriptor (to attach programs to it).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }

    /// Moves the current thread into this namespace until the guard drops.
    /// Create sockets while holding it; never hold it across an `.await`.
    pub fn enter(&self) -> io::Result<Entered> {
        let home = HOME.get().ok_or_else(|| {
            io::Error::other("the agent's own network namespace was not remembered at start")
        })?;
        setns(self.fd.as_raw_fd()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot enter network namespace {}: {e}",
                    self.path.display()
                ),
            )
        })?;
        Ok(Entered {
            home: home.as_raw_fd(),
        })
    }
}

/// The current thread is in a workload's namespace while this lives.
pub struct Entered {
    home: i32,
}

impl Drop for Entered {
    fn drop(&mut self) {
        // Going home cannot fail in practice (the agent holds the fd and
        // the capability); if it did, this thread would create sockets in
        // the wrong namespace, so stop rather than go on.
        if let Err(e) = setns(self.home) {
            panic!("cannot return to the agent's network namespace: {e}");
        }
    }
}

/// `SO_NETNS_COOKIE` from asm-generic/socket.h (libc does not define it).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace a socket lives in; equals what the
/// hooks read with `bpf_get_netns_cookie`.
pub fn netns_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid out-pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn setns(fd: i32) -> io::Result<()> {
    // SAFETY: setns(2) on a namespace fd this process holds open.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
