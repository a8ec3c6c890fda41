//! Zero-downtime restart: a new agent takes the running agent's listening
//! sockets over a Unix socket, so that not one connect is refused while the
//! versions change.
//!
//! The socket is a file, `<agent.state_dir>/run/handover-<pin dir name>.sock`, in a
//! directory that only the agent's user (root) may enter: whoever receives
//! the sockets can serve every redirected connection of the node and make
//! the running agent drain away, so nothing else may ask. (An abstract
//! socket has no permissions at all: anything in the network namespace
//! could.) Each side also checks the other with SO_PEERCRED before it
//! trusts it: uid 0, the same program (the file name of the peer's
//! executable equals this agent's; an upgrade is another binary, but still
//! `sluice`) and the same network namespace (the sockets handed over live
//! in it; two nodes' agents on one machine may share a state directory).
//!
//! 1. The new agent connects, checks that an agent answers, and asks
//!    (`HELLO`).
//! 2. The old agent checks who asks, sends every listening socket it has
//!    (SCM_RIGHTS) and keeps accepting on them.
//! 3. The new agent reuses the pinned maps, attaches its programs (which
//!    replaces the old links), starts accepting on the same sockets, says
//!    `READY`, and puts its own handover socket at the path: bound under a
//!    temporary name and renamed over the old one, so the path never
//!    leads nowhere and no retry waits for the old agent to let go.
//! 4. The old agent stops accepting, drains its open connections, and
//!    exits without detaching anything, removing any pin or touching the
//!    socket file: they are the new agent's now.
//!
//! Both processes accept from the same sockets for a moment, and each
//! connection is accepted by exactly one of them, so the kernel's accept
//! queue is never dropped. If the new agent dies before `READY`, the old one
//! notices the closed stream and goes on serving.
//!
//! A peer that fails the checks gets nothing: the running agent closes the
//! stream, counts it (`sluice_handover_refusals_total`) and goes on
//! serving. A starting agent that finds a stale file (a killed agent's:
//! nothing listens) or a listener that is not an agent is never blocked by
//! it: it removes the file and starts cold, or, with `--upgrade`, which
//! promises a running agent, refuses to start.

use std::{
    ffi::{OsStr, OsString},
    fmt,
    fs::{self, DirBuilder},
    io::{self, Write},
    mem::size_of,
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{
            ffi::OsStrExt,
            fs::{DirBuilderExt, MetadataExt, PermissionsExt},
            net::UnixStream,
        },
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use log::{info, warn};
use tokio::{io::AsyncReadExt, net::UnixListener, sync::oneshot};

use crate::{drain::DrainWatch, telemetry::Metrics};

const HELLO: &[u8] = b"sluice-handover/1 HELLO\n";
const READY: &[u8] = b"READY\n";
/// Most listening sockets one handover carries: outbound, inbound, admin,
/// metrics, and one outbound listener per pod on the node.
const MAX_FDS: usize = 253;
/// How long the old agent waits for `READY` before it gives up on this
/// successor and goes on serving.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long a starting agent waits for the listener at the path to take
/// its connection: a listener that never accepts must not hold the start.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// Below `agent.state_dir`: the directory of the handover socket.
const RUN_DIR: &str = "run";
const SOCKET_PREFIX: &str = "handover-";

/// The socket's file name: one per pin directory, because an agent is its
/// pinned programs and maps. Two agents with different pin directories in
/// one network namespace and state directory (a bench, a test) are not
/// versions of each other and must never meet. `handover-sluice.sock` for
/// the default `/sys/fs/bpf/sluice`; a hash for a name that is long or
/// unusual.
fn socket_file(pin_dir: &Path) -> String {
    let name = pin_dir.file_name().and_then(|n| n.to_str()).filter(|n| {
        n.len() <= 32
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    });
    match name {
        Some(name) => format!("{SOCKET_PREFIX}{name}.sock"),
        None => {
            let hash = pin_dir
                .as_os_str()
                .as_encoded_bytes()
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
                });
            format!("{SOCKET_PREFIX}{hash:016x}.sock")
        }
    }
}
/// `sun_path` holds 108 bytes, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;
/// The agent runs as root, and so does any successor it may trust.
const AGENT_UID: u32 = 0;

