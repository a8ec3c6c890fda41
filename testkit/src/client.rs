//! The test client: a process that the tests start inside a workload's
//! cgroup (through `sluice exec`) or a pod's cgroup and namespace, so that
//! the eBPF hooks see what it does, as they would an application's. It
//! makes calls to a line-echo server and prints one line per call on
//! stdout: the reply, or `FAILED` when there was none.
//!
//! A [`Client`] is written as the arguments of that process by
//! [`Client::args`] and read back by [`run`]; whatever binary carries the
//! client calls [`run`] when it finds [`CLIENT_VAR`] set.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    os::fd::FromRawFd,
    time::Duration,
};

/// Set in the environment of a client process.
pub const CLIENT_VAR: &str = "SLUICE_TEST_CLIENT";

/// What one client process does.
#[derive(Debug, Clone, PartialEq)]
pub enum Client {
    /// `count` calls to `to`, one connection each: send one line, read one.
    Calls(Calls),
    /// One connection to `to`, held open: each line read from stdin is
    /// sent, and the reply printed, until stdin ends.
    Hold { to: SocketAddr },
    /// One connection to `to` of an echo server that answers at the end of
    /// its input: after `delay`, `bytes` random bytes are sent and the
    /// sending side shut; the echo is read to its end, waiting for
    /// readability with poll(2) as event-driven clients do. Prints `intact`,
    /// or `corrupt <bytes received>`.
    Blob {
        to: SocketAddr,
        bytes: usize,
        delay: Duration,
    },
    /// One connection to a line-echo server, `count` requests in turn
    /// (`req <i>`, a pause after each), each reply checked to be the
    /// echo of its own request. Prints `ok <count>`, or `FAILED at <i>:`
    /// and what came instead.
    Converse {
        to: SocketAddr,
        count: usize,
        pause: Duration,
    },
    /// One connection to a stream server ([`stream_tail`]): `bytes` of
    /// [`pattern`] sent a KiB at a time with `pace` between, read back as
    /// they echo; then the sending side shut (a half-close), and the
    /// server's tail of `tail` bytes read to the end. Prints `intact
    /// <bytes received>`, or `corrupt at <offset> of <bytes received>`.
    Stream {
        to: SocketAddr,
        bytes: usize,
        tail: usize,
        pace: Duration,
    },
    /// One connection to an echo server: a KiB sent, the first of its echo
    /// read, then the connection reset (RST, not FIN). Prints `reset`, or
    /// `FAILED:` and why.
    Reset { to: SocketAddr },
}

/// `len` bytes no window of which repeats within 251 bytes, so that a
/// lost, doubled or reordered chunk shows; `seed` tells two streams apart.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// What a stream server sends after the client's half-close.
pub fn stream_tail(len: usize) -> Vec<u8> {
    pattern(len, 0x5a)
}

/// Calls, one connection each.
#[derive(Debug, Clone, PartialEq)]
pub struct Calls {
    pub to: SocketAddr,
    pub count: usize,
    /// The line sent on call `i` (from 1) is `<text> <i>`.
    pub text: String,
    /// A pause after each call (none: one call right after another).
    pub pause: Option<Duration>,
    /// No call starts once this long has passed since the first: `count`
    /// is then the most there are.
    pub lasting: Option<Duration>,
    /// The local port to bind (with SO_REUSEADDR) instead of any.
    pub bind_port: Option<u16>,
    /// SO_MARK on the socket.
    pub mark: Option<u32>,
    /// Print `<peer> <reply>`, the peer as getpeername() shows it.
    pub show_peer: bool,
    /// After each call's line, print `elapsed_ms <n>`: how long it took,
    /// connect to reply (or failure).
    pub timed: bool,
    /// Print `FAILED <kind>` (`ConnectionRefused`, `UnexpectedEof`, ...)
    /// instead of `FAILED` alone.
    pub show_error: bool,
    /// Run on this CPU alone.
    pub cpu: Option<usize>,
    /// Print `<unix microseconds> <reply>`: when the call's connect began.
    pub stamped: bool,
}

