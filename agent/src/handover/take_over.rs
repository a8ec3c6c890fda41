//! The starting agent's side: ask whoever holds the socket file for its
//! listening sockets, or start cold when nothing there is an agent.

use std::{
    fs, io,
    net::SocketAddr,
    os::{fd::OwnedFd, unix::net::UnixStream},
    sync::Mutex,
    time::Duration,
};

use log::{info, warn};

use super::{
    Handover, HandoverError,
    peer::{Peer, Refusal, judge},
    successor::Predecessor,
    wire::{self, Version},
};

/// How long a starting agent waits for the listener at the path to take
/// its connection: a listener that never accepts must not hold the start.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// How long a starting agent waits for the running one to answer `HELLO`.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

impl Handover {
    /// Asks the running agent for its listening sockets. Nothing there, a
    /// stale file or a listener that is not an agent: no sockets (the
    /// file is removed), or an error with `upgrade`, which requires an
    /// agent.
    pub async fn take_over(&self, upgrade: bool) -> Result<Inherited, HandoverError> {
        match self.take_over_in(upgrade, Version::V2).await {
            // An agent of the version before closes the stream on this
            // version's question: ask again in its words.
            Err(HandoverError::NoHandover { source, .. })
                if source.kind() == io::ErrorKind::UnexpectedEof =>
            {
                info!(
                    "upgrade: the running agent speaks the handover of version 1; its open connections drain there"
                );
                self.take_over_in(upgrade, Version::V1).await
            }
            other => other,
        }
    }

    async fn take_over_in(
        &self,
        upgrade: bool,
        version: Version,
    ) -> Result<Inherited, HandoverError> {
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
        receive(stream, version).map_err(no_handover)
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

/// The rest of a successor's side, once the peer passed [`judge`]: asks
/// and receives the listening sockets.
fn receive(mut stream: UnixStream, version: Version) -> io::Result<Inherited> {
    stream.set_read_timeout(Some(ANSWER_WITHIN))?;
    let (fds, state) = wire::ask(&mut stream, version)?;
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
        state: Mutex::new(state),
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
    /// What the old agent knew of its endpoints, serialized.
    state: Mutex<Option<Vec<u8>>>,
}

impl Inherited {
    /// Nothing inherited: every listener binds its own socket.
    pub fn none() -> Inherited {
        Inherited::default()
    }

    /// Sockets as a successor would have received them (unit tests of
    /// the listeners that take them over).
    #[cfg(test)]
    pub(crate) fn with_sockets(sockets: Vec<(SocketAddr, u64, OwnedFd)>) -> Inherited {
        Inherited {
            sockets: Mutex::new(sockets),
            stream: Mutex::new(None),
            state: Mutex::new(None),
        }
    }

    /// The previous agent's endpoint state, once (none from an agent of
    /// version 1, or without an upgrade).
    pub fn take_state(&self) -> Option<Vec<u8>> {
        self.state.lock().expect("handover lock").take()
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

    /// Tells the previous agent to stop accepting and send its open
    /// connections, which come on the returned stream. The sockets it sent
    /// that no listener took are closed here.
    pub fn ready(&self) -> Option<Predecessor> {
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
        let mut stream = self.stream.lock().expect("handover lock").take()?;
        match wire::say_ready(&mut stream) {
            Ok(()) => {
                info!("upgrade: serving; the previous agent hands its connections over and exits");
                Some(Predecessor(stream))
            }
            Err(e) => {
                warn!("upgrade: cannot tell the previous agent to hand over: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        super::tests::{handover_as, temp_dir},
        *,
    };

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

    #[test]
    fn inherited_sockets_go_to_the_listener_of_their_address_and_namespace_once() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let netns = crate::netns::netns_cookie(&tcp).unwrap();
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let inherited = Inherited {
            sockets: Mutex::new(vec![(addr, netns, OwnedFd::from(tcp))]),
            stream: Mutex::new(Some(ours)),
            state: Mutex::default(),
        };
        assert!(inherited.is_upgrade());
        assert!(inherited.take(addr, netns + 1).is_none(), "another netns");
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(inherited.take(other, netns).is_none(), "another address");
        let fd = inherited.take(addr, netns).expect("its socket");
        let listener = std::net::TcpListener::from(fd);
        assert_eq!(listener.local_addr().unwrap(), addr);
        assert!(inherited.take(addr, netns).is_none(), "taken once");
    }

    #[test]
    fn ready_reaches_the_previous_agent_once() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let inherited = Inherited {
            sockets: Mutex::default(),
            stream: Mutex::new(Some(ours)),
            state: Mutex::default(),
        };
        assert!(inherited.ready().is_some());
        assert!(!inherited.is_upgrade(), "the stream is spent");
        assert!(inherited.ready().is_none());
        let mut said = Vec::new();
        io::Read::read_to_end(&mut theirs, &mut said).unwrap();
        assert_eq!(said, b"READY\n");
    }
}