/// Why the handover socket cannot be used, or an upgrade cannot happen.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{} is owned by uid {owner}, not by the agent's uid {agent}: the handover socket needs a \
         directory only the agent can enter; remove the directory (the agent makes it) or chown it",
        path.display()
    )]
    NotOwned {
        path: PathBuf,
        owner: u32,
        agent: u32,
    },
    #[error(
        "{} is not a directory (a symbolic link or another file); remove it, the agent makes the \
         directory itself",
        path.display()
    )]
    NotADirectory { path: PathBuf },
    #[error(
        "the handover socket {} (and its temporary name) is longer than a Unix socket address \
         allows ({MAX_SOCKET_PATH} bytes); set a shorter agent.state_dir",
        path.display()
    )]
    PathTooLong { path: PathBuf },
    #[error("cannot tell which program this agent runs as: {0}")]
    Identity(io::Error),
    #[error("no running agent answers at {}{why}; start without --upgrade", path.display())]
    NoAgent { path: PathBuf, why: &'static str },
    #[error(
        "{} is held by {peer}, which is not this node's agent ({why}); stop that process, or start \
         without --upgrade, which replaces the file",
        path.display()
    )]
    NotAnAgent {
        path: PathBuf,
        peer: String,
        why: Refusal,
    },
    #[error("the running agent at {} did not hand over: {source}", path.display())]
    NoHandover { path: PathBuf, source: io::Error },
}

/// Why a peer on the handover socket is not trusted, as the `reason`
/// label of `sluice_handover_refusals_total` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its uid is not 0.
    NotRoot,
    /// Its executable is not called as this agent's (or cannot be read:
    /// the peer is gone, or in another PID namespace).
    OtherProgram,
    /// It runs in another network namespace, where these sockets are not.
    OtherNetworkNamespace,
    /// Its credentials could not be read.
    Unidentified,
    /// It passed the checks but did not ask for a handover.
    NoHello,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::NotRoot,
        Refusal::OtherProgram,
        Refusal::OtherNetworkNamespace,
        Refusal::Unidentified,
        Refusal::NoHello,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::NotRoot => "not_root",
            Refusal::OtherProgram => "other_program",
            Refusal::OtherNetworkNamespace => "other_network_namespace",
            Refusal::Unidentified => "unidentified",
            Refusal::NoHello => "no_hello",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::NotRoot => "not uid 0",
            Refusal::OtherProgram => "another program",
            Refusal::OtherNetworkNamespace => "another network namespace",
            Refusal::Unidentified => "credentials unreadable",
            Refusal::NoHello => "did not ask for a handover",
        })
    }
}

/// This agent as a peer must look: the file name of its executable and
/// its network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Me {
    program: OsString,
    /// Inode of the network namespace (`/proc/<pid>/ns/net`).
    netns: u64,
}

impl Me {
    /// This process.
    fn current() -> io::Result<Me> {
        let exe = std::env::current_exe()?;
        let program = program_name(&exe).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} has no file name", exe.display()),
            )
        })?;
        Ok(Me {
            program,
            netns: netns_of("self")?,
        })
    }
}

/// The process at the other end of a handover stream, from SO_PEERCRED:
/// for a connecting peer its own credentials, for the listening side
/// those of the process that called listen().
#[derive(Debug, Clone, PartialEq, Eq)]
struct Peer {
    /// None when the peer's PID namespace does not show it in ours.
    pid: Option<i32>,
    uid: u32,
    /// `/proc/<pid>/exe`: None when the process is gone or unreadable.
    exe: Option<PathBuf>,
    netns: Option<u64>,
}

impl Peer {
    fn of(stream: &tokio::net::UnixStream) -> io::Result<Peer> {
        let cred = stream.peer_cred()?;
        let pid = cred.pid().filter(|p| *p > 0);
        Ok(Peer {
            pid,
            uid: cred.uid(),
            exe: pid.and_then(|p| fs::read_link(format!("/proc/{p}/exe")).ok()),
            netns: pid.and_then(|p| netns_of(&p.to_string()).ok()),
        })
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid}")?,
            None => f.write_str("a process of another PID namespace")?,
        }
        write!(f, " (uid {}, ", self.uid)?;
        match &self.exe {
            Some(exe) => write!(f, "{})", exe.display()),
            None => f.write_str("executable unknown)"),
        }
    }
}

