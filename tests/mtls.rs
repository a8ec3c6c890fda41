//! Mutual TLS between two nodes, as root: two network namespaces joined by
//! a veth pair, an agent in each with its own workload cgroups, a backend
//! workload on node B and callers on node A. The certificates, the inbound
//! listener and the redirect are the real ones.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::support::*;
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use sluice_testkit::{process::SpawnGuarded, wait::wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MARKER: &str = "PAYMENT-MARKER-7f3a";
pub(crate) const VIP: &str = "127.77.3.10:8080";
const PLAIN_VIP: &str = "127.77.3.11:8080";
pub(crate) const HOUR: Duration = Duration::from_secs(3600);

pub(crate) struct Mesh {
    // Field order is drop order: the agents, then what they use.
    pub(crate) a: Agent,
    pub(crate) b: Agent,
    pub(crate) configs: (AgentConfig, AgentConfig),
    pub(crate) state: TempDir,
    pub(crate) ledger: Backend,
    /// Serves the ledger endpoint instead of `ledger`, when asked for.
    pub(crate) stream: Option<StreamServer>,
    plain: Backend,
    pub(crate) inbound_port: u16,
    pub(crate) pair: NodePair,
}

/// Node A runs callers `client` (payments/checkout) and `batch`
/// (payments/batch); node B runs `ledger`, which only checkout may call.
/// Certificates live `lifetime`.
fn mesh(lifetime: Duration) -> Mesh {
    mesh_audited(lifetime, false)
}

/// [`mesh`], with node B's audit trail in its config's `audit.jsonl` when
/// `audit`.
fn mesh_audited(lifetime: Duration, audit: bool) -> Mesh {
    mesh_with(lifetime, audit, None, None)
}

/// The mesh, its ledger endpoint served by a [`StreamServer`] sending a
/// tail of `tail` bytes at `pace` when `stream` says so, its connections
/// between the nodes in pooled tunnels configured so when `tunnels`.
pub(crate) fn mesh_with(
    lifetime: Duration,
    audit: bool,
    stream: Option<(usize, Duration)>,
    tunnels: Option<config::Tunnels>,
) -> Mesh {
    let pair = NodePair::new();
    let ledger = Backend::start_in("ledger", "127.0.0.1:0".parse().unwrap(), &pair.b);
    let stream = stream.map(|(tail, pace)| pair.b.run(move || StreamServer::start(tail, pace)));
    let plain = Backend::start_in("plain", SocketAddr::new(pair.b_addr, 0), &pair.b);
    let state = TempDir::create("mesh-state").unwrap();
    let inbound_port = free_port().unwrap();
    let services = |ledger_endpoint: Endpoint| {
        vec![
            service("ledger", VIP, &[]).endpoints(vec![ledger_endpoint]),
            service("ledger-plain", PLAIN_VIP, &[])
                .mode(Mode::Plaintext)
                .endpoints(vec![Endpoint::new(plain.addr).remote("node-b", None)]),
        ]
    };
    let node = |c: &AgentConfig, name: &str, address, peer: &str, peer_address| {
        let mut config = c.mesh_node(
            (name, address),
            state.path(),
            inbound_port,
            (peer, peer_address),
        );
        if let Some(mesh) = &mut config.mesh {
            mesh.certificates = Some(config::Certificates {
                local_ca: config::LocalCa { lifetime },
            });
            // The per-connection transport unless a test asks for tunnels.
            mesh.tunnels = Some(tunnels.clone().unwrap_or_default());
        }
        config
    };
    let ledger_port = stream
        .as_ref()
        .map_or(ledger.addr.port(), |s| s.addr.port());
    let ledger_addr = SocketAddr::from(([127, 0, 0, 1], ledger_port));
    let a_cfg = AgentConfig::with(|c| Config {
        workloads: vec![
            Workload::new("client", "payments", "checkout"),
            Workload::new("batch", "payments", "batch"),
        ],
        services: services(Endpoint::new(ledger_addr).remote("node-b", Some("ledger"))),
        ..node(c, "node-a", pair.a_addr, "node-b", pair.b_addr)
    });
    let b_cfg = AgentConfig::with(|c| Config {
        workloads: vec![Workload::new("ledger", "payments", "ledger").authorization(
            Authorization {
                default: Decision::Deny,
                allow: vec!["spiffe://cluster.local/ns/payments/sa/checkout".to_owned()],
                deny: vec![],
                requests: vec![],
            },
        )],
        services: services(Endpoint::new(ledger_addr).workload("ledger")),
        audit: audit.then(|| Audit {
            output: c.audit_path(),
            requests: false,
        }),
        ..node(c, "node-b", pair.b_addr, "node-a", pair.a_addr)
    });
    // One CA for both nodes, as an operator would distribute it.
    a_cfg.ca_init();
    let a = Agent::start_in_netns(&a_cfg, &pair.a);
    let b = Agent::start_in_netns(&b_cfg, &pair.b);
    Mesh {
        a,
        b,
        configs: (a_cfg, b_cfg),
        state,
        ledger,
        stream,
        plain,
        inbound_port,
        pair,
    }
}

/// A [`Client::Stream`](sluice_testkit::client::Client::Stream) from the
/// client workload to the ledger service: `bytes` sent at `pace` a KiB,
/// then the stream server's `tail` read; prints `intact <n>` or what went
/// wrong.
pub(crate) fn stream_client(
    m: &Mesh,
    bytes: usize,
    tail: usize,
    pace: Duration,
) -> sluice_testkit::process::ChildGuard {
    let stream = sluice_testkit::client::Client::Stream {
        to: VIP.parse().unwrap(),
        bytes,
        tail,
        pace,
    };
    m.a.client("client", stream)
        .stdout(std::process::Stdio::piped())
        .spawn_guarded()
        .expect("start the client")
}

/// `n` calls to `vip`, one connection each, sending `<text> <i>`.
pub(crate) fn calls(vip: &str, n: usize, text: &str) -> Calls {
    Calls::new(vip.parse().unwrap(), n).text(text)
}

#[test]
fn a_cross_node_call_goes_over_mtls_with_no_plaintext_on_the_wire() {
    let m = mesh(HOUR);
    let capture = Capture::start(&m.pair.a, &m.pair.a_if);
    let secure = m.a.run_client("client", calls(VIP, 3, MARKER));
    let wire = capture.finish();
    assert_eq!(
        secure,
        (1..=3)
            .map(|i| format!("ledger {MARKER} {i}"))
            .collect::<Vec<_>>()
    );
    assert_eq!(m.ledger.accepted(), 3);
    assert!(
        contains(&wire, &m.inbound_port.to_be_bytes()),
        "the capture saw the agents' connections"
    );
    assert!(!contains(&wire, MARKER.as_bytes()), "plaintext on the wire");

    // Control: the same capture does see a plaintext service's payload.
    let capture = Capture::start(&m.pair.a, &m.pair.a_if);
    let plain = m.a.run_client("client", calls(PLAIN_VIP, 1, MARKER));
    let wire = capture.finish();
    assert_eq!(plain, [format!("plain {MARKER} 1")]);
    assert_eq!(m.plain.accepted(), 1);
    assert!(contains(&wire, MARKER.as_bytes()), "the capture works");
}

/// A new `agent.inbound_port` in node A's file waits for a restart, as
/// status says: node B still listens on the old one, and A keeps dialing
/// it. (A reload used to build A's peers from the new port at once, which
/// cut every call between nodes until both had restarted.)
#[test]
fn a_reloaded_inbound_port_waits_for_the_restart_as_status_says() {
    let m = mesh(HOUR);
    assert_eq!(
        m.a.run_client("client", calls(VIP, 1, "before")),
        ["ledger before 1"]
    );
    let reloads = || m.a.reloads("success");
    let before = reloads();
    let path = &m.configs.0.path;
    let text = std::fs::read_to_string(path).unwrap();
    let old = format!("\"inbound_port\": {}", m.inbound_port);
    assert!(text.contains(&old), "{text}");
    let moved = free_port().unwrap();
    m.configs
        .0
        .write_raw(&text.replace(&old, &format!("\"inbound_port\": {moved}")));
    assert!(
        wait_until(Duration::from_secs(5), || reloads() == before + 1.0),
        "{}",
        m.a.log()
    );
    assert_eq!(
        m.a.view("/debug/status")["restart_pending"],
        serde_json::json!(["agent"])
    );
    assert_eq!(
        m.a.run_client("client", calls(VIP, 3, "after")),
        (1..=3)
            .map(|i| format!("ledger after {i}"))
            .collect::<Vec<_>>(),
        "node A still dials node B's running port"
    );
}

#[test]
fn authorization_lets_checkout_in_and_keeps_batch_out() {
    let m = mesh_audited(HOUR, true);
    let allowed = m.a.run_client("client", calls(VIP, 1, "charge"));
    assert_eq!(allowed, ["ledger charge 1"]);
    let denied = m.a.run_client("batch", calls(VIP, 1, "charge"));
    assert_eq!(denied, ["FAILED"]);
    assert_eq!(
        m.ledger.accepted(),
        1,
        "no byte of the denied call reached ledger"
    );
    // Node B's audit trail: one denial, naming the caller, the target and
    // the rule.
    let denials = audit_lines(&m.configs.1.audit_path(), "denied", 1);
    assert_eq!(denials.len(), 1, "{denials:?}");
    let denial = &denials[0];
    assert_eq!(
        denial["source"]["identity"], "spiffe://cluster.local/ns/payments/sa/batch",
        "{denial}"
    );
    assert_eq!(
        denial["destination"]["address"],
        format!("127.0.0.1:{}", m.ledger.addr.port()),
        "{denial}"
    );
    assert_eq!(
        denial["destination"]["workload"], "payments/ledger",
        "{denial}"
    );
    assert_eq!(
        denial["rule"], "workload payments/ledger default deny",
        "{denial}"
    );
    // The denial counter, as `sluice status` on node B reports it.
    let out = m.b.sluice(&["status", "-o", "json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["inbound_refused"]["denied"], 1, "{status}");
    assert_eq!(status["inbound_accepted"], 1);
}

/// Certificates that live 4 s are renewed every 2 s; 45 s of calls, each on
/// a new connection, never fails. (Under the 60 s bound every client run
/// has.)
#[test]
fn calls_carry_on_while_certificates_rotate() {
    let m = mesh(Duration::from_secs(4));
    let ticks = calls(VIP, 1000, "tick")
        .pause(Duration::from_millis(200))
        .lasting(Duration::from_secs(45));
    let replies = m.a.run_client("client", ticks);
    assert!(replies.len() > 100, "{} calls", replies.len());
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(*reply, format!("ledger tick {}", i + 1), "{replies:?}");
    }
    for (node, agent) in [("a", &m.a), ("b", &m.b)] {
        let renewals = agent
            .metrics()
            .get("sluice_certificate_renewals_total", &[])
            .unwrap_or(0.0);
        assert!(renewals >= 10.0, "node {node} renewed {renewals} times");
    }
}

// ---- Bad inputs against the real inbound listener ----

/// Accepts any server certificate: these tests probe the server.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A client certificate for `uri`, valid from `from` to `to`, signed by the
/// CA in `ca_dir` (or by a fresh, untrusted CA when `ca_dir` is None).
pub(crate) fn client_cert(
    ca_dir: Option<&Path>,
    uri: &str,
    from: SystemTime,
    to: SystemTime,
) -> Arc<CertifiedKey> {
    let (cert, key) = issue(ca_dir, uri, from, to);
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
        .unwrap();
    Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing))
}

