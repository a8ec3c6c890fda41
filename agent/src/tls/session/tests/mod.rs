//! The session against real rustls peers (tokio-rustls) over loopback TCP,
//! with certificates rcgen makes: data both ways, half-closes, what arrives
//! with the handshake, suspend and resume, KeyUpdates, resumption, errors.
//!
//! The peer's bytes can pass through a [`Relay`] that forwards only what a
//! test allows, so a suspend lands where the test wants (mid-record).

mod key_update;
mod stream;
mod suspend;

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicU64, Ordering},
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig, SupportedCipherSuite, SupportedProtocolVersion,
    crypto::{CryptoProvider, aws_lc_rs},
    server::WebPkiClientVerifier,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::*;

/// The name the server's certificate carries.
const NAME: &str = "ledger.mesh.test";

/// A CA, a server certificate for [`NAME`] and a client certificate.
struct Certs {
    ca: CertificateDer<'static>,
    server: (CertificateDer<'static>, Vec<u8>),
    client: (CertificateDer<'static>, Vec<u8>),
}

fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(|| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap().der().clone();
        let issuer = Issuer::new(params, ca_key);
        let leaf = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let params = CertificateParams::new(vec![name.to_owned()]).unwrap();
            let der = params.signed_by(&key, &issuer).unwrap().der().clone();
            (der, key.serialize_der())
        };
        Certs {
            ca,
            server: leaf(NAME),
            client: leaf("checkout.mesh.test"),
        }
    })
}

fn key(der: &[u8]) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec()))
}

/// Both ends' configurations: mutual TLS, a ticketer for resumption.
struct Pki {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

fn pki() -> Pki {
    pki_with(None, &[&rustls::version::TLS13], &[&rustls::version::TLS13])
}

/// Configurations limited to `suite` (if given) and to these versions.
fn pki_with(
    suite: Option<SupportedCipherSuite>,
    server_versions: &[&'static SupportedProtocolVersion],
    client_versions: &[&'static SupportedProtocolVersion],
) -> Pki {
    let certs = certs();
    let mut provider = aws_lc_rs::default_provider();
    if let Some(suite) = suite {
        provider.cipher_suites = vec![suite];
    }
    let provider: Arc<CryptoProvider> = Arc::new(provider);
    let mut roots = RootCertStore::empty();
    roots.add(certs.ca.clone()).unwrap();
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .unwrap();
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(server_versions)
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![certs.server.0.clone()], key(&certs.server.1))
        .unwrap();
    server.ticketer = aws_lc_rs::Ticketer::new().unwrap();
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(client_versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![certs.client.0.clone()], key(&certs.client.1))
        .unwrap();
    Pki {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

fn name() -> ServerName<'static> {
    ServerName::try_from(NAME).unwrap()
}

/// A loopback TCP connection: (the connecting end, the accepted end).
async fn tcp() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

/// Our client session on `ours` and a tokio-rustls server on `theirs`.
async fn our_client_on(
    pki: &Pki,
    ours: TcpStream,
    theirs: TcpStream,
) -> (TlsSession, server::TlsStream<TcpStream>) {
    let acceptor = TlsAcceptor::from(pki.server.clone());
    let (ours, theirs) = tokio::join!(
        TlsSession::client(pki.client.clone(), name(), ours),
        acceptor.accept(theirs)
    );
    (ours.unwrap(), theirs.unwrap())
}

/// Our client session and a tokio-rustls server, connected.
async fn our_client(pki: &Pki) -> (TlsSession, server::TlsStream<TcpStream>) {
    let (c, s) = tcp().await;
    our_client_on(pki, c, s).await
}

/// Our server session on `ours` and a tokio-rustls client on `theirs`.
async fn our_server_on(
    pki: &Pki,
    ours: TcpStream,
    theirs: TcpStream,
) -> (TlsSession, client::TlsStream<TcpStream>) {
    let connector = TlsConnector::from(pki.client.clone());
    let (ours, theirs) = tokio::join!(
        TlsSession::server(pki.server.clone(), ours),
        connector.connect(name(), theirs)
    );
    (ours.unwrap(), theirs.unwrap())
}

/// Our server session and a tokio-rustls client, connected.
async fn our_server(pki: &Pki) -> (TlsSession, client::TlsStream<TcpStream>) {
    let (c, s) = tcp().await;
    our_server_on(pki, s, c).await
}

/// `len` bytes no window of which repeats within 251 bytes, so a lost,
/// doubled or reordered chunk shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// Where `got` first differs from `want` (for a readable failure).
fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .or((got.len() != want.len()).then(|| got.len().min(want.len())))
}

#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(at) = first_difference(got, want) {
        panic!(
            "{what}: {} bytes where {} were sent; first difference at byte {at}",
            got.len(),
            want.len()
        );
    }
}