impl Calls {
    /// `count` calls to `to` sending `call <i>`.
    pub fn new(to: SocketAddr, count: usize) -> Calls {
        Calls {
            to,
            count,
            text: "call".to_owned(),
            pause: None,
            lasting: None,
            bind_port: None,
            mark: None,
            show_peer: false,
            timed: false,
            show_error: false,
            cpu: None,
            stamped: false,
        }
    }
}

impl Calls {
    /// Sends `<text> <i>` on call `i`.
    pub fn text(mut self, text: &str) -> Calls {
        self.text = text.to_owned();
        self
    }

    /// Waits `pause` after each call.
    pub fn pause(mut self, pause: Duration) -> Calls {
        self.pause = Some(pause);
        self
    }

    /// Makes calls for `lasting`, `count` at the most.
    pub fn lasting(mut self, lasting: Duration) -> Calls {
        self.lasting = Some(lasting);
        self
    }

    /// Prints how long each call took.
    pub fn timed(mut self) -> Calls {
        self.timed = true;
        self
    }

    /// Binds the local port `port` (with SO_REUSEADDR) on loopback.
    pub fn bind_port(mut self, port: u16) -> Calls {
        self.bind_port = Some(port);
        self
    }

    /// Says how each failed call failed.
    pub fn show_error(mut self) -> Calls {
        self.show_error = true;
        self
    }

    /// Prints when each call's connect began, in microseconds since the
    /// Unix epoch, before its reply.
    pub fn stamped(mut self) -> Calls {
        self.stamped = true;
        self
    }

    /// Prints the peer each call's socket shows.
    pub fn show_peer(mut self) -> Calls {
        self.show_peer = true;
        self
    }

    /// Sets SO_MARK on each call's socket.
    pub fn mark(mut self, mark: u32) -> Calls {
        self.mark = Some(mark);
        self
    }

    /// Runs the client on CPU `cpu` alone.
    pub fn on_cpu(mut self, cpu: usize) -> Calls {
        self.cpu = Some(cpu);
        self
    }
}

impl From<Calls> for Client {
    fn from(calls: Calls) -> Client {
        Client::Calls(calls)
    }
}

impl Client {
    /// The arguments that [`run`] reads back.
    pub fn args(&self) -> Vec<String> {
        match self {
            Client::Hold { to } => vec!["hold".into(), to.to_string()],
            Client::Reset { to } => vec!["reset".into(), to.to_string()],
            Client::Converse { to, count, pause } => vec![
                "converse".into(),
                to.to_string(),
                count.to_string(),
                pause.as_micros().to_string(),
            ],
            Client::Stream {
                to,
                bytes,
                tail,
                pace,
            } => vec![
                "stream".into(),
                to.to_string(),
                bytes.to_string(),
                tail.to_string(),
                pace.as_micros().to_string(),
            ],
            Client::Blob { to, bytes, delay } => vec![
                "blob".into(),
                to.to_string(),
                bytes.to_string(),
                delay.as_millis().to_string(),
            ],
            Client::Calls(c) => {
                let mut args = vec![
                    "calls".into(),
                    c.to.to_string(),
                    c.count.to_string(),
                    c.text.clone(),
                ];
                if let Some(p) = c.pause {
                    args.push(format!("--pause-us={}", p.as_micros()));
                }
                if let Some(l) = c.lasting {
                    args.push(format!("--lasting-ms={}", l.as_millis()));
                }
                if let Some(p) = c.bind_port {
                    args.push(format!("--bind-port={p}"));
                }
                if let Some(m) = c.mark {
                    args.push(format!("--mark={m}"));
                }
                if c.show_peer {
                    args.push("--show-peer".into());
                }
                if c.timed {
                    args.push("--timed".into());
                }
                if c.show_error {
                    args.push("--show-error".into());
                }
                if let Some(cpu) = c.cpu {
                    args.push(format!("--cpu={cpu}"));
                }
                if c.stamped {
                    args.push("--stamped".into());
                }
                args
            }
        }
    }