/// Whether `peer` may be this agent's predecessor or successor.
fn judge(peer: &Peer, me: &Me) -> Result<(), Refusal> {
    if peer.uid != AGENT_UID {
        return Err(Refusal::NotRoot);
    }
    // Names, not bytes: the successor of an upgrade is another binary.
    if peer.exe.as_deref().and_then(program_name).as_ref() != Some(&me.program) {
        return Err(Refusal::OtherProgram);
    }
    if peer.netns != Some(me.netns) {
        return Err(Refusal::OtherNetworkNamespace);
    }
    Ok(())
}

/// The file name of an executable as /proc shows it; a binary replaced on
/// disk since it started (a package upgrade) reads `NAME (deleted)`.
fn program_name(exe: &Path) -> Option<OsString> {
    let name = exe.file_name()?.as_bytes();
    let name = name.strip_suffix(b" (deleted)").unwrap_or(name);
    Some(OsStr::from_bytes(name).to_owned())
}

/// The inode of `/proc/<pid>/ns/net`: equal for two processes exactly when
/// they share a network namespace.
fn netns_of(pid: &str) -> io::Result<u64> {
    Ok(fs::metadata(format!("/proc/{pid}/ns/net"))?.ino())
}

/// Where this agent meets its predecessor and its successor.
#[derive(Debug)]
pub struct Handover {
    path: PathBuf,
    me: Me,
}

impl Handover {
    /// Makes `<state_dir>/run` (mode 0700), tightening a looser one and
    /// refusing one the agent's user does not own, and learns who this
    /// agent is.
    pub fn prepare(state_dir: &Path, pin_dir: &Path) -> Result<Handover, HandoverError> {
        let dir = state_dir.join(RUN_DIR);
        let path = dir.join(socket_file(pin_dir));
        if temp_path(&path).as_os_str().len() > MAX_SOCKET_PATH {
            return Err(HandoverError::PathTooLong { path });
        }
        make_private_dir(&dir)?;
        Ok(Handover {
            path,
            me: Me::current().map_err(HandoverError::Identity)?,
        })
    }