async fn read_all(r: &mut (impl AsyncRead + Unpin)) -> io::Result<Vec<u8>> {
    let mut all = Vec::new();
    r.read_to_end(&mut all).await?;
    Ok(all)
}

/// A TCP relay between our session and its peer: the peer's bytes reach us
/// only as far as [`Relay::allow`] lets them (ours reach the peer freely).
struct Relay {
    /// Bytes of the peer's stream allowed through so far.
    allowed: watch::Sender<u64>,
    /// Offset in the peer's stream of a byte to corrupt (u64::MAX: none).
    corrupt_at: Arc<AtomicU64>,
    /// Bytes of the peer's stream passed on so far.
    passed: watch::Receiver<u64>,
}

impl Relay {
    /// (our end, the peer's end, the relay). Everything passes at first.
    async fn start() -> (TcpStream, TcpStream, Relay) {
        let corrupt_at = Arc::new(AtomicU64::new(u64::MAX));
        let corrupt = corrupt_at.clone();
        let (ours, near) = tcp().await;
        let (far, theirs) = tcp().await;
        let (allowed, mut allowed_rx) = watch::channel(u64::MAX);
        let (passed_tx, passed) = watch::channel(0u64);
        let (mut near_r, mut near_w) = near.into_split();
        let (mut far_r, mut far_w) = far.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut near_r, &mut far_w).await;
            let _ = far_w.shutdown().await;
        });
        tokio::spawn(async move {
            // Everything the peer sends is read at once (so a budget set
            // later still holds), and passed on as far as allowed.
            let (mut queue, mut passed, mut eof) = (Vec::new(), 0u64, false);
            loop {
                let allowed = *allowed_rx.borrow_and_update();
                let n = (allowed.saturating_sub(passed)).min(queue.len() as u64) as usize;
                if n > 0 {
                    let at = corrupt.load(Ordering::Relaxed);
                    if (passed..passed + n as u64).contains(&at) {
                        queue[(at - passed) as usize] ^= 0x01;
                    }
                    if near_w.write_all(&queue[..n]).await.is_err() {
                        return;
                    }
                    queue.drain(..n);
                    passed += n as u64;
                    passed_tx.send_replace(passed);
                    continue;
                }
                if eof && queue.is_empty() {
                    let _ = near_w.shutdown().await;
                    return;
                }
                tokio::select! {
                    read = far_r.read_buf(&mut queue), if !eof => {
                        eof = !matches!(read, Ok(n) if n > 0);
                    }
                    changed = allowed_rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let relay = Relay {
            allowed,
            corrupt_at,
            passed,
        };
        (ours, theirs, relay)
    }

    /// Flips a bit of byte `at` of the peer's stream, if not yet passed.
    fn corrupt(&self, at: u64) {
        self.corrupt_at.store(at, Ordering::Relaxed);
    }

    /// Lets the peer's stream through up to byte `total`.
    fn allow(&self, total: u64) {
        self.allowed.send_replace(total);
    }

    /// Waits until the relay passed on `total` bytes of the peer's stream.
    async fn passed(&mut self, total: u64) {
        self.passed.wait_for(|&p| p >= total).await.unwrap();
    }

    /// Bytes of the peer's stream passed on so far.
    fn so_far(&self) -> u64 {
        *self.passed.borrow()
    }
}

/// Suspends `session`, takes its state through JSON and back (as it would
/// travel to the next process), and resumes on the same socket.
async fn suspend_and_resume(session: TlsSession) -> (TlsSession, SessionStateSummary) {
    let (tcp, state) = session.suspend().await.unwrap();
    let summary = SessionStateSummary {
        plaintext: state.plaintext.0.len(),
        received: state.received.0.len(),
    };
    let json = serde_json::to_string(&state).unwrap();
    drop(state);
    let state: SessionState = serde_json::from_str(&json).unwrap();
    (TlsSession::resume(tcp, state).unwrap(), summary)
}

/// What a suspend carried over in its buffers.
#[derive(Debug, Clone, Copy)]
struct SessionStateSummary {
    plaintext: usize,
    received: usize,
}