/// A certificate for `uri` valid `from` `to`, from the CA in `ca_dir` (or
/// a CA of its own), and its key.
pub(crate) fn issue(
    ca_dir: Option<&Path>,
    uri: &str,
    from: SystemTime,
    to: SystemTime,
) -> (rcgen::Certificate, KeyPair) {
    let issuer = match ca_dir {
        Some(dir) => {
            let key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca-key.pem")).unwrap())
                .unwrap();
            Issuer::from_ca_cert_pem(&std::fs::read_to_string(dir.join("ca.pem")).unwrap(), key)
                .unwrap()
        }
        None => {
            let mut p = CertificateParams::default();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            Issuer::new(p, KeyPair::generate().unwrap())
        }
    };
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let at = |t: SystemTime| {
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap()
    };
    p.not_before = at(from);
    p.not_after = at(to);
    (p.signed_by(&key, &issuer).unwrap(), key)
}

fn tls_config(cert: Arc<CertifiedKey>) -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_cert_resolver(Arc::new(Fixed(cert))),
    )
}

/// One bad peer.
enum Probe {
    /// Plain TCP, sending these bytes.
    Plain(Vec<u8>),
    /// TLS with this client certificate, then this.
    Tls(Arc<CertifiedKey>, After),
}

/// What a probe sends after the TLS handshake.
enum After {
    Preamble(Vec<u8>),
    Nothing,
}

