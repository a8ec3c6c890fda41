//! The control stream of a tunnel connection, between two Sluice agents:
//! the tunnel layer's part of moving tunnelled connections in an upgrade
//! (the agent's part is in `proxy::moved`).
//!
//! A pool connection's client opens one CONNECT to the reserved authority
//! [`control_authority`] with the header [`CONTROL_HEADER`] (its value
//! names the calling agent's node, where a successor finds it); a peer that
//! answers 200 speaks moves, one that refuses it (ztunnel, an older agent)
//! does not, and its streams finish where they are. Either end then writes
//! one message a line:
//!
//! - `pause <stream id> <token>`: the sender is leaving (an upgrade). Both
//!   ends stop their copy of that stream where no byte is half moved, send
//!   END_STREAM and read the stream to the other's END_STREAM
//!   ([`TunnelStream::quiesce`]), so that every byte either sent was read
//!   by the other. The receiver keeps its side (the workload's socket and
//!   the bytes in hand) under the 128-bit token, for the sender's
//!   successor to take up with a new stream carrying `sluice-resume`.
//!
//! A malformed line is an error naming it; the connection's other streams
//! are not the control stream's business.

use std::{fmt, net::SocketAddr};

use super::TunnelStream;

/// Marks the control CONNECT; its value is the calling agent's node name.
pub const CONTROL_HEADER: &str = "sluice-control";
/// Carries the token on the successor's CONNECT.
pub const RESUME_HEADER: &str = "sluice-resume";
/// On a CONNECT whose calling end will not take part in a move (it carries
/// the calling agent's own requests, not a workload's connection): the
/// called agent does not pause it when it leaves, and lets it end where it
/// is; the calling agent stops using it once the connection goes away.
pub const STAYS_HEADER: &str = "sluice-stays";

/// The authority of the control CONNECT: no workload is ever there.
pub fn control_authority() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// What a control line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Pause { stream: u32, token: Token },
}

/// Names a paused stream's kept side; random, and shown only to the
/// peer agent inside the mTLS connection.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub [u8; 16]);

impl fmt::Debug for Token {
    // A token is a capability: logs show only that there is one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A fresh token from the system's random source.
    pub fn random() -> Token {
        let mut bytes = [0u8; 16];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system's random source works");
        Token(bytes)
    }

    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<Token> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Token(out))
    }
}

/// A `sluice-resume` header that is not a token.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("a {RESUME_HEADER} header that is no token (32 hex digits)")]
pub struct BadToken;

/// A control line that is not one.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("control stream: {0:?} is not a control message (`pause <stream id> <32 hex digits>`)")]
pub struct BadMessage(pub String);

impl Message {
    pub fn encode(&self) -> String {
        match self {
            Message::Pause { stream, token } => format!("pause {stream} {}\n", token.to_hex()),
        }
    }

    /// One line, without its newline.
    pub fn parse(line: &str) -> Result<Message, BadMessage> {
        let bad = || BadMessage(line.chars().take(80).collect());
        let mut words = line.split(' ');
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("pause"), Some(stream), Some(token), None) => Ok(Message::Pause {
                stream: stream.parse().map_err(|_| bad())?,
                token: Token::from_hex(token).ok_or_else(bad)?,
            }),
            _ => Err(bad()),
        }
    }
}

/// The longest control line read: anything longer is not one.
const MAX_LINE: usize = 128;

/// Control messages both ways over the control stream.
pub struct ControlStream {
    stream: TunnelStream,
    /// Read and not yet a whole line.
    partial: Vec<u8>,
}

impl ControlStream {
    pub fn new(stream: TunnelStream) -> ControlStream {
        ControlStream {
            stream,
            partial: Vec::new(),
        }
    }

    pub async fn send(&mut self, message: Message) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(message.encode().as_bytes()).await?;
        self.stream.flush().await
    }

    /// The next message; None when the peer closed the stream.
    pub async fn next(&mut self) -> std::io::Result<Option<Message>> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line[..end]).into_owned();
                return Message::parse(&line)
                    .map(Some)
                    .map_err(std::io::Error::other);
            }
            if self.partial.len() > MAX_LINE {
                let line = String::from_utf8_lossy(&self.partial).into_owned();
                return Err(std::io::Error::other(BadMessage(line)));
            }
            let mut chunk = [0u8; MAX_LINE];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.partial.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_survives_its_line_and_bad_lines_are_named() {
        let token = Token([0xab; 16]);
        let pause = Message::Pause { stream: 7, token };
        let line = pause.encode();
        assert_eq!(line, format!("pause 7 {}\n", "ab".repeat(16)));
        assert_eq!(Message::parse(line.trim_end()), Ok(pause));
        for bad in [
            "",
            "pause",
            "pause 7",
            "pause x abab",
            "pause 7 abc",
            "resume 7 00",
            "pause 7 ab extra",
        ] {
            let e = Message::parse(bad).unwrap_err();
            assert!(
                e.to_string().contains("not a control message"),
                "{bad:?}: {e}"
            );
        }
        assert_eq!(format!("{token:?}"), "Token(..)", "a token is never logged");
    }
}
