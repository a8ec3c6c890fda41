//! The running agent's side: the listening sockets on offer, and the loop
//! that hands them to a successor that passes the checks and asks.

use std::{
    fmt,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex},
    time::Duration,
};

use log::{info, warn};
use tokio::sync::oneshot;

use super::{
    file::Listening,
    peer::{Peer, Refusal, judge},
    successor::Successor,
    wire,
};
use crate::{drain::DrainWatch, telemetry::Metrics};

/// How long the old agent waits for `HELLO` from a peer that passed the
/// checks.
const HELLO_WITHIN: Duration = Duration::from_secs(5);
/// How long the old agent waits for `READY` before it gives up on this
/// successor and goes on serving.
const READY_WITHIN: Duration = Duration::from_secs(60);

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

/// What the running agent knows of its endpoints (breakers, outlier
/// detection, health), serialized for the successor.
pub type StateSnapshot = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// The running agent's side: offers `sockets` and `state` to a successor
/// that passes the checks, on `listening`. Resolves `handed_over` once a
/// successor said `READY`, with the stream its open connections go on.
/// Refused peers are counted in `metrics`.
pub async fn offer(
    listening: Listening,
    sockets: Offered,
    state: StateSnapshot,
    metrics: Arc<Metrics>,
    handed_over: oneshot::Sender<Successor>,
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
        let Some(version) = wire::asked(&mut stream, HELLO_WITHIN).await else {
            refuse(&peer, Refusal::NoHello);
            continue;
        };
        if let Err(e) = wire::send_sockets(&stream, &sockets.raw()) {
            warn!("upgrade: cannot hand the listening sockets over: {e}");
            continue;
        }
        if version == wire::Version::V2
            && let Err(e) = wire::send_state(&mut stream, &state()).await
        {
            warn!("upgrade: cannot hand the endpoints' state over: {e}");
            continue;
        }
        info!(
            "upgrade: a new agent, {peer}, took the listening sockets; waiting for it to be ready"
        );
        if wire::ready(&mut stream, READY_WITHIN).await {
            match blocking(stream) {
                Ok(stream) => {
                    let moves = version == wire::Version::V2;
                    let _ = handed_over.send(Successor { stream, moves });
                }
                Err(e) => warn!("upgrade: the stream to the new agent: {e}; still serving"),
            }
            return;
        }
        warn!("upgrade: the new agent went away before it was ready; still serving");
    }
}

