//! The handshake, rustls's own (its unbuffered API), and the hand-over to
//! our record layer once it is done.
//!
//! rustls reads from a buffer we own and tells us how much of it it used,
//! so nothing the peer sent after its Finished is lost: records rustls
//! already decrypted come back as plaintext, the rest stays in the buffer
//! for our record layer. rustls then turns into a `KernelConnection` (its
//! interface for "someone else does the records"), which gives the current
//! keys and sequence numbers, and which a client keeps to store the
//! server's session tickets. The traffic secrets themselves come from a
//! key log on a per-connection copy of the configuration.

use std::{
    io,
    sync::{Arc, Mutex},
};

use rustls::{
    ClientConfig, ConnectionTrafficSecrets, KeyLog, ProtocolVersion, ServerConfig,
    SupportedCipherSuite,
    client::{ClientConnectionData, UnbufferedClientConnection},
    crypto::tls13::OkmBlock,
    server::{ServerConnectionData, UnbufferedServerConnection},
    unbuffered::{
        ConnectionState, EncodeError, EncodeTlsData, UnbufferedConnectionCommon, UnbufferedStatus,
    },
};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    Peer, Role, SessionError, TlsSession,
    keys::{Suite, TrafficKeys},
    record::{MAX_RECORD, Rx, Tx},
};

/// KeyUpdates from the peer that rustls may have applied before the
/// hand-over (a peer may send one right after its Finished).
const MAX_EARLY_UPDATES: usize = 32;

/// Does the client's handshake on `tcp` and hands the session over.
pub(super) async fn client(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    mut tcp: TcpStream,
) -> io::Result<TlsSession> {
    let log = Arc::new(SecretLog::default());
    let mut config = ClientConfig::clone(&config);
    config.key_log = log.clone();
    config.enable_secret_extraction = true;
    config.enable_early_data = false;
    let mut conn = UnbufferedClientConnection::new(Arc::new(config), name).map_err(tls_error)?;
    let done = drive(&mut *conn, &mut tcp).await?;
    let (suite, peer) = negotiated(&conn)?;
    let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    let (tx, rx) = log.take(Role::Client)?;
    let mut session = hand_over(tcp, Role::Client, suite, peer, done, (tx, rx), secrets)?;
    session.rx.tickets = Some(Box::new(kernel));
    Ok(session)
}

/// Does the server's handshake on `tcp` and hands the session over.
pub(super) async fn server(
    config: Arc<ServerConfig>,
    mut tcp: TcpStream,
) -> io::Result<TlsSession> {
    let log = Arc::new(SecretLog::default());
    let mut config = ServerConfig::clone(&config);
    config.key_log = log.clone();
    config.enable_secret_extraction = true;
    config.max_early_data_size = 0;
    // rustls's unbuffered server shows no SNI; its certificate resolver
    // sees every ClientHello, resumed or not.
    let sni = Arc::new(SniCapture {
        inner: config.cert_resolver.clone(),
        seen: std::sync::Mutex::new(None),
    });
    config.cert_resolver = sni.clone();
    let mut conn = UnbufferedServerConnection::new(Arc::new(config)).map_err(tls_error)?;
    let done = drive(&mut *conn, &mut tcp).await?;
    let (suite, mut peer) = negotiated(&conn)?;
    peer.server_name = sni.seen.lock().ok().and_then(|mut s| s.take());
    // A server has no use for rustls's half: it receives no tickets.
    let (secrets, _kernel) = conn.dangerous_into_kernel_connection().map_err(tls_error)?;
    let (tx, rx) = log.take(Role::Server)?;
    hand_over(tcp, Role::Server, suite, peer, done, (tx, rx), secrets)
}

/// A server's certificate resolver that notes the name the client asked
/// for before asking the real one.
#[derive(Debug)]
struct SniCapture {
    inner: Arc<dyn rustls::server::ResolvesServerCert>,
    seen: std::sync::Mutex<Option<String>>,
}

impl rustls::server::ResolvesServerCert for SniCapture {
    fn resolve(
        &self,
        client_hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = client_hello.server_name().map(str::to_owned);
        }
        self.inner.resolve(client_hello)
    }

    fn only_raw_public_keys(&self) -> bool {
        self.inner.only_raw_public_keys()
    }
}

