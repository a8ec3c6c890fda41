//! The verifiers as rustls calls them, over certificates rcgen makes:
//! roots, intermediates and workload certificates of chosen identity,
//! use and validity.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    ClientConfig, ServerConfig,
    crypto::{CryptoProvider, aws_lc_rs},
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};

use super::{
    super::store::{ClientCert, IssuedCert, ServerCerts},
    *,
};

const CHECKOUT: &str = "spiffe://cluster.local/ns/payments/sa/checkout";
const LEDGER: &str = "spiffe://cluster.local/ns/payments/sa/ledger";

fn provider() -> CryptoProvider {
    aws_lc_rs::default_provider()
}

/// A certificate authority: its certificate and what signs with it.
struct Ca {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca_params(cn: &str, domain: Option<&str>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if let Some(d) = domain {
        p.subject_alt_names = vec![SanType::URI(format!("spiffe://{d}").try_into().unwrap())];
    }
    p
}

/// A root called `cn`, naming trust domain `domain` if given.
fn root(cn: &str, domain: Option<&str>) -> Ca {
    let p = ca_params(cn, domain);
    let key = KeyPair::generate().unwrap();
    let der = p.self_signed(&key).unwrap().der().clone();
    Ca {
        der,
        issuer: Issuer::new(p, key),
    }
}

/// An intermediate CA under `parent`.
fn intermediate(parent: &Ca) -> Ca {
    let p = ca_params("intermediate", None);
    let key = KeyPair::generate().unwrap();
    let der = p.signed_by(&key, &parent.issuer).unwrap().der().clone();
    Ca {
        der,
        issuer: Issuer::new(p, key),
    }
}

/// What a leaf may be used for.
#[derive(Clone, Copy)]
enum Usage {
    Both,
    ServerOnly,
    ClientOnly,
}

/// A workload certificate for `uri` that `ca` signs, valid from
/// `from` for `lasting`, and its key.
fn leaf_valid(
    ca: &Ca,
    uri: &str,
    usage: Usage,
    from: time::OffsetDateTime,
    lasting: time::Duration,
) -> (CertificateDer<'static>, KeyPair) {
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.extended_key_usages = match usage {
        Usage::Both => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Usage::ServerOnly => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Usage::ClientOnly => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    p.not_before = from;
    p.not_after = from + lasting;
    let key = KeyPair::generate().unwrap();
    let der = p.signed_by(&key, &ca.issuer).unwrap().der().clone();
    (der, key)
}

/// A workload certificate valid from an hour ago for two hours.
fn leaf_for(ca: &Ca, uri: &str, usage: Usage) -> CertificateDer<'static> {
    let from = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    leaf_valid(ca, uri, usage, from, time::Duration::hours(2)).0
}

fn leaf(ca: &Ca, uri: &str) -> CertificateDer<'static> {
    leaf_for(ca, uri, Usage::Both)
}

/// A store of trust domain cluster.local trusting `roots`.
fn trusting(roots: &[&Ca]) -> Arc<CertStore> {
    let store = CertStore::new("cluster.local", &provider());
    let ders: Vec<_> = roots.iter().map(|r| r.der.clone()).collect();
    store.set_roots(&ders).unwrap();
    Arc::new(store)
}

fn name(server_name: &str) -> ServerName<'static> {
    ServerName::try_from(server_name.to_owned()).unwrap()
}