/// The stream as step 4 uses it: blocking, on a thread of its own.
fn blocking(stream: tokio::net::UnixStream) -> std::io::Result<std::os::unix::net::UnixStream> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::{
        fs, io,
        io::Write,
        os::unix::net::UnixStream,
        path::{Path, PathBuf},
    };

    use super::{
        super::{
            Handover,
            tests::{handover_as, temp_dir},
            wire::MAX_FDS,
        },
        *,
    };

    /// A successor's steps 1 and 2, from a blocking thread: the stream,
    /// and the sockets it got (an error for none).
    async fn ask(path: &Path) -> (UnixStream, io::Result<Vec<OwnedFd>>) {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut stream = UnixStream::connect(&path).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let got = wire::ask(&mut stream, wire::Version::V2).map(|(fds, state)| {
                assert!(state.is_some(), "version 2 carries the state");
                fds
            });
            (stream, got)
        })
        .await
        .unwrap()
    }

    /// A peer that says `words` instead of asking: what it hears back
    /// before the stream ends.
    async fn say(path: &Path, words: &'static [u8]) -> Vec<u8> {
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut stream = UnixStream::connect(&path).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            // The agent may close before reading: a broken pipe is an end.
            let _ = stream.write_all(words);
            let mut heard = Vec::new();
            match io::Read::read_to_end(&mut stream, &mut heard) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("{e}"),
            }
            heard
        })
        .await
        .unwrap()
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

    /// A running agent (this test binary, believing it runs `program`)
    /// offering one TCP listener: its path, the offer, its metrics and
    /// what resolves on a handover.
    struct Running {
        state: PathBuf,
        path: PathBuf,
        offered: Offered,
        metrics: Arc<Metrics>,
        handed_over: oneshot::Receiver<Successor>,
        _drain: crate::drain::DrainTrigger,
    }

    fn run(tag: &str, handover: impl FnOnce(&Path) -> Handover) -> Running {
        let state = temp_dir(tag);
        let running = handover(&state);
        let offered = Offered::default();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        offered.add_fixed(OwnedFd::from(tcp));
        let metrics = Metrics::new(None);
        let (handed_over_tx, handed_over) = oneshot::channel();
        let (trigger, watch) = crate::drain::channel();
        let listening = running.listen().unwrap();
        tokio::spawn(offer(
            listening,
            offered.clone(),
            Arc::new(|| b"{}".to_vec()),
            metrics.clone(),
            handed_over_tx,
            watch,
        ));
        Running {
            state,
            path: running.path().to_owned(),
            offered,
            metrics,
            handed_over,
            _drain: trigger,
        }
    }

    fn as_this_binary(state: &Path) -> Handover {
        Handover::prepare(state, Path::new("/sys/fs/bpf/sluice")).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_is_not_the_agent_gets_nothing_and_the_agent_keeps_offering() {
        let running = run("offer", |state| handover_as(state, "sluice"));
        for round in 1..=2 {
            let (_, got) = ask(&running.path).await;
            assert!(got.is_err(), "round {round}");
            let until = tokio::time::Instant::now() + Duration::from_secs(5);
            while refusals(&running.metrics, "other_program") < round
                && tokio::time::Instant::now() < until
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(refusals(&running.metrics, "other_program"), round);
        }
        fs::remove_dir_all(&running.state).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_takes_the_sockets_over_and_its_socket_replaces_the_old_one() {
        let state = temp_dir("upgrade");
        // Both sides are this test binary: it is the agent here.
        let old = as_this_binary(&state);
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
            Arc::new(|| b"{\"endpoints\":1}".to_vec()),
            Metrics::new(None),
            handed_over_tx,
            watch,
        ));

        let new = as_this_binary(&state);
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_agent_that_does_not_say_hello_is_refused_and_the_next_one_served() {
        let mut running = run("hello", as_this_binary);
        let heard = say(&running.path, b"sluice-handover/3 HELLO\n").await;
        assert!(heard.is_empty(), "nothing for another version: {heard:?}");
        let (_, got) = ask(&running.path).await;
        assert_eq!(got.unwrap().len(), 1);
        // The refusal was counted before the next peer was taken.
        assert_eq!(refusals(&running.metrics, "no_hello"), 1);
        assert!(running.handed_over.try_recv().is_err(), "no READY yet");
        fs::remove_dir_all(&running.state).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_successor_that_leaves_or_garbles_ready_leaves_the_agent_serving() {
        let mut running = run("ready", as_this_binary);
        // Takes the sockets and goes away.
        let (stream, got) = ask(&running.path).await;
        assert_eq!(got.unwrap().len(), 1);
        drop(stream);
        // Takes them and says something else.
        let (mut stream, got) = ask(&running.path).await;
        assert_eq!(got.unwrap().len(), 1);
        stream.write_all(b"READX\n").unwrap();
        drop(stream);
        // The running agent still offers, and has not let go.
        let (mut stream, got) = ask(&running.path).await;
        assert_eq!(got.unwrap().len(), 1);
        assert!(running.handed_over.try_recv().is_err());
        wire::say_ready(&mut stream).unwrap();
        tokio::time::timeout(Duration::from_secs(5), running.handed_over)
            .await
            .expect("READY reaches the old agent")
            .unwrap();
        fs::remove_dir_all(&running.state).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_sockets_than_a_handover_carries_are_not_sent_and_a_pod_leaving_fixes_it() {
        let running = run("many", as_this_binary);
        let pod = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        for _ in 0..MAX_FDS {
            running
                .offered
                .add(7, OwnedFd::from(pod.try_clone().unwrap()));
        }
        let (_, got) = ask(&running.path).await;
        let e = got.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        running.offered.remove(7);
        let (_, got) = ask(&running.path).await;
        assert_eq!(got.unwrap().len(), 1, "the fixed socket alone");
        fs::remove_dir_all(&running.state).unwrap();
    }
}