/// rustls's errors travel as tokio-rustls's do, so callers that look for a
/// `rustls::Error` inside the `io::Error` find it.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What the handshake left for the record layer.
struct Done {
    /// Application data rustls decrypted before the hand-over.
    plaintext: Vec<u8>,
    /// Bytes rustls did not use: the start of the next record.
    received: Vec<u8>,
    /// The peer's close_notify came during the handshake phase.
    peer_closed: bool,
}

/// rustls's unbuffered connection of either side.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn is_handshaking(&self) -> bool;
}

impl Unbuffered for UnbufferedConnectionCommon<ClientConnectionData> {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn is_handshaking(&self) -> bool {
        (**self).is_handshaking()
    }
}

impl Unbuffered for UnbufferedConnectionCommon<ServerConnectionData> {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn is_handshaking(&self) -> bool {
        (**self).is_handshaking()
    }
}

/// What to do once rustls's state is handled.
enum Next {
    Process,
    Write,
    Read,
    Done,
}

/// Runs the handshake until rustls may send and receive application data
/// and holds nothing more to send.
async fn drive<C: Unbuffered>(conn: &mut C, tcp: &mut TcpStream) -> io::Result<Done> {
    let mut incoming = Vec::new();
    let mut outgoing = Vec::new();
    let mut plaintext = Vec::new();
    let mut peer_closed = false;
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming);
        let next = match state {
            Err(e) => {
                incoming.drain(..discard);
                send_alert(conn, tcp, &mut incoming).await;
                return Err(tls_error(e));
            }
            Ok(ConnectionState::EncodeTlsData(mut encoder)) => {
                encode(&mut encoder, &mut outgoing)?;
                Next::Process
            }
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                // Marked sent now, written below before rustls runs again.
                transmit.done();
                Next::Write
            }
            Ok(ConnectionState::BlockedHandshake) => Next::Read,
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    plaintext.extend_from_slice(record.payload);
                }
                Next::Process
            }
            Ok(ConnectionState::PeerClosed) => {
                peer_closed = true;
                Next::Process
            }
            Ok(ConnectionState::Closed) => {
                peer_closed = true;
                Next::Done
            }
            // A server that sends before the client's Finished (half-RTT
            // data) may write here while still handshaking: read on.
            Ok(ConnectionState::WriteTraffic(_)) => Next::Done,
            Ok(other) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "TLS handshake reached state {other:?}, which a mesh session never uses"
                    ),
                ));
            }
        };
        incoming.drain(..discard);
        match next {
            Next::Process => {}
            Next::Write => {
                tcp.write_all(&outgoing).await?;
                outgoing.clear();
            }
            Next::Done if !conn.is_handshaking() => break,
            Next::Read | Next::Done => {
                incoming.reserve(MAX_RECORD);
                if tcp.read_buf(&mut incoming).await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the TLS handshake",
                    ));
                }
            }
        }
    }
    Ok(Done {
        plaintext,
        received: incoming,
        peer_closed,
    })
}

