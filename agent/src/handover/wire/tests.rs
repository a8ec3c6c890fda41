//! The handover's messages over socket pairs: descriptors arrive whole and
//! working, and only the exact words of each step count.

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
    let e = ask(&mut successor, Version::V1).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("without sockets"), "{e}");
}

#[test]
fn a_successor_asks_and_gets_the_sockets() {
    let (mut successor, agent) = UnixStream::pair().unwrap();
    let (mut reader, writer) = std::io::pipe().unwrap();
    send_sockets(&agent, &[writer.as_raw_fd()]).unwrap();
    let (fds, state) = ask(&mut successor, Version::V1).unwrap();
    assert!(state.is_none());
    assert_eq!(fds.len(), 1);
    write_through(fds.into_iter().next().unwrap(), b'k');
    assert_eq!(read_byte(&mut reader), b'k');
    // What the successor said first.
    let mut agent = agent;
    let mut hello = vec![0u8; HELLO_V1.len()];
    agent.read_exact(&mut hello).unwrap();
    assert_eq!(hello, HELLO_V1);
}

#[test]
fn a_running_agent_that_closes_or_answers_otherwise_hands_nothing_over() {
    // It reads the question and goes away.
    let (mut successor, mut agent) = UnixStream::pair().unwrap();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut hello = vec![0u8; HELLO_V2.len()];
            agent.read_exact(&mut hello).unwrap();
        });
        let e = ask(&mut successor, Version::V2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    });

    // Something that is not a handover answers.
    let (mut successor, mut agent) = UnixStream::pair().unwrap();
    agent.write_all(b"HTTP/1.1 400 Bad Request\r\n").unwrap();
    let e = ask(&mut successor, Version::V2).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("HTTP/1.1 400"), "{e}");

    // Nobody is there any more when it asks.
    let (mut successor, agent) = UnixStream::pair().unwrap();
    drop(agent);
    let e = ask(&mut successor, Version::V2).unwrap_err();
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
    peer.write_all(HELLO_V2).unwrap();
    assert_eq!(asked(&mut agent, WITHIN).await, Some(Version::V2));

    let (mut peer, mut agent) = async_pair();
    peer.write_all(HELLO_V1).unwrap();
    assert_eq!(asked(&mut agent, WITHIN).await, Some(Version::V1));

    let (mut peer, mut agent) = async_pair();
    peer.write_all(b"sluice-handover/3 HELLO\n").unwrap();
    assert_eq!(asked(&mut agent, WITHIN).await, None, "another version");

    // Cut short by a close: no wait for the time limit.
    let (mut peer, mut agent) = async_pair();
    peer.write_all(&HELLO_V2[..10]).unwrap();
    drop(peer);
    let started = tokio::time::Instant::now();
    assert_eq!(asked(&mut agent, WITHIN).await, None, "closed after a part");
    assert_eq!(started.elapsed(), Duration::ZERO);

    // Cut short and silent: until the time limit.
    let (mut peer, mut agent) = async_pair();
    peer.write_all(&HELLO_V2[..10]).unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(asked(&mut agent, WITHIN).await, None, "silent after a part");
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