    /// The socket file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Asks the running agent for its listening sockets. Nothing there, a
    /// stale file or a listener that is not an agent: no sockets (the
    /// file is removed), or an error with `upgrade`, which requires an
    /// agent.
    pub async fn take_over(&self, upgrade: bool) -> Result<Inherited, HandoverError> {
        let path = &self.path;
        let stream =
            match tokio::time::timeout(CONNECT_WITHIN, tokio::net::UnixStream::connect(path)).await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
                    return if upgrade {
                        Err(HandoverError::NoAgent {
                            path: path.clone(),
                            why: "",
                        })
                    } else {
                        Ok(Inherited::none())
                    };
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    return self.start_cold(upgrade, Found::Stale);
                }
                // A full backlog, or a listener slower than a running
                // agent ever is: nothing that will hand over.
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.start_cold(upgrade, Found::NotAccepting);
                }
                Err(_) => return self.start_cold(upgrade, Found::NotAccepting),
                Ok(Err(source)) => {
                    return Err(HandoverError::Io {
                        path: path.clone(),
                        source,
                    });
                }
            };
        let peer = Peer::of(&stream).map_err(|source| HandoverError::Io {
            path: path.clone(),
            source,
        })?;
        if let Err(why) = judge(&peer, &self.me) {
            // Not a word to it: it may be anything.
            drop(stream);
            return self.start_cold(upgrade, Found::NotAnAgent(peer, why));
        }
        let no_handover = |source| HandoverError::NoHandover {
            path: path.clone(),
            source,
        };
        let stream = stream.into_std().map_err(no_handover)?;
        stream.set_nonblocking(false).map_err(no_handover)?;
        receive(stream).map_err(no_handover)
    }

    /// Without `upgrade`: removes what was found at the path, and the agent
    /// starts without inherited sockets (its own listen() puts a socket
    /// there later). With it: the error naming the path.
    fn start_cold(&self, upgrade: bool, found: Found) -> Result<Inherited, HandoverError> {
        let path = self.path.clone();
        if upgrade {
            return Err(match found {
                Found::Stale => HandoverError::NoAgent {
                    path,
                    why: " (a stale socket file: nothing listens on it)",
                },
                Found::NotAccepting => HandoverError::NoAgent {
                    path,
                    why: " (the listener there does not accept)",
                },
                Found::NotAnAgent(peer, why) => HandoverError::NotAnAgent {
                    path,
                    peer: peer.to_string(),
                    why,
                },
            });
        }
        match &found {
            Found::Stale => warn!(
                "{}: a stale handover socket (nothing listens on it); removed, starting cold",
                path.display()
            ),
            Found::NotAccepting => warn!(
                "{}: the listener there does not accept; removed, starting cold",
                path.display()
            ),
            Found::NotAnAgent(peer, why) => warn!(
                "{}: held by {peer}, which is not this node's agent ({why}); removed, starting cold",
                path.display()
            ),
        }
        match fs::remove_file(&path) {
            Ok(()) => Ok(Inherited::none()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Inherited::none()),
            Err(source) => Err(HandoverError::Io { path, source }),
        }
    }

    /// Puts this agent's handover socket at the path, replacing whatever
    /// is there in one rename: after an upgrade that is the previous
    /// agent's socket, which stops listening once it has read `READY`.
    pub fn listen(&self) -> Result<Listening, HandoverError> {
        let temp = temp_path(&self.path);
        let at = |path: &Path| {
            let path = path.to_owned();
            move |source| HandoverError::Io { path, source }
        };
        match fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(at(&temp)(e)),
        }
        let std_listener = std::os::unix::net::UnixListener::bind(&temp).map_err(at(&temp))?;
        let meta = fs::symlink_metadata(&temp).map_err(at(&temp))?;
        if let Err(e) = fs::rename(&temp, &self.path) {
            let _ = fs::remove_file(&temp);
            return Err(at(&self.path)(e));
        }
        std_listener.set_nonblocking(true).map_err(at(&self.path))?;
        Ok(Listening {
            listener: UnixListener::from_std(std_listener).map_err(at(&self.path))?,
            file: SocketFile {
                path: self.path.clone(),
                dev: meta.dev(),
                ino: meta.ino(),
            },
            me: self.me.clone(),
        })
    }
}

/// What a starting agent found at the path instead of an agent.
enum Found {
    /// A socket file nobody listens on (ECONNREFUSED).
    Stale,
    /// A listener that did not take the connection in time.
    NotAccepting,
    /// A listener run by something else.
    NotAnAgent(Peer, Refusal),
}

/// `PATH.<pid>`: where this agent binds before renaming over the path, in
/// the same directory (rename() stays within one filesystem).
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}", std::process::id()));
    PathBuf::from(name)
}

/// `dir` exists, is a directory (not a link to one) owned by this user,
/// and only this user may enter it.
fn make_private_dir(dir: &Path) -> Result<(), HandoverError> {
    let at = |source| HandoverError::Io {
        path: dir.to_owned(),
        source,
    };
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).map_err(|source| HandoverError::Io {
            path: parent.to_owned(),
            source,
        })?;
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(at(e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(at)?;
    if !meta.file_type().is_dir() {
        return Err(HandoverError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let agent = unsafe { libc::geteuid() };
    if meta.uid() != agent {
        return Err(HandoverError::NotOwned {
            path: dir.to_owned(),
            owner: meta.uid(),
            agent,
        });
    }
    if meta.mode() & 0o777 != 0o700 {
        warn!(
            "{}: mode {:o}, but only the agent may reach the handover socket; setting 0700",
            dir.display(),
            meta.mode() & 0o7777
        );
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(at)?;
    }
    Ok(())
}

/// The rest of a successor's side, once the peer passed [`judge`]: asks
/// and receives the listening sockets.
fn receive(mut stream: UnixStream) -> io::Result<Inherited> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(HELLO)?;
    let mut buf = [0u8; 64];
    let (n, fds) = recv_fds(&stream, &mut buf)?;
    if n == 0 || fds.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "it answered without sockets: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
        ));
    }
    let mut sockets = Vec::with_capacity(fds.len());
    for fd in fds {
        let std_listener = std::net::TcpListener::from(fd);
        let addr = std_listener.local_addr()?;
        let netns = crate::netns::netns_cookie(&std_listener)?;
        sockets.push((addr, netns, OwnedFd::from(std_listener)));
    }
    info!(
        "upgrade: took over {} listening sockets from the running agent",
        sockets.len()
    );
    stream.set_read_timeout(None)?;
    Ok(Inherited {
        sockets: Mutex::new(sockets),
        stream: Mutex::new(Some(stream)),
    })
}

