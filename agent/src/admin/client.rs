//! The CLI's side of the admin API: one blocking GET, bounded in time.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "the agent is not running, or not yet listening: nothing answers on {addr} ({error}); \
         start it with `sluice agent`, or pass --admin ADDR if it listens elsewhere"
    )]
    Unreachable {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("the agent at {addr} gave a malformed answer")]
    Malformed { addr: SocketAddr },
}

/// GETs `path` from the admin API at `addr`; returns the status and body.
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), AdminError> {
    let unreachable = |error| AdminError::Unreachable { addr, error };
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(unreachable)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: sluice\r\nconnection: close\r\n\r\n"
    )
    .map_err(unreachable)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(unreachable)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or(AdminError::Malformed { addr })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(AdminError::Malformed { addr })?;
    Ok((status, body.to_owned()))
}

/// GETs `path` and hands each line of the body to `on_line` as it arrives,
/// until the agent ends the stream or `stop()` says so.
pub fn stream_lines(
    addr: SocketAddr,
    path: &str,
    stop: impl Fn() -> bool,
    mut on_line: impl FnMut(&str),
) -> Result<(), AdminError> {
    use std::io::{BufRead, BufReader};
    let unreachable = |error| AdminError::Unreachable { addr, error };
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(unreachable)?;
    // Short reads, so that `stop` is looked at several times a second.
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(unreachable)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: sluice\r\nconnection: close\r\n\r\n"
    )
    .map_err(unreachable)?;
    let mut reader = BufReader::new(stream);
    let mut in_body = false;
    let mut line = String::new();
    while !stop() {
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {
                let text = line.trim_end_matches(['\r', '\n']);
                if in_body {
                    on_line(text);
                } else if text.is_empty() {
                    in_body = true;
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    Ok(())
}