/// Connects to `listener` over TLS with `cert` and sends `after`; returns
/// once the server has closed the connection (or after 5 s).
async fn probe_tls(listener: SocketAddr, cert: Arc<CertifiedKey>, after: After) {
    let tcp = tokio::net::TcpStream::connect(listener).await.unwrap();
    let name = ServerName::try_from("ledger.payments.sluice").unwrap();
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(tls_config(cert))
        .connect(name, tcp)
        .await
    else {
        return;
    };
    if let After::Preamble(bytes) = after {
        let _ = tls.write_all(&bytes).await;
    }
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
}

async fn probe_plain(listener: SocketAddr, bytes: &[u8]) {
    let mut tcp = tokio::net::TcpStream::connect(listener).await.unwrap();
    let _ = tcp.write_all(bytes).await;
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await;
}

/// Inbound refusals for `reason` as `sluice status` on `agent`'s node
/// reports them.
fn refusals(agent: &Agent, reason: &str) -> u64 {
    let out = agent.sluice(&["status", "-o", "json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    status["inbound_refused"][reason].as_u64().unwrap_or(0)
}

fn preamble(target: &str) -> Vec<u8> {
    let mut p = vec![b'S', 1];
    p.extend_from_slice(&(target.len() as u16).to_be_bytes());
    p.extend_from_slice(target.as_bytes());
    p
}

#[test]
fn bad_peers_are_refused_for_the_right_reason_while_a_good_connection_carries_on() {
    let m = mesh(HOUR);
    let ca = m.state.join("ca");
    let listener = SocketAddr::new(m.pair.b_addr, m.inbound_port);

    // A good, long-lived connection from node A through the mesh.
    let mut good = m.a.hold("client", VIP.parse().unwrap());
    assert_eq!(good.ask("before"), "ledger before");

    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let checkout = "spiffe://cluster.local/ns/payments/sa/checkout";
    let fresh = |uri: &str| client_cert(Some(&ca), uri, now - hour, now + hour);
    let mut oversized = vec![b'S', 1];
    oversized.extend_from_slice(&4000u16.to_be_bytes());
    oversized.extend(std::iter::repeat_n(b'x', 4000));
    let cases: Vec<(&str, Probe)> = vec![
        ("not_tls", Probe::Plain(b"GET / HTTP/1.1\r\n\r\n".to_vec())),
        (
            "not_tls",
            Probe::Plain(vec![0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3, 4, 5, 6, 7]),
        ),
        (
            "unknown_ca",
            Probe::Tls(
                client_cert(None, checkout, now - hour, now + hour),
                After::Nothing,
            ),
        ),
        (
            "certificate_expired",
            Probe::Tls(
                client_cert(Some(&ca), checkout, now - 2 * hour, now - hour),
                After::Nothing,
            ),
        ),
        (
            "certificate_not_yet_valid",
            Probe::Tls(
                client_cert(Some(&ca), checkout, now + hour, now + 2 * hour),
                After::Nothing,
            ),
        ),
        (
            "wrong_trust_domain",
            Probe::Tls(
                fresh("spiffe://elsewhere.example/ns/payments/sa/checkout"),
                After::Preamble(preamble("127.0.0.1:1")),
            ),
        ),
        (
            "preamble_oversized",
            Probe::Tls(fresh(checkout), After::Preamble(oversized)),
        ),
        (
            "preamble_timeout",
            Probe::Tls(fresh(checkout), After::Preamble(vec![b'S', 1])),
        ),
        (
            "unknown_target",
            Probe::Tls(fresh(checkout), After::Preamble(preamble("127.0.0.1:1"))),
        ),
    ];
    let expected: Vec<&str> = cases.iter().map(|(r, _)| *r).collect();
    m.pair.a.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for (_, probe) in cases {
            match probe {
                Probe::Plain(bytes) => rt.block_on(probe_plain(listener, &bytes)),
                Probe::Tls(cert, after) => rt.block_on(probe_tls(listener, cert, after)),
            }
        }
    });
    for reason in &expected {
        let needed = expected.iter().filter(|r| *r == reason).count() as u64;
        assert!(
            wait_until(Duration::from_secs(5), || refusals(&m.b, reason) == needed),
            "expected {needed} x {reason}, counted {}; log:\n{}",
            refusals(&m.b, reason),
            m.b.log()
        );
    }
    // Each reason is logged once however often it happens (the counters
    // above stay exact): an attacker does not set the log volume.
    assert_eq!(m.b.log().matches("refused: not_tls:").count(), 1);

    // The good connection was never disturbed, and a valid peer still gets
    // through with the same certificate authority.
    assert_eq!(good.ask("after"), "ledger after");
    let ok = m.a.run_client("client", calls(VIP, 1, "fine"));
    assert_eq!(ok, ["ledger fine 1"]);
}