/// Listening sockets received from the previous agent, taken one by one
/// by the listeners that bind the same address.
#[derive(Debug, Default)]
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

/// The listening sockets this agent would hand over now: the fixed ones
/// (outbound, inbound, admin, metrics) and one per pod namespace, which come and go
/// with the pods (keyed by namespace cookie).
#[derive(Default, Clone)]
pub struct Offered {
    sockets: Arc<Mutex<Vec<OfferedSocket>>>,
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

/// The running agent's handover socket, bound at its path.
pub struct Listening {
    listener: UnixListener,
    file: SocketFile,
    me: Me,
}

impl Listening {
    /// The file, to remove when this agent stops.
    pub fn file(&self) -> SocketFile {
        self.file.clone()
    }
}

/// The socket file one agent bound, known by its inode: the path may lead
/// to a successor's socket later.
#[derive(Debug, Clone)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Removes the file if the path still leads to this agent's socket; a
    /// successor's (renamed over it) stays. For an agent that stops
    /// without a successor: a clean stop leaves no stale file.
    pub fn remove_if_ours(&self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours && let Err(e) = fs::remove_file(&self.path) {
            warn!(
                "cannot remove the handover socket {}: {e}",
                self.path.display()
            );
        }
    }
}

/// The running agent's side: offers `sockets` to a successor that passes
/// the checks, on `listening`. Resolves `handed_over` once a successor
/// said `READY`. Refused peers are counted in `metrics`.
pub async fn offer(
    listening: Listening,
    sockets: Offered,
    metrics: Arc<Metrics>,
    handed_over: oneshot::Sender<()>,
    mut drain: DrainWatch,
) {
    let Listening { listener, file, me } = listening;
    let path = file.path.display();
    let refuse = |peer: &dyn fmt::Display, why: Refusal| {
        metrics.handover_refused(why.name());
        warn!("handover socket {path}: refused {peer} ({why}); it gets no socket");
    };
    loop {
        let mut stream = tokio::select! {
            _ = drain.draining() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!("handover socket {path}: {e}");
                    continue;
                }
            },
        };
        // Before a byte is read or sent.
        let peer = match Peer::of(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                refuse(&format_args!("a peer ({e})"), Refusal::Unidentified);
                continue;
            }
        };
        if let Err(why) = judge(&peer, &me) {
            refuse(&peer, why);
            continue;
        }
        let mut hello = [0u8; HELLO.len()];
        let asked = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut hello))
            .await
            .is_ok_and(|r| r.is_ok());
        if !asked || hello != HELLO {
            refuse(&peer, Refusal::NoHello);
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
        info!(
            "upgrade: a new agent, {peer}, took the listening sockets; waiting for it to be ready"
        );
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn me(program: &str) -> Me {
        Me {
            program: program.into(),
            netns: netns_of("self").unwrap(),
        }
    }

    fn agent_peer(exe: &str) -> Peer {
        Peer {
            pid: Some(4242),
            uid: 0,
            exe: Some(PathBuf::from(exe)),
            netns: Some(netns_of("self").unwrap()),
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sluice-handover-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn an_agent_under_another_path_or_replaced_on_disk_is_still_the_agent() {
        let me = me("sluice");
        assert_eq!(judge(&agent_peer("/usr/local/bin/sluice"), &me), Ok(()));
        assert_eq!(judge(&agent_peer("/opt/new/sluice (deleted)"), &me), Ok(()));
    }

    #[test]
    fn anything_but_root_running_the_agent_in_its_namespace_is_refused() {
        let me = me("sluice");
        let peer = agent_peer("/usr/local/bin/sluice");
        let not_root = Peer {
            uid: 1000,
            ..peer.clone()
        };
        assert_eq!(judge(&not_root, &me), Err(Refusal::NotRoot));
        for exe in ["/usr/bin/python3", "/usr/bin/sluice-old", "/tmp/sluicex"] {
            let other = Peer {
                exe: Some(exe.into()),
                ..peer.clone()
            };
            assert_eq!(judge(&other, &me), Err(Refusal::OtherProgram), "{exe}");
        }
        // Another PID namespace: no pid, no executable to look at.
        let hidden = Peer {
            pid: None,
            exe: None,
            netns: None,
            ..peer.clone()
        };
        assert_eq!(judge(&hidden, &me), Err(Refusal::OtherProgram));
        let elsewhere = Peer {
            netns: Some(me.netns + 1),
            ..peer
        };
        assert_eq!(judge(&elsewhere, &me), Err(Refusal::OtherNetworkNamespace));
    }

    #[tokio::test]
    async fn peer_credentials_name_the_process_at_the_other_end() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let peer = Peer::of(&a).unwrap();
        assert_eq!(peer.pid, Some(std::process::id() as i32));
        // SAFETY: geteuid has no preconditions.
        assert_eq!(peer.uid, unsafe { libc::geteuid() });
        let current = Me::current().unwrap();
        assert_eq!(
            peer.exe.as_deref().and_then(program_name),
            Some(current.program.clone())
        );
        assert_eq!(peer.netns, Some(current.netns));
        // This test binary is not called `sluice`.
        assert_eq!(judge(&peer, &me("sluice")).ok(), None);
    }

    #[test]
    fn the_run_directory_is_made_private_and_a_looser_one_tightened() {
        let state = temp_dir("private");
        let handover = Handover::prepare(&state, Path::new("/sys/fs/bpf/sluice")).unwrap();
        let run = state.join("run");
        assert_eq!(handover.path(), run.join("handover-sluice.sock"));
        assert_eq!(
            socket_file(Path::new("/sys/fs/bpf/a dir with spaces")),
            socket_file(Path::new("/sys/fs/bpf/a dir with spaces"))
        );
        assert_ne!(
            socket_file(Path::new("/x/a dir with spaces")),
            socket_file(Path::new("/y/a dir with spaces"))
        );
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&run), 0o700);
        fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
        Handover::prepare(&state, Path::new("/sys/fs/bpf/sluice")).unwrap();
        assert_eq!(mode(&run), 0o700);
        fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn a_run_directory_that_is_a_link_or_someone_elses_is_refused_by_name() {
        let state = temp_dir("refused");
        let run = state.join("run");
        let elsewhere = state.join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &run).unwrap();
        let e = Handover::prepare(&state, Path::new("/sys/fs/bpf/sluice")).unwrap_err();
        assert!(matches!(e, HandoverError::NotADirectory { .. }), "{e}");
        assert!(e.to_string().contains(&run.display().to_string()), "{e}");
        fs::remove_file(&run).unwrap();
        // Only root can give a directory away; the tests run as root.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            fs::create_dir(&run).unwrap();
            std::os::unix::fs::chown(&run, Some(1000), None).unwrap();
            let e = Handover::prepare(&state, Path::new("/sys/fs/bpf/sluice")).unwrap_err();
            assert!(
                matches!(e, HandoverError::NotOwned { owner: 1000, .. }),
                "{e}"
            );
            assert!(e.to_string().contains(&run.display().to_string()), "{e}");
        }
        fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn a_state_dir_too_long_for_a_socket_address_is_refused() {
        let long = PathBuf::from("/").join("s".repeat(100));
        let e = Handover::prepare(&long, Path::new("/sys/fs/bpf/sluice")).unwrap_err();
        assert!(matches!(e, HandoverError::PathTooLong { .. }), "{e}");
    }

    fn handover_as(state: &Path, program: &str) -> Handover {
        let mut handover = Handover::prepare(state, Path::new("/sys/fs/bpf/sluice")).unwrap();
        handover.me = me(program);
        handover
    }

    #[tokio::test]
    async fn nothing_a_stale_file_or_a_squatter_means_a_cold_start_unless_upgrading() {
        let state = temp_dir("cold");
        let handover = handover_as(&state, "sluice");
        let path = handover.path().to_owned();

        // Nothing at the path.
        assert!(!handover.take_over(false).await.unwrap().is_upgrade());
        let e = handover.take_over(true).await.unwrap_err();
        assert!(e.to_string().contains("no running agent answers"), "{e}");

        // A stale file: bound, and its listener gone.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let e = handover.take_over(true).await.unwrap_err();
        assert!(matches!(e, HandoverError::NoAgent { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert!(path.exists(), "--upgrade must leave the file alone");
        assert!(!handover.take_over(false).await.unwrap().is_upgrade());
        assert!(!path.exists(), "the stale file stays");

        // A live listener that is not an agent (this test binary).
        let squatter = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let e = handover.take_over(true).await.unwrap_err();
        assert!(
            matches!(
                e,
                HandoverError::NotAnAgent {
                    why: Refusal::OtherProgram,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        assert!(!handover.take_over(false).await.unwrap().is_upgrade());
        assert!(!path.exists(), "the squatter's file stays");
        drop(squatter);
        fs::remove_dir_all(&state).unwrap();
    }

    /// What a peer gets from the agent at `path` after asking: (bytes,
    /// descriptors). A closed stream reads as nothing.
    fn ask(path: &Path) -> (usize, usize) {
        let mut stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // The agent may close before reading: a broken pipe is an answer.
        let _ = stream.write_all(HELLO);
        let mut buf = [0u8; 64];
        match recv_fds(&stream, &mut buf) {
            Ok((n, fds)) => (n, fds.len()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => (0, 0),
            Err(e) => panic!("{e}"),
        }
    }

    fn refusals(metrics: &Metrics, reason: &str) -> u64 {
        let needle = format!("sluice_handover_refusals_total{{reason=\"{reason}\"}} ");
        metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(needle.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_is_not_the_agent_gets_nothing_and_the_agent_keeps_offering() {
        let state = temp_dir("offer");
        let running = handover_as(&state, "sluice");
        let offered = Offered::default();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        offered.add_fixed(OwnedFd::from(tcp));
        let metrics = Metrics::new(None);
        let (handed_over_tx, _handed_over) = oneshot::channel();
        let (_trigger, watch) = crate::drain::channel();
        let listening = running.listen().unwrap();
        let path = running.path().to_owned();
        tokio::spawn(offer(
            listening,
            offered,
            metrics.clone(),
            handed_over_tx,
            watch,
        ));
        for round in 1..=2 {
            let p = path.clone();
            let answer = tokio::task::spawn_blocking(move || ask(&p)).await.unwrap();
            assert_eq!(answer, (0, 0), "round {round}");
            let until = tokio::time::Instant::now() + Duration::from_secs(5);
            while refusals(&metrics, "other_program") < round && tokio::time::Instant::now() < until
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(refusals(&metrics, "other_program"), round);
        }
        fs::remove_dir_all(&state).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_takes_the_sockets_over_and_its_socket_replaces_the_old_one() {
        let state = temp_dir("upgrade");
        // Both sides are this test binary: it is the agent here.
        let old = Handover::prepare(&state, Path::new("/sys/fs/bpf/sluice")).unwrap();
        let offered = Offered::default();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let netns = crate::netns::netns_cookie(&tcp).unwrap();
        offered.add_fixed(OwnedFd::from(tcp));
        let (handed_over_tx, handed_over) = oneshot::channel();
        let (_trigger, watch) = crate::drain::channel();
        let listening = old.listen().unwrap();
        let old_file = listening.file();
        tokio::spawn(offer(
            listening,
            offered,
            Metrics::new(None),
            handed_over_tx,
            watch,
        ));

        let new = Handover::prepare(&state, Path::new("/sys/fs/bpf/sluice")).unwrap();
        let inherited = new.take_over(true).await.unwrap();
        assert!(inherited.is_upgrade());
        assert!(inherited.take(addr, netns).is_some());
        inherited.ready();
        tokio::time::timeout(Duration::from_secs(5), handed_over)
            .await
            .expect("READY reaches the old agent")
            .unwrap();
        // The successor's socket replaces the old one at the path, and the
        // old agent leaving removes nothing of it.
        let new_file = new.listen().unwrap().file();
        old_file.remove_if_ours();
        assert!(new.path().exists());
        new_file.remove_if_ours();
        assert!(!new.path().exists());
        fs::remove_dir_all(&state).unwrap();
    }
}
