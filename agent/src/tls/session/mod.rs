//! A TLS 1.3 session whose data phase one agent process can suspend and
//! another resume, so open mTLS connections survive an agent upgrade.
//!
//! rustls does the handshake ([`TlsSession::client`], [`TlsSession::server`]);
//! our own record layer, with rustls's key schedule and aws-lc's AEAD, does
//! the data phase, so its whole state is ours to hand over:
//! [`TlsSession::suspend`] gives back the socket and a [`SessionState`], and
//! [`TlsSession::resume`] goes on from them (the socket travels by
//! SCM_RIGHTS, the state beside it). KeyUpdates both ways keep working
//! after a resume: the state carries the current traffic secrets.
//!
//! Reaching a clean point to suspend: stop using the halves (reads are
//! cancel-safe; let any write in progress finish), drop them, then call
//! `suspend`, which first writes whatever was sealed but not yet written.
//! No record is then half-written; a record half-received is carried.
//!
//! Only TLS 1.3: a handshake that negotiates TLS 1.2 (possible when
//! `mesh.allow_tls12` is set) ends in an error naming the version, so such
//! connections must stay on tokio-rustls.
//!
//! What an idle session holds: the socket, two AEAD keys, two secrets and
//! the peer's certificates, about 2 KB; no record buffer (buffers are taken
//! while bytes flow and given back after). A client also keeps rustls's
//! ticket store until the server's first data.

mod halves;
mod handshake;
mod keys;
mod record;
mod state;
#[cfg(test)]
mod tests;

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    sync::{Arc, atomic::AtomicBool},
    task::{Context, Poll},
};

use rustls::{
    AlertDescription, ClientConfig, ContentType, HandshakeKind, HandshakeType, ProtocolVersion,
    ServerConfig, SupportedCipherSuite,
};
use rustls_pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

pub use halves::{TlsReadHalf, TlsWriteHalf};
pub use state::SessionState;

use keys::{Suite, TrafficKeys};
use record::{Rx, Tx};
use state::{Bytes, Direction, FORMAT, Secret};

/// Which end of the handshake this session was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Client,
    Server,
}

