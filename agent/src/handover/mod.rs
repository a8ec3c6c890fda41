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
//! 4. The old agent stops accepting, suspends its open connections where
//!    no byte is half moved and sends them on the same stream (sockets and
//!    what each copy had in hand, see [`crate::proxy::moved`]), then `DONE`;
//!    the new agent carries them on. Connections that cannot move (mTLS,
//!    for now) are drained as before. The old agent then exits without
//!    detaching anything, removing any pin or touching the socket file:
//!    they are the new agent's now.
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
//!
//! By concern: `file` is the socket file and its private directory,
//! `peer` who is at the other end and whether to trust it, `wire` the
//! messages and the descriptors they carry, `take_over` the starting
//! agent's side and `offer` the running agent's, `successor` step 4 from
//! each.

mod file;
mod offer;
mod peer;
mod successor;
mod take_over;
mod wire;

use std::{
    io,
    path::{Path, PathBuf},
};

pub use file::{Listening, SocketFile};
pub use offer::{Offered, StateSnapshot, offer};
pub use peer::Refusal;
pub use successor::{Batch, MAX_BATCH, Predecessor, Successor};
pub use take_over::Inherited;

use file::{MAX_SOCKET_PATH, make_private_dir, socket_file, temp_path};
use peer::Me;

/// Below `agent.state_dir`: the directory of the handover socket.
const RUN_DIR: &str = "run";

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

    /// Where this node's agents record the cgroups they made, so that the
    /// last one removes them whichever made them: beside the socket, in
    /// the directory only the agent's user may enter.
    pub fn cgroups_record(&self) -> PathBuf {
        self.path.with_extension("cgroups")
    }
}

/// What the tests of every part of the handover share: a scratch state
/// directory and an agent that believes it is some program.
#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// An empty directory of its own for the test `tag`.
    pub(super) fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sluice-handover-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A handover in `state` whose agent believes it runs `program`.
    pub(super) fn handover_as(state: &Path, program: &str) -> Handover {
        let mut handover = Handover::prepare(state, Path::new("/sys/fs/bpf/sluice")).unwrap();
        handover.me = peer::tests::me(program);
        handover
    }
}