    /// Reads back what [`Self::args`] wrote.
    pub fn parse(args: &[String]) -> Result<Client, String> {
        let bad = || format!("not a client command: {args:?}");
        let addr = |s: &String| s.parse::<SocketAddr>().map_err(|_| bad());
        match args {
            [mode, to] if mode == "hold" => Ok(Client::Hold { to: addr(to)? }),
            [mode, to] if mode == "reset" => Ok(Client::Reset { to: addr(to)? }),
            [mode, to, count, pause_us] if mode == "converse" => Ok(Client::Converse {
                to: addr(to)?,
                count: count.parse().map_err(|_| bad())?,
                pause: Duration::from_micros(pause_us.parse().map_err(|_| bad())?),
            }),
            [mode, to, bytes, tail, pace_us] if mode == "stream" => Ok(Client::Stream {
                to: addr(to)?,
                bytes: bytes.parse().map_err(|_| bad())?,
                tail: tail.parse().map_err(|_| bad())?,
                pace: Duration::from_micros(pace_us.parse().map_err(|_| bad())?),
            }),
            [mode, to, bytes, delay_ms] if mode == "blob" => Ok(Client::Blob {
                to: addr(to)?,
                bytes: bytes.parse().map_err(|_| bad())?,
                delay: Duration::from_millis(delay_ms.parse().map_err(|_| bad())?),
            }),
            [mode, to, count, text, options @ ..] if mode == "calls" => {
                let mut calls = Calls::new(addr(to)?, count.parse().map_err(|_| bad())?);
                calls.text = text.clone();
                for option in options {
                    let (name, value) = option.split_once('=').unwrap_or((option, ""));
                    match name {
                        "--pause-us" => {
                            calls.pause =
                                Some(Duration::from_micros(value.parse().map_err(|_| bad())?))
                        }
                        "--lasting-ms" => {
                            calls.lasting =
                                Some(Duration::from_millis(value.parse().map_err(|_| bad())?))
                        }
                        "--bind-port" => calls.bind_port = Some(value.parse().map_err(|_| bad())?),
                        "--mark" => calls.mark = Some(value.parse().map_err(|_| bad())?),
                        "--show-peer" => calls.show_peer = true,
                        "--timed" => calls.timed = true,
                        "--show-error" => calls.show_error = true,
                        "--cpu" => calls.cpu = Some(value.parse().map_err(|_| bad())?),
                        "--stamped" => calls.stamped = true,
                        _ => return Err(bad()),
                    }
                }
                Ok(Client::Calls(calls))
            }
            _ => Err(bad()),
        }
    }
}

/// Runs the client that `args` describe, printing to stdout; the process's
/// exit code.
pub fn run(args: &[String]) -> i32 {
    let client = match Client::parse(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let result = match client {
        Client::Calls(calls) => run_calls(&calls, &mut out),
        Client::Hold { to } => hold(to, &mut out),
        Client::Reset { to } => reset(to, &mut out),
        Client::Blob { to, bytes, delay } => blob(to, bytes, delay, &mut out),
        Client::Converse { to, count, pause } => converse(to, count, pause, &mut out),
        Client::Stream {
            to,
            bytes,
            tail,
            pace,
        } => stream(to, bytes, tail, pace, &mut out),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("client: {e}");
            1
        }
    }
}

fn run_calls(calls: &Calls, out: &mut impl Write) -> io::Result<()> {
    if let Some(cpu) = calls.cpu {
        pin_to(cpu)?;
    }
    let first = std::time::Instant::now();
    for i in 1..=calls.count {
        if calls.lasting.is_some_and(|l| first.elapsed() >= l) {
            break;
        }
        let started = std::time::Instant::now();
        let began = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let line = match call(calls, &format!("{} {i}\n", calls.text)) {
            Ok((peer, reply)) if calls.show_peer => {
                format!("{}:{} {reply}", peer.ip(), peer.port())
            }
            Ok((_, reply)) => reply,
            Err(e) if calls.show_error => format!("FAILED {:?}", e.kind()),
            Err(_) => "FAILED".to_owned(),
        };
        if calls.stamped {
            writeln!(out, "{began} {line}")?;
        } else {
            writeln!(out, "{line}")?;
        }
        if calls.timed {
            writeln!(out, "elapsed_ms {}", started.elapsed().as_millis())?;
        }
        out.flush()?;
        if let Some(pause) = calls.pause {
            std::thread::sleep(pause);
        }
    }
    Ok(())
}