/// TLS 1.3 resumption restores the client's certificate from the ticket
/// without checking it again: a session whose certificate has expired
/// since must be refused like a fresh handshake with that certificate.
#[test]
fn a_resumed_session_is_refused_once_its_certificate_has_expired() {
    let m = mesh(HOUR);
    let ca = m.state.join("ca");
    let listener = SocketAddr::new(m.pair.b_addr, m.inbound_port);
    let now = SystemTime::now();
    let expires = now + Duration::from_secs(3);
    let cert = client_cert(
        Some(&ca),
        "spiffe://cluster.local/ns/payments/sa/checkout",
        now - Duration::from_secs(3600),
        expires,
    );
    let config = tls_config(cert);
    let kinds = m.pair.a.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let first = handshake_kind(listener, config.clone()).await;
            // Until the certificate is past its not-after (whole seconds).
            while SystemTime::now() < expires + Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let second = handshake_kind(listener, config).await;
            (first, second)
        })
    });
    assert_eq!(
        kinds,
        (
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ),
        "the second connection must resume the first one's session"
    );
    assert!(
        wait_until(Duration::from_secs(5), || refusals(
            &m.b,
            "certificate_expired"
        ) == 1),
        "{}",
        m.b.log()
    );
}

/// Connects with `config`, reads until the server closes (collecting the
/// session tickets it sends), and says how the handshake went.
async fn handshake_kind(
    listener: SocketAddr,
    config: Arc<ClientConfig>,
) -> Option<rustls::HandshakeKind> {
    let tcp = tokio::net::TcpStream::connect(listener).await.unwrap();
    let name = ServerName::try_from("ledger.payments.sluice").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .ok()?;
    let kind = tls.get_ref().1.handshake_kind();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
    kind
}

