//! What a suspended session is: plain data another process resumes from.

use std::fmt;

use rustls::{CipherSuite, crypto::tls13::OkmBlock};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::Role;

/// The format this build writes and reads; a state of another format is
/// refused rather than misread.
pub(super) const FORMAT: u16 = 1;

/// A suspended TLS 1.3 session: the suite, each direction's current traffic
/// secret and sequence number, the bytes received but not yet decrypted,
/// the bytes decrypted but not yet read, and which directions closed.
/// [`super::TlsSession::resume`] goes on from it, in this process or
/// another (it travels beside the socket, which SCM_RIGHTS carries).
///
/// It holds the session's traffic secrets: whoever has it can read and
/// forge the connection's traffic. Never write it to disk or to a log; pass
/// it only over the local handover channel. Its `Debug` prints no secret
/// and no payload. Secrets in memory are wiped when it is dropped (the
/// serialized form is the caller's to wipe).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionState {
    pub(super) format: u16,
    pub(super) role: Role,
    /// IANA number of the cipher suite.
    pub(super) suite: u16,
    /// What we send.
    pub(super) tx: Direction,
    /// What we receive.
    pub(super) rx: Direction,
    /// Received, not yet decrypted (a partial record, or whole ones).
    pub(super) received: Bytes,
    /// Decrypted, not yet handed to the reader.
    pub(super) plaintext: Bytes,
    /// A post-handshake message split across records, so far.
    pub(super) handshake: Bytes,
    /// The peer asked for a KeyUpdate we have not sent yet.
    pub(super) answer_due: bool,
    /// A KeyUpdate asking for the peer's was requested and not yet sent.
    pub(super) refresh_due: bool,
    /// The peer's certificate chain, leaf first (DER).
    pub(super) peer_certificates: Option<Vec<Bytes>>,
}

/// One direction of a suspended session.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Direction {
    /// The current traffic secret (after every KeyUpdate so far).
    pub(super) secret: Secret,
    /// Sequence number of the next record under it.
    pub(super) seq: u64,
    /// Sending: our close_notify went out. Receiving: the peer's came.
    pub(super) closed: bool,
}

impl fmt::Debug for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionState")
            .field("format", &self.format)
            .field("role", &self.role)
            .field("suite", &CipherSuite::from(self.suite))
            .field("tx", &self.tx)
            .field("rx", &self.rx)
            .field("received_bytes", &self.received.0.len())
            .field("plaintext_bytes", &self.plaintext.0.len())
            .field("handshake_bytes", &self.handshake.0.len())
            .field("answer_due", &self.answer_due)
            .field("refresh_due", &self.refresh_due)
            .field(
                "peer_certificates",
                &self.peer_certificates.as_ref().map(Vec::len),
            )
            .finish()
    }
}

impl fmt::Debug for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Direction")
            .field("secret", &"<redacted>")
            .field("seq", &self.seq)
            .field("closed", &self.closed)
            .finish()
    }
}

/// A traffic secret, wiped when dropped; serialized as hex.
pub(super) struct Secret(pub(super) OkmBlock);

/// Bytes serialized as hex (half the size of JSON's number arrays).
#[derive(Default)]
pub(super) struct Bytes(pub(super) Vec<u8>);

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn from_hex<E: de::Error>(s: &str) -> Result<Vec<u8>, E> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(E::custom(format!(
            "{:?} is not a lowercase hex digit",
            c as char
        ))),
    };
    if !s.len().is_multiple_of(2) {
        return Err(E::custom("hex string of odd length"));
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        from_hex(&s).map(Bytes)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(self.0.as_ref()))
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        let mut bytes: Vec<u8> = from_hex(&s)?;
        if bytes.len() > OkmBlock::MAX_LEN {
            return Err(de::Error::custom("traffic secret over 64 bytes"));
        }
        let secret = OkmBlock::new(&bytes);
        bytes.fill(0);
        std::hint::black_box(&bytes);
        Ok(Secret(secret))
    }
}