/// Pins this process to CPU `cpu`.
fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: sched_setaffinity(2) on this process with a set we own.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One call: the peer as getpeername() shows it, and the reply line.
fn call(calls: &Calls, line: &str) -> io::Result<(SocketAddr, String)> {
    let stream = connect(calls)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let peer = stream.peer_addr()?;
    (&stream).write_all(line.as_bytes())?;
    let mut reply = String::new();
    if BufReader::new(&stream).read_line(&mut reply)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok((peer, reply.trim_end().to_owned()))
}

/// A connection to `calls.to` from a socket set up as `calls` asks.
fn connect(calls: &Calls) -> io::Result<TcpStream> {
    if calls.bind_port.is_none() && calls.mark.is_none() {
        return TcpStream::connect(calls.to);
    }
    let family = match calls.to {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: a new socket, owned by the TcpStream from here on.
    let stream = unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        TcpStream::from_raw_fd(fd)
    };
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    if let Some(mark) = calls.mark {
        set_option(fd, libc::SO_MARK, mark as libc::c_int)?;
    }
    if let Some(port) = calls.bind_port {
        set_option(fd, libc::SO_REUSEADDR, 1)?;
        let local = match calls.to {
            SocketAddr::V4(_) => SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::V6(_) => SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], port)),
        };
        let (addr, len) = sockaddr(&local);
        // SAFETY: bind(2) with an address of the length given.
        if unsafe { libc::bind(fd, (&raw const addr).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let (addr, len) = sockaddr(&calls.to);
    // SAFETY: connect(2) with an address of the length given.
    if unsafe { libc::connect(fd, (&raw const addr).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

fn set_option(fd: libc::c_int, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt(2) with an int the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `addr` as a C socket address, and its length.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all zeroes is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            let sin6 = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn hold(to: SocketAddr, out: &mut impl Write) -> io::Result<()> {
    let stream = match TcpStream::connect(to) {
        Ok(s) => s,
        Err(_) => {
            writeln!(out, "FAILED")?;
            return Ok(());
        }
    };
    let mut replies = BufReader::new(&stream);
    for line in io::stdin().lock().lines() {
        let line = line?;
        let mut reply = String::new();
        let answered = (&stream)
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| replies.read_line(&mut reply));
        match answered {
            Ok(n) if n > 0 => writeln!(out, "{}", reply.trim_end())?,
            _ => writeln!(out, "FAILED")?,
        }
        out.flush()?;
    }
    Ok(())
}

fn blob(to: SocketAddr, bytes: usize, delay: Duration, out: &mut impl Write) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let data = noise(bytes);
    let mut stream = TcpStream::connect(to)?;
    std::thread::sleep(delay);
    stream.write_all(&data)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut got = Vec::with_capacity(bytes);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let mut poll = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own.
        unsafe { libc::poll(&mut poll, 1, 10_000) };
        // A wake-up may find no data on a socket in a sockmap: a blocking
        // read then says so (EAGAIN) rather than wait (README, "Sockmap
        // bypass").
        match std::io::Read::read(&mut stream, &mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    if got == data {
        writeln!(out, "intact")
    } else {
        writeln!(out, "corrupt {}", got.len())
    }
}

/// Makes `stream`'s close an RST (a zero linger).
pub fn zero_linger(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the descriptor is the open socket's, and the option value is
    // a linger struct of the size given.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    match set {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn reset(to: SocketAddr, out: &mut impl Write) -> io::Result<()> {
    use std::io::Read;
    let mut stream = TcpStream::connect(to)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(&pattern(1024, 7))?;
    let mut first = [0u8; 1];
    match stream.read(&mut first) {
        Ok(1) => {}
        Ok(_) => return writeln!(out, "FAILED: the connection closed"),
        Err(e) => return writeln!(out, "FAILED: {e}"),
    }
    zero_linger(&stream)?;
    drop(stream);
    writeln!(out, "reset")
}

fn converse(to: SocketAddr, count: usize, pause: Duration, out: &mut impl Write) -> io::Result<()> {
    let stream = TcpStream::connect(to)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut replies = BufReader::new(&stream);
    for i in 1..=count {
        let request = format!("req {i}");
        let mut reply = String::new();
        let answered = (&stream)
            .write_all(format!("{request}\n").as_bytes())
            .and_then(|()| replies.read_line(&mut reply));
        match answered {
            Ok(n) if n > 0 && reply.trim_end().ends_with(&format!(" {request}")) => {}
            Ok(0) => return writeln!(out, "FAILED at {i}: the connection closed"),
            Ok(_) => return writeln!(out, "FAILED at {i}: {:?}", reply.trim_end()),
            Err(e) => return writeln!(out, "FAILED at {i}: {e}"),
        }
        std::thread::sleep(pause);
    }
    writeln!(out, "ok {count}")
}

fn stream(
    to: SocketAddr,
    bytes: usize,
    tail: usize,
    pace: Duration,
    out: &mut impl Write,
) -> io::Result<()> {
    let data = pattern(bytes, 0x33);
    let mut expected = data.clone();
    expected.extend_from_slice(&stream_tail(tail));
    let stream = TcpStream::connect(to)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut reader = stream.try_clone()?;
    let receiving = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match std::io::Read::read(&mut reader, &mut buf) {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err((e, got.len())),
            }
        }
    });
    let mut writer = &stream;
    for chunk in data.chunks(1024) {
        writer.write_all(chunk)?;
        std::thread::sleep(pace);
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let got = match receiving.join().expect("the receiving thread") {
        Ok(got) => got,
        Err((e, n)) => return writeln!(out, "FAILED after {n} bytes: {e}"),
    };
    match got.iter().zip(&expected).position(|(a, b)| a != b) {
        None if got.len() == expected.len() => writeln!(out, "intact {}", got.len()),
        None => writeln!(
            out,
            "corrupt at {} of {}",
            got.len().min(expected.len()),
            got.len()
        ),
        Some(at) => writeln!(out, "corrupt at {at} of {}", got.len()),
    }
}

/// `n` bytes that do not repeat in any short period (xorshift64, seeded
/// from the clock and the process), so that a lost or reordered chunk shows.
fn noise(n: usize) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = now ^ (u64::from(std::process::id()) << 32) | 1;
    let mut data = Vec::with_capacity(n + 8);
    while data.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(n);
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_reads_back_the_arguments_it_writes() {
        let mut calls = Calls::new("[2001:db8::1]:8080".parse().unwrap(), 3);
        calls.text = "tick".into();
        calls.pause = Some(Duration::from_millis(100));
        calls.lasting = Some(Duration::from_secs(45));
        calls.bind_port = Some(41000);
        calls.mark = Some(0x51ce);
        calls.show_peer = true;
        calls.timed = true;
        calls.show_error = true;
        calls.cpu = Some(0);
        calls.stamped = true;
        for client in [
            Client::Calls(calls),
            Client::Calls(Calls::new("127.0.0.1:9".parse().unwrap(), 1)),
            Client::Hold {
                to: "127.0.0.1:9".parse().unwrap(),
            },
            Client::Blob {
                to: "[::ffff:127.0.0.1]:9".parse().unwrap(),
                bytes: 4 << 20,
                delay: Duration::from_millis(300),
            },
            Client::Converse {
                to: "127.0.0.1:9".parse().unwrap(),
                count: 500,
                pause: Duration::from_millis(5),
            },
            Client::Stream {
                to: "127.0.0.1:9".parse().unwrap(),
                bytes: 1 << 20,
                tail: 4096,
                pace: Duration::from_micros(1500),
            },
        ] {
            assert_eq!(Client::parse(&client.args()), Ok(client));
        }
    }

    #[test]
    fn calls_print_each_reply_or_failed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for stream in listener.incoming().take(2) {
                let stream = stream.unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                (&stream)
                    .write_all(format!("echo {line}").as_bytes())
                    .unwrap();
            }
        });
        let mut out = Vec::new();
        run_calls(&Calls::new(addr, 2), &mut out).unwrap();
        server.join().unwrap();
        // Nothing listens any more: refused.
        run_calls(&Calls::new(addr, 1), &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "echo call 1\necho call 2\nFAILED\n"
        );
    }
}