/// Resident memory of process `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Round trips of one persistent connection through node B's outbound
/// listener (ledger calling the plaintext service on its own node): their
/// p50 and p99 in microseconds.
fn outbound_latency(m: &Mesh, rounds: usize) -> (u64, u64) {
    let script = format!(
        "python3 -c 'import socket, time\n\
s = socket.create_connection((\"127.77.3.11\", 8080))\n\
f = s.makefile(\"rb\")\n\
t = []\n\
for i in range({rounds}):\n    a = time.perf_counter(); s.sendall(b\"x\\n\"); f.readline(); t.append(time.perf_counter() - a)\n\
t.sort()\n\
print(int(t[len(t) // 2] * 1e6), int(t[len(t) * 99 // 100] * 1e6))'"
    );
    let out = lines(&m.b.workload_command("ledger", &script).output().unwrap());
    let (p50, p99) = out[0].split_once(' ').unwrap();
    (p50.parse().unwrap(), p99.parse().unwrap())
}

/// 500 TLS handshakes that never finish, from one peer: the inbound port
/// runs a bounded number at once (the rest wait for a place within the
/// handshake deadline), every one is refused or times out, a meshed stream from node A loses nothing, the
/// log stays at a line per reason, and the memory comes back.
#[test]
fn a_flood_of_unauthenticated_handshakes_is_bounded_and_costs_nothing_after() {
    let m = mesh(HOUR);
    let listener = SocketAddr::new(m.pair.b_addr, m.inbound_port);
    // Warm up both paths, then take the baseline.
    assert_eq!(m.a.run_client("client", calls(VIP, 20, "warm")).len(), 20);
    let quiet = outbound_latency(&m, 500);
    let before = rss_kib(m.b.pid());

    // A client hello, as a real TLS client sends it.
    let hello = {
        let cert = client_cert(
            None,
            "spiffe://cluster.local/ns/payments/sa/x",
            SystemTime::now() - Duration::from_secs(60),
            SystemTime::now() + Duration::from_secs(3600),
        );
        let mut conn = rustls::ClientConnection::new(
            tls_config(cert),
            ServerName::try_from("ledger.payments.sluice").unwrap(),
        )
        .unwrap();
        let mut bytes = Vec::new();
        conn.write_tls(&mut bytes).unwrap();
        bytes
    };
    // The stream's connection is up before the flood starts (it comes from
    // node A's address too, like the flood).
    let accepted = m.ledger.accepted();
    let mut stream = m.a.hold("client", VIP.parse().unwrap());
    assert!(wait_until(Duration::from_secs(10), || m.ledger.accepted()
        == accepted + 1));
    let (in_flight, flooding) = std::sync::mpsc::channel();
    let flood = m.pair.a.spawn(move || {
        let conns: Vec<std::net::TcpStream> = (0..500)
            .filter_map(|_| {
                let mut c = std::net::TcpStream::connect(listener).ok()?;
                let _ = std::io::Write::write_all(&mut c, &hello);
                Some(c)
            })
            .collect();
        let _ = in_flight.send(());
        // Held until the agent's handshake deadline (1 s) has passed.
        std::thread::sleep(Duration::from_secs(2));
        conns.len()
    });
    flooding.recv().unwrap();
    // During the flood: 300 lines on the stream, and the latency of node B's
    // own outbound path.
    let stream = std::thread::spawn(move || {
        (1..=300)
            .map(|i| stream.ask(&format!("s {i}")))
            .collect::<Vec<String>>()
    });
    let loaded = outbound_latency(&m, 500);
    assert_eq!(flood.join().unwrap(), 500);
    let replies = stream.join().unwrap();
    let expected: Vec<String> = (1..=300).map(|i| format!("ledger s {i}")).collect();
    assert_eq!(replies, expected, "the meshed stream lost or changed bytes");

    let refused = ["overloaded", "handshake_timeout", "closed_during_handshake"];
    assert!(
        wait_until(Duration::from_secs(10), || refused
            .iter()
            .map(|r| refusals(&m.b, r))
            .sum::<u64>()
            == 500),
        "every handshake refused or timed out: {:?}",
        refused.map(|r| (r, refusals(&m.b, r)))
    );
    let logged = m.b.log().matches("refused:").count();
    assert!(logged <= refused.len(), "{logged} refusal lines logged");
    // The memory a flood took is given back once it is over.
    let mut after = 0;
    let settled = wait_until(Duration::from_secs(15), || {
        after = rss_kib(m.b.pid());
        after <= before + 2048
    });
    eprintln!(
        "inbound flood of 500 handshakes: node B's outbound p50/p99 {}/{} us quiet, {}/{} us \
         during the flood; RSS {before} KiB before, {after} KiB after",
        quiet.0, quiet.1, loaded.0, loaded.1
    );
    assert!(
        settled,
        "RSS {after} KiB after the flood, {before} KiB before"
    );
}