/// Appends rustls's next handshake record to `outgoing`.
fn encode<D>(encoder: &mut EncodeTlsData<'_, D>, outgoing: &mut Vec<u8>) -> io::Result<()> {
    let at = outgoing.len();
    let mut room = 4096;
    loop {
        outgoing.resize(at + room, 0);
        match encoder.encode(&mut outgoing[at..]) {
            Ok(n) => {
                outgoing.truncate(at + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(need)) => room = need.required_size,
            Err(e) => {
                outgoing.truncate(at);
                return Err(io::Error::other(e.to_string()));
            }
        }
    }
}

/// After a handshake error, sends the alert rustls queued, if any, so the
/// peer learns why (best effort: the error is what counts).
async fn send_alert<C: Unbuffered>(conn: &mut C, tcp: &mut TcpStream, incoming: &mut [u8]) {
    let mut outgoing = Vec::new();
    // rustls queued one fatal alert; asking once gives it. rustls's
    // deframer keeps ranges into the buffer it last saw, so it must see
    // the same bytes (less what it discarded), never another buffer; and
    // asking again would read the bad bytes again and send a second
    // alert, which rustls forbids.
    if let Ok(ConnectionState::EncodeTlsData(mut encoder)) = conn.process(incoming).state {
        let _ = encode(&mut encoder, &mut outgoing);
    }
    if !outgoing.is_empty() {
        let _ = tcp.write_all(&outgoing).await;
    }
}

/// The suite (TLS 1.3 only) and what the proxy asks of the peer.
fn negotiated<D>(conn: &UnbufferedConnectionCommon<D>) -> io::Result<(Suite, Peer)> {
    let version = conn.protocol_version();
    let suite = match conn.negotiated_cipher_suite() {
        Some(SupportedCipherSuite::Tls13(tls13)) if version == Some(ProtocolVersion::TLSv1_3) => {
            Suite::of(tls13).ok_or(SessionError::UnsupportedSuite(u16::from(
                tls13.common.suite,
            )))?
        }
        _ => return Err(SessionError::NotTls13(version).into()),
    };
    let peer = Peer {
        certificates: conn.peer_certificates().map(<[_]>::to_vec),
        handshake_kind: conn.handshake_kind(),
        server_name: None,
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
    };
    Ok((suite, peer))
}

/// Builds the session from rustls's keys and sequence numbers, after
/// checking that the logged secrets yield those keys.
fn hand_over(
    tcp: TcpStream,
    role: Role,
    suite: Suite,
    peer: Peer,
    done: Done,
    (tx_secret, rx_secret): (OkmBlock, OkmBlock),
    secrets: rustls::ExtractedSecrets,
) -> io::Result<TlsSession> {
    let (tx_seq, tx_keys) = secrets.tx;
    let (rx_seq, rx_keys) = secrets.rx;
    // Our own sending keys cannot have moved: rustls renews them only to
    // answer a KeyUpdate, and that answer would be lost with it.
    let tx_secret =
        current(suite, tx_secret, &tx_keys, 0).ok_or(SessionError::KeysDiffer("sending"))?;
    let rx_secret = current(suite, rx_secret, &rx_keys, MAX_EARLY_UPDATES)
        .ok_or(SessionError::KeysDiffer("receiving"))?;
    let mut rx = Rx::new(
        TrafficKeys::new(suite, rx_secret, rx_seq),
        role,
        &done.plaintext,
        &done.received,
        Vec::new(),
    );
    rx.closed = done.peer_closed;
    let tx = Tx::new(TrafficKeys::new(suite, tx_secret, tx_seq));
    Ok(TlsSession::new(tcp, rx, tx, peer, false))
}

/// The generation of `secret` (at most `most` KeyUpdates on) whose key and
/// IV are rustls's `extracted`.
fn current(
    suite: Suite,
    mut secret: OkmBlock,
    extracted: &ConnectionTrafficSecrets,
    most: usize,
) -> Option<OkmBlock> {
    for _ in 0..=most {
        if suite.yields(&secret, extracted) {
            return Some(secret);
        }
        secret = suite.next_secret(&secret);
    }
    None
}

const CLIENT_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

/// Catches one connection's first application traffic secrets.
#[derive(Default)]
struct SecretLog {
    /// Client's, server's.
    secrets: Mutex<(Option<OkmBlock>, Option<OkmBlock>)>,
}

impl SecretLog {
    /// (sending, receiving) secrets for `role`.
    fn take(&self, role: Role) -> io::Result<(OkmBlock, OkmBlock)> {
        let mut secrets = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        let client = secrets
            .0
            .take()
            .ok_or(SessionError::SecretNotLogged(CLIENT_SECRET))?;
        let server = secrets
            .1
            .take()
            .ok_or(SessionError::SecretNotLogged(SERVER_SECRET))?;
        Ok(match role {
            Role::Client => (client, server),
            Role::Server => (server, client),
        })
    }
}

impl std::fmt::Debug for SecretLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretLog")
    }
}

impl KeyLog for SecretLog {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if secret.len() > OkmBlock::MAX_LEN {
            return;
        }
        let mut secrets = self.secrets.lock().unwrap_or_else(|e| e.into_inner());
        match label {
            CLIENT_SECRET => secrets.0 = Some(OkmBlock::new(secret)),
            SERVER_SECRET => secrets.1 = Some(OkmBlock::new(secret)),
            _ => {}
        }
    }

    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_SECRET || label == SERVER_SECRET
    }
}
