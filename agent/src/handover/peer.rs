//! Who is at the other end of the handover socket, from SO_PEERCRED and
//! /proc, and whether it may be this agent's predecessor or successor:
//! uid 0, the same program, the same network namespace.

use std::{
    ffi::{OsStr, OsString},
    fmt, fs, io,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
};

/// The agent runs as root, and so does any successor it may trust.
const AGENT_UID: u32 = 0;

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
pub(super) struct Me {
    program: OsString,
    /// Inode of the network namespace (`/proc/<pid>/ns/net`).
    netns: u64,
}

impl Me {
    /// This process.
    pub(super) fn current() -> io::Result<Me> {
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
pub(super) struct Peer {
    /// None when the peer's PID namespace does not show it in ours.
    pid: Option<i32>,
    uid: u32,
    /// `/proc/<pid>/exe`: None when the process is gone or unreadable.
    exe: Option<PathBuf>,
    netns: Option<u64>,
}

impl Peer {
    pub(super) fn of(stream: &tokio::net::UnixStream) -> io::Result<Peer> {
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
pub(super) fn judge(peer: &Peer, me: &Me) -> Result<(), Refusal> {
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// This process, as if its executable were called `program`.
    pub(in crate::handover) fn me(program: &str) -> Me {
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
}