/// What went wrong in a session's data phase, or with its state. Carried
/// inside the `io::Error`s the session returns (find it with
/// `get_ref()?.downcast_ref::<SessionError>()`); handshake errors carry
/// rustls's `Error` instead, as tokio-rustls's do.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "TLS record {seq} from the peer did not decrypt (bad_record_mac): corrupted in transit, \
         or not sent under this session's keys"
    )]
    Undecryptable { seq: u64 },
    #[error("the peer sent TLS alert {0:?}")]
    Alert(AlertDescription),
    #[error(
        "the peer sent a TLS {0:?} record after the handshake, where only encrypted records may come"
    )]
    UnexpectedRecord(ContentType),
    #[error("a TLS record of {0} bytes, over TLS 1.3's limit (record_overflow)")]
    RecordOverflow(usize),
    #[error("the peer sent {0}")]
    Malformed(&'static str),
    #[error("the peer sent a post-handshake {0:?}, which this session does not take")]
    UnexpectedHandshake(HandshakeType),
    #[error("the peer's session ticket: {0}")]
    Ticket(rustls::Error),
    #[error("the peer closed TCP without a TLS close_notify (the data may be truncated)")]
    Truncated,
    #[error("write after this session's close_notify")]
    WriteAfterClose,
    #[error("the handshake negotiated {0:?}; only TLS 1.3 sessions can be suspended")]
    NotTls13(Option<ProtocolVersion>),
    #[error("cipher suite {0:#06x} is not a TLS 1.3 suite of this build")]
    UnsupportedSuite(u16),
    #[error("rustls did not log {0}: secret extraction failed")]
    SecretNotLogged(&'static str),
    #[error("the {0} keys derived from the logged secret are not rustls's")]
    KeysDiffer(&'static str),
    #[error("session state: {0}")]
    State(String),
}

impl From<SessionError> for io::Error {
    fn from(e: SessionError) -> io::Error {
        let kind = match e {
            SessionError::Truncated => io::ErrorKind::UnexpectedEof,
            SessionError::WriteAfterClose => io::ErrorKind::BrokenPipe,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

/// What the handshake said of the peer.
struct Peer {
    certificates: Option<Vec<CertificateDer<'static>>>,
    /// None after a resume.
    handshake_kind: Option<HandshakeKind>,
    /// The name a client asked for (SNI), on the server's side; None
    /// after a resume.
    server_name: Option<String>,
    /// The application protocol agreed (ALPN); None after a resume.
    alpn: Option<Vec<u8>>,
}

/// A TLS 1.3 session over a TCP stream: rustls's handshake, our records.
pub struct TlsSession {
    tcp: TcpStream,
    rx: Rx,
    tx: Tx,
    /// The peer asked for a KeyUpdate: set by the reading half, answered
    /// by the writing half before its next record.
    answer: AtomicBool,
    peer: Peer,
}

impl TlsSession {
    fn new(tcp: TcpStream, rx: Rx, tx: Tx, peer: Peer, answer: bool) -> TlsSession {
        TlsSession {
            tcp,
            rx,
            tx,
            answer: AtomicBool::new(answer),
            peer,
        }
    }

    /// Connects as a client: rustls's handshake with `config` (its session
    /// cache makes the next connection resume, as with tokio-rustls).
    /// Application data the server sends right after the handshake is kept.
    pub async fn client(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
        tcp: TcpStream,
    ) -> io::Result<TlsSession> {
        handshake::client(config, name, tcp).await
    }

    /// Accepts as a server: rustls's handshake with `config`. Application
    /// data the client sends right after its Finished is kept.
    pub async fn server(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<TlsSession> {
        handshake::server(config, tcp).await
    }

    /// The two halves, usable at once (one reading, one writing).
    pub fn halves(&mut self) -> (TlsReadHalf<'_>, TlsWriteHalf<'_>) {
        let (r, w) = self.tcp.split();
        let read = TlsReadHalf {
            tcp: r,
            rx: &mut self.rx,
            answer: &self.answer,
        };
        let write = TlsWriteHalf {
            tcp: w,
            tx: &mut self.tx,
            answer: &self.answer,
        };
        (read, write)
    }

    /// The peer's certificate chain, leaf first, as the handshake gave it.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.peer.certificates.as_deref()
    }

    /// The negotiated cipher suite.
    pub fn negotiated_cipher_suite(&self) -> SupportedCipherSuite {
        SupportedCipherSuite::Tls13(self.rx.keys.suite.tls)
    }

    /// The protocol version: always TLS 1.3.
    pub fn protocol_version(&self) -> ProtocolVersion {
        ProtocolVersion::TLSv1_3
    }

    /// Whether the handshake was full or resumed; None for a resumed
    /// (suspended) session, whose handshake another process did.
    pub fn server_name(&self) -> Option<&str> {
        self.peer.server_name.as_deref()
    }

    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        self.peer.handshake_kind
    }

    /// The application protocol the handshake agreed on (ALPN), if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.peer.alpn.as_deref()
    }

    /// Which end of the handshake this session was.
    pub fn role(&self) -> Role {
        self.rx.role
    }

    /// The TCP stream (for its addresses, or a linger before a reset).
    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// Renews our sending keys before the next record and asks the peer to
    /// renew its own (a KeyUpdate with update_requested). Keys are also
    /// renewed without asking as the suite's confidentiality limit nears.
    pub fn refresh_traffic_keys(&mut self) {
        self.tx.refresh = true;
    }

    /// The same session with its socket registered with `runtime`'s
    /// reactor: a handshake made on one runtime, the data phase carried on
    /// another. Nothing of the session changes.
    pub fn rebind(self, runtime: &tokio::runtime::Handle) -> io::Result<TlsSession> {
        let TlsSession {
            tcp,
            rx,
            tx,
            answer,
            peer,
        } = self;
        Ok(TlsSession {
            tcp: crate::connect::rebind(tcp, runtime)?,
            rx,
            tx,
            answer,
            peer,
        })
    }

    /// Stops the data phase at a clean point: writes what was sealed but
    /// not yet written, then gives back the socket and the state to resume
    /// from. The halves must be dropped first (the borrow makes sure).
    /// An error means the pending bytes could not be written: the
    /// connection is lost. The state holds the traffic secrets: see
    /// [`SessionState`] on where it may go (never to disk or a log).
    pub async fn suspend(mut self) -> io::Result<(TcpStream, SessionState)> {
        poll_fn(|cx| self.halves().1.poll_drain(cx)).await?;
        let TlsSession {
            tcp,
            rx,
            tx,
            answer,
            peer,
        } = self;
        let direction = |keys: &TrafficKeys, closed| Direction {
            secret: Secret(keys.secret().clone()),
            seq: keys.seq,
            closed,
        };
        let state = SessionState {
            format: FORMAT,
            role: rx.role,
            suite: rx.keys.suite.id(),
            tx: direction(&tx.keys, tx.closed),
            rx: direction(&rx.keys, rx.closed),
            received: Bytes(rx.received().to_vec()),
            plaintext: Bytes(rx.plaintext().to_vec()),
            handshake: Bytes(rx.handshake.clone()),
            answer_due: answer.into_inner(),
            refresh_due: tx.refresh,
            peer_certificates: peer
                .certificates
                .map(|chain| chain.iter().map(|c| Bytes(c.to_vec())).collect()),
        };
        Ok((tcp, state))
    }

    /// Goes on from a suspended session on its socket, in this process or
    /// another. The resumed client no longer stores session tickets (they
    /// belonged to the suspending process's configuration).
    pub fn resume(tcp: TcpStream, state: SessionState) -> io::Result<TlsSession> {
        let bad = |why: String| io::Error::from(SessionError::State(why));
        if state.format != FORMAT {
            return Err(bad(format!(
                "format {} where this build reads {FORMAT}",
                state.format
            )));
        }
        let suite = Suite::by_id(state.suite).ok_or(SessionError::UnsupportedSuite(state.suite))?;
        for (name, d) in [("tx", &state.tx), ("rx", &state.rx)] {
            if d.secret.0.as_ref().len() != suite.secret_len() {
                return Err(bad(format!(
                    "{name} secret of {} bytes where {:?} has {}",
                    d.secret.0.as_ref().len(),
                    suite.tls.common.suite,
                    suite.secret_len()
                )));
            }
        }
        let SessionState {
            role,
            tx,
            rx,
            received,
            plaintext,
            handshake,
            answer_due,
            refresh_due,
            peer_certificates,
            ..
        } = state;
        let mut receiving = Rx::new(
            TrafficKeys::new(suite, rx.secret.0.clone(), rx.seq),
            role,
            &plaintext.0,
            &received.0,
            handshake.0,
        );
        receiving.closed = rx.closed;
        let mut sending = Tx::new(TrafficKeys::new(suite, tx.secret.0.clone(), tx.seq));
        sending.closed = tx.closed;
        sending.refresh = refresh_due;
        let peer = Peer {
            certificates: peer_certificates.map(|chain| {
                chain
                    .into_iter()
                    .map(|c| CertificateDer::from(c.0))
                    .collect()
            }),
            handshake_kind: None,
            server_name: None,
            alpn: None,
        };
        Ok(TlsSession::new(tcp, receiving, sending, peer, answer_due))
    }
}

impl AsyncRead for TlsSession {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (mut read, _) = self.get_mut().halves();
        Pin::new(&mut read).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsSession {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let (_, mut write) = self.get_mut().halves();
        Pin::new(&mut write).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        parts: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let (_, mut write) = self.get_mut().halves();
        Pin::new(&mut write).poll_write_vectored(cx, parts)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (_, mut write) = self.get_mut().halves();
        Pin::new(&mut write).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (_, mut write) = self.get_mut().halves();
        Pin::new(&mut write).poll_shutdown(cx)
    }
}