/// An mTLS connection across two nodes, streaming both ways, lives through
/// two upgrades of each node's agent (its TLS session moving with it each
/// time), with the client's half-close between the rounds: every byte
/// arrives once and in order, and each old agent exits within 2 s.
#[test]
fn an_mtls_stream_across_nodes_survives_upgrades_of_both_agents() {
    let (bytes, tail, pace) = (1 << 20, 512 << 10, Duration::from_millis(3));
    let mut m = mesh_with(HOUR, false, Some((tail, Duration::from_millis(6))), None);
    let client = stream_client(&m, bytes, tail, pace);
    let active = |agent: &Agent| agent.metrics().sum("sluice_tcp_connections_active", &[]);
    assert!(wait_until(Duration::from_secs(10), || active(&m.a) >= 1.0));
    let stream = m.stream.take().expect("a stream server");
    let received = |agent: &Agent| {
        agent.metrics().sum(
            "sluice_handover_connections_total",
            &[("result", "received")],
        )
    };
    for round in 0..2 {
        if round == 1 {
            // The second round comes after the client's half-close.
            assert!(wait_until(Duration::from_secs(20), || stream.half_closed() == 1));
        } else {
            assert_eq!(
                stream.half_closed(),
                0,
                "the half-close comes between the rounds"
            );
        }
        let a = Agent::start_in_netns(&m.configs.0, &m.pair.a);
        let mut old_a = std::mem::replace(&mut m.a, a);
        let status = old_a.wait(Duration::from_secs(2));
        assert!(
            status.success(),
            "node a's old agent: {status}\n{}",
            old_a.log()
        );
        assert_eq!(
            received(&m.a),
            1.0,
            "round {round}: node a took the connection"
        );
        let b = Agent::start_in_netns(&m.configs.1, &m.pair.b);
        let mut old_b = std::mem::replace(&mut m.b, b);
        let status = old_b.wait(Duration::from_secs(2));
        assert!(
            status.success(),
            "node b's old agent: {status}\n{}",
            old_b.log()
        );
        assert_eq!(
            received(&m.b),
            1.0,
            "round {round}: node b took the connection"
        );
    }
    let out = client.wait_with_output().expect("the client ends");
    assert_eq!(lines(&out), [format!("intact {}", bytes + tail)]);
    drop(stream);
}