/// What the peer verifier says of `chain` when the client asked for
/// `server_name`, as rustls asks at `now`.
fn as_server(
    store: &Arc<CertStore>,
    chain: &[CertificateDer<'static>],
    server_name: &str,
    now: UnixTime,
) -> Result<ServerCertVerified, TlsError> {
    PeerVerifier(store.clone()).verify_server_cert(
        &chain[0],
        &chain[1..],
        &name(server_name),
        &[],
        now,
    )
}

/// What the caller verifier says of `chain`, as rustls asks at `now`.
fn as_client(
    store: &Arc<CertStore>,
    chain: &[CertificateDer<'static>],
    now: UnixTime,
) -> Result<ClientCertVerified, TlsError> {
    CallerVerifier(store.clone()).verify_client_cert(&chain[0], &chain[1..], now)
}

/// The refusal's certificate error, for a refusal that is one.
fn certificate_error<T: std::fmt::Debug>(r: Result<T, TlsError>) -> CertificateError {
    match r {
        Err(TlsError::InvalidCertificate(e)) => e,
        other => panic!("not a certificate refusal: {other:?}"),
    }
}

/// The message of a refusal carried as another error.
fn other_message<T: std::fmt::Debug>(r: Result<T, TlsError>) -> String {
    match certificate_error(r) {
        CertificateError::Other(other) => other.0.to_string(),
        e => panic!("not carried whole: {e:?}"),
    }
}

#[test]
fn a_certificate_of_the_trusted_root_with_the_expected_identity_passes() {
    let ca = root("mesh root", None);
    let store = trusting(&[&ca]);
    let chain = [leaf(&ca, CHECKOUT)];
    let now = UnixTime::now();
    assert!(as_server(&store, &chain, "checkout.payments.sluice", now).is_ok());
    assert!(as_client(&store, &chain, now).is_ok());
    assert!(store.verify_caller(&chain, now).is_ok());
}

#[test]
fn a_peer_with_another_identity_is_refused_naming_both() {
    let ca = root("mesh root", None);
    let store = trusting(&[&ca]);
    let now = UnixTime::now();
    let e = as_server(
        &store,
        &[leaf(&ca, CHECKOUT)],
        "ledger.payments.sluice",
        now,
    )
    .unwrap_err();
    let TlsError::General(message) = e else {
        panic!("{e:?}")
    };
    assert!(
        message.contains(&format!("presented identity {CHECKOUT}"))
            && message.contains(&format!("where {LEDGER} was expected")),
        "{message}"
    );
    // A server name that asks for no identity: nothing can match.
    let e = as_server(&store, &[leaf(&ca, CHECKOUT)], "example.com", now).unwrap_err();
    assert!(e.to_string().contains("where none was expected"), "{e}");
    // A certificate that names none.
    let e = as_server(
        &store,
        &[leaf(&ca, "https://example.com/")],
        "a.b.sluice",
        now,
    )
    .unwrap_err();
    assert!(e.to_string().contains("presented identity none"), "{e}");
}

#[test]
fn a_certificate_of_an_untrusted_root_is_refused() {
    let ours = root("mesh root", None);
    let theirs = root("another root", None);
    let store = trusting(&[&ours]);
    let chain = [leaf(&theirs, CHECKOUT)];
    let now = UnixTime::now();
    let unknown = CertificateError::UnknownIssuer;
    assert_eq!(
        certificate_error(as_server(&store, &chain, "checkout.payments.sluice", now)),
        unknown
    );
    assert_eq!(certificate_error(as_client(&store, &chain, now)), unknown);
    // A root that takes the trusted one's name signs with another key.
    let impostor = root("mesh root", None);
    assert_eq!(
        certificate_error(as_client(&store, &[leaf(&impostor, CHECKOUT)], now)),
        CertificateError::BadSignature
    );
    // A new bundle is read at the next handshake: trusted now, and the
    // old root's certificates no longer.
    store.set_roots(std::slice::from_ref(&theirs.der)).unwrap();
    assert!(as_client(&store, &chain, now).is_ok());
    let ours_chain = [leaf(&ours, CHECKOUT)];
    assert_eq!(
        certificate_error(as_client(&store, &ours_chain, now)),
        unknown
    );
}

#[test]
fn an_expired_or_not_yet_valid_certificate_is_refused_at_the_time_rustls_gives() {
    let ca = root("mesh root", None);
    let store = trusting(&[&ca]);
    let now = time::OffsetDateTime::now_utc();
    let hour = time::Duration::hours(1);
    let (expired, _) = leaf_valid(&ca, CHECKOUT, Usage::Both, now - 2 * hour, hour);
    let (future, _) = leaf_valid(&ca, CHECKOUT, Usage::Both, now + hour, hour);
    let at = UnixTime::now();
    assert_eq!(
        certificate_error(as_server(
            &store,
            std::slice::from_ref(&expired),
            "checkout.payments.sluice",
            at
        )),
        CertificateError::Expired
    );
    assert_eq!(
        certificate_error(as_client(&store, &[expired], at)),
        CertificateError::Expired
    );
    assert_eq!(
        certificate_error(as_client(&store, &[future], at)),
        CertificateError::NotValidYet
    );
    // The verifiers read no clock of their own: a valid certificate is
    // expired at a time past its end.
    let valid = [leaf(&ca, CHECKOUT)];
    let later = UnixTime::since_unix_epoch(Duration::from_secs(at.as_secs() + 3 * 3600));
    assert_eq!(
        certificate_error(as_client(&store, &valid, later)),
        CertificateError::Expired
    );
    assert_eq!(
        certificate_error(store.verify_caller(&valid, later)),
        CertificateError::Expired
    );
}

#[test]
fn a_certificate_outside_the_trust_domain_of_its_root_is_refused() {
    // A root naming no domain vouches for the agent's own only.
    let ca = root("mesh root", None);
    let store = trusting(&[&ca]);
    let partner = "spiffe://partner.example/ns/a/sa/b";
    let chain = [leaf(&ca, partner)];
    let now = UnixTime::now();
    let expected = format!("{partner} chains to a root bound to trust domain cluster.local");
    assert_eq!(
        other_message(as_server(&store, &chain, "b.a.sluice", now)),
        expected
    );
    assert_eq!(other_message(as_client(&store, &chain, now)), expected);
    match certificate_error(as_client(&store, &chain, now)) {
        CertificateError::Other(other) => {
            assert!(other.0.downcast_ref::<RootOutOfDomain>().is_some())
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn a_root_vouches_only_for_its_own_trust_domain() {
    let ours = root("mesh root", None);
    let partner = root("partner root", Some("partner.example"));
    let store = trusting(&[&ours, &partner]);
    let now = UnixTime::now();
    assert!(store.verify_caller(&[leaf(&ours, CHECKOUT)], now).is_ok());
    let forged = store.verify_caller(&[leaf(&partner, CHECKOUT)], now);
    let forged = format!("{:?}", forged.unwrap_err());
    assert!(
        forged.contains("RootOutOfDomain") && forged.contains("partner.example"),
        "{forged}"
    );
    let theirs = leaf(&partner, "spiffe://partner.example/ns/a/sa/b");
    assert!(store.verify_caller(&[theirs], now).is_ok());
}

#[test]
fn a_certificate_is_refused_for_a_use_it_does_not_allow() {
    let ca = root("mesh root", None);
    let store = trusting(&[&ca]);
    let now = UnixTime::now();
    let client_only = [leaf_for(&ca, CHECKOUT, Usage::ClientOnly)];
    let server_only = [leaf_for(&ca, CHECKOUT, Usage::ServerOnly)];
    assert!(as_server(&store, &client_only, "checkout.payments.sluice", now).is_err());
    assert!(as_client(&store, &client_only, now).is_ok());
    assert!(as_client(&store, &server_only, now).is_err());
    assert!(as_server(&store, &server_only, "checkout.payments.sluice", now).is_ok());
}

#[test]
fn a_chain_through_an_intermediate_passes_only_with_the_intermediate() {
    let ca = root("mesh root", None);
    let middle = intermediate(&ca);
    let store = trusting(&[&ca]);
    let now = UnixTime::now();
    let whole = [leaf(&middle, CHECKOUT), middle.der.clone()];
    assert!(as_server(&store, &whole, "checkout.payments.sluice", now).is_ok());
    assert!(as_client(&store, &whole, now).is_ok());
    assert!(store.verify_caller(&whole, now).is_ok());
    assert_eq!(
        certificate_error(as_client(&store, &whole[..1], now)),
        CertificateError::UnknownIssuer
    );
    assert!(matches!(
        store.verify_caller(&[], now),
        Err(TlsError::NoCertificatesPresented)
    ));
}

/// `uri`'s certificate from `ca`, as the store holds it.
fn install(store: &CertStore, ca: &Ca, uri: &str) {
    let from = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let (der, key) = leaf_valid(ca, uri, Usage::Both, from, time::Duration::hours(2));
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = provider().key_provider.load_private_key(key).unwrap();
    let now = std::time::SystemTime::now();
    store.install(
        Identity::parse(uri).unwrap(),
        IssuedCert {
            key: Arc::new(CertifiedKey::new(vec![der], signing)),
            not_after: now + Duration::from_secs(3600),
            installed: now,
        },
    );
}

#[tokio::test]
async fn two_agents_configured_with_the_verifiers_complete_a_handshake() {
    let ca = root("mesh root", None);
    let store = trusting(&[&ca]);
    install(&store, &ca, CHECKOUT);
    install(&store, &ca, LEDGER);
    let provider = Arc::new(provider());
    let tls13 = &[&rustls::version::TLS13];
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(tls13)
        .unwrap()
        .with_client_cert_verifier(Arc::new(CallerVerifier(store.clone())))
        .with_cert_resolver(Arc::new(ServerCerts(store.clone())));
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(tls13)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PeerVerifier(store.clone())))
        .with_client_cert_resolver(Arc::new(ClientCert {
            store: store.clone(),
            identity: Identity::parse(CHECKOUT).unwrap(),
        }));
    let (a, b) = tokio::io::duplex(16 * 1024);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let (client, server) = tokio::join!(
        connector.connect(name("ledger.payments.sluice"), a),
        acceptor.accept(b)
    );
    let (client, server) = (client.unwrap(), server.unwrap());
    let callers = server.get_ref().1.peer_certificates().unwrap();
    assert_eq!(
        identity_of(&callers[0]).unwrap(),
        Identity::parse(CHECKOUT).unwrap()
    );
    let served = client.get_ref().1.peer_certificates().unwrap();
    assert_eq!(
        identity_of(&served[0]).unwrap(),
        Identity::parse(LEDGER).unwrap()
    );
}
