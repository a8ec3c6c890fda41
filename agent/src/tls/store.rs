//! The certificates the agent holds: one per local workload identity, the
//! trust bundle, and the rustls hooks that read them at each handshake, so
//! a rotation or a new bundle takes effect without rebuilding anything and
//! without touching open connections.

use std::{collections::HashMap, fmt, sync::Arc, time::SystemTime};

use arc_swap::ArcSwap;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::{
        ClientHello, ResolvesServerCert,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};

use super::identity::Identity;

/// One identity's current certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub key: Arc<CertifiedKey>,
    pub not_after: SystemTime,
    /// When this certificate was installed (for renewal at half-life).
    pub installed: SystemTime,
}

/// Certificates by identity and the trust anchors; each swapped whole.
pub struct CertStore {
    trust_domain: String,
    certs: ArcSwap<HashMap<Identity, IssuedCert>>,
    bundle: ArcSwap<Bundle>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("trust_domain", &self.trust_domain)
            .field("identities", &self.certs.load().len())
            .field("anchors", &self.bundle.load().anchors.len())
            .finish()
    }
}

impl CertStore {
    pub fn new(trust_domain: &str, provider: &CryptoProvider) -> CertStore {
        CertStore {
            trust_domain: trust_domain.to_owned(),
            certs: ArcSwap::from_pointee(HashMap::new()),
            bundle: ArcSwap::from_pointee(Bundle::default()),
            algorithms: provider.signature_verification_algorithms,
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Installs (or replaces) the certificate of `id`.
    pub fn install(&self, id: Identity, cert: IssuedCert) {
        self.certs.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.insert(id.clone(), cert.clone());
            next
        });
    }

    /// Drops identities not in `keep` (workloads that left).
    pub fn retain(&self, keep: &[Identity]) {
        self.certs.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.retain(|id, _| keep.contains(id));
            next
        });
    }

    /// The current certificate of `id`.
    pub fn get(&self, id: &Identity) -> Option<IssuedCert> {
        self.certs.load().get(id).cloned()
    }

    /// Every identity and its certificate's expiry.
    pub fn expiries(&self) -> Vec<(Identity, SystemTime)> {
        self.certs
            .load()
            .iter()
            .map(|(id, c)| (id.clone(), c.not_after))
            .collect()
    }

    /// Replaces the trust bundle. Fails, keeping the old one, when a
    /// certificate is not a usable trust anchor. A root that names a trust
    /// domain (a URI SAN `spiffe://<domain>`, as SPIFFE has signing
    /// certificates carry) is bound to it: it vouches for identities of
    /// that domain only. A root that names none vouches for this agent's
    /// trust domain only.
    pub fn set_roots(&self, roots: &[CertificateDer<'_>]) -> Result<usize, webpki::Error> {
        let anchors = roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()))
            .collect::<Result<Vec<_>, _>>()?;
        let domains = roots
            .iter()
            .map(|r| root_domain(r).unwrap_or_else(|| self.trust_domain.clone()))
            .collect();
        let n = anchors.len();
        self.bundle.store(Arc::new(Bundle { anchors, domains }));
        Ok(n)
    }

    /// Verifies a caller's chain against the current trust bundle at `now`:
    /// what the handshake checked, checked again for a resumed session,
    /// whose certificate rustls restores from the ticket without a look at
    /// its validity or at the bundle.
    pub fn verify_caller(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), TlsError> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(TlsError::NoCertificatesPresented)?;
        self.verify_chain(leaf, intermediates, now, webpki::KeyUsage::client_auth())
    }

    /// Verifies `end_entity` against the trust bundle for `usage`, and that
    /// the root it chains to vouches for the trust domain it names.
    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), TlsError> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let bundle = self.bundle.load();
        let path = cert
            .verify_for_usage(
                self.algorithms.all,
                &bundle.anchors,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map_err(pki_error)?;
        let Some(root) = bundle
            .anchors
            .iter()
            .position(|a| std::ptr::eq(a, path.anchor()))
        else {
            return Err(TlsError::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ));
        };
        match identity_of(end_entity) {
            // The name itself is judged later, with the peer's address.
            Err(_) => Ok(()),
            Ok(id) if id.trust_domain == bundle.domains[root] => Ok(()),
            Ok(id) => Err(TlsError::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(RootOutOfDomain {
                    identity: id.to_string(),
                    domain: bundle.domains[root].clone(),
                })),
            ))),
        }
    }
}

/// The trust anchors and the trust domain each one vouches for.
#[derive(Debug, Default)]
struct Bundle {
    anchors: Vec<TrustAnchor<'static>>,
    domains: Vec<String>,
}

/// A certificate of one trust domain signed under a root of another.
#[derive(Debug, thiserror::Error)]
#[error("{identity} chains to a root bound to trust domain {domain}")]
pub struct RootOutOfDomain {
    identity: String,
    domain: String,
}

/// The trust domain a root names in a URI SAN `spiffe://<domain>`.
fn root_domain(root: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(root.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => {
            let domain = uri.strip_prefix("spiffe://")?.trim_end_matches('/');
            (!domain.is_empty() && !domain.contains('/')).then(|| domain.to_owned())
        }
        _ => None,
    })
}

impl CertStore {
    /// Checks a handshake signature with the provider's algorithms; both
    /// verifiers share it.
    fn signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
        tls13: bool,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        if tls13 {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        } else {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
        }
    }
}

fn pki_error(e: webpki::Error) -> TlsError {
    use webpki::Error as E;
    TlsError::InvalidCertificate(match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

/// Why a certificate names no workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed")]
    Unparsable,
    #[error("the certificate carries no URI SAN (no SPIFFE ID)")]
    NoUri,
    #[error("the certificate carries {0} URI SANs; an X.509-SVID has exactly one SPIFFE ID")]
    SeveralUris(usize),
    #[error(transparent)]
    NotSpiffe(#[from] super::identity::NotAnIdentity),
}

/// The SPIFFE ID of a certificate: its one URI SAN. A certificate with
/// several URI SANs is refused rather than read for the first that parses,
/// so no second name can ride along (the SPIFFE X.509-SVID rule).
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| IdentityError::Unparsable)?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| IdentityError::Unparsable)?
        .ok_or(IdentityError::NoUri)?;
    let mut uris = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let first = uris.next().ok_or(IdentityError::NoUri)?;
    let more = uris.count();
    if more > 0 {
        return Err(IdentityError::SeveralUris(more + 1));
    }
    Ok(Identity::parse(first)?)
}

/// Server side: presents the certificate of the identity the client asked
/// for by server name, if it is one of this node's.
#[derive(Debug)]
pub struct ServerCerts(pub Arc<CertStore>);

impl ResolvesServerCert for ServerCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let id = Identity::from_server_name(hello.server_name()?, &self.0.trust_domain)?;
        self.0.get(&id).map(|c| c.key)
    }
}

/// Client side: presents the certificate of one source identity.
#[derive(Debug)]
pub struct ClientCert {
    pub store: Arc<CertStore>,
    pub identity: Identity,
}

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.store.get(&self.identity).map(|c| c.key)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Client side: the peer agent must present a certificate chaining to the
/// bundle whose SPIFFE ID is the one the server name asked for.
#[derive(Debug)]
pub struct PeerVerifier(pub Arc<CertStore>);

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        self.0.verify_chain(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        let expected = match server_name {
            ServerName::DnsName(name) => {
                Identity::from_server_name(name.as_ref(), &self.0.trust_domain)
            }
            _ => None,
        };
        match (expected, identity_of(end_entity).ok()) {
            (Some(want), Some(got)) if want == got => Ok(ServerCertVerified::assertion()),
            (want, got) => Err(TlsError::General(format!(
                "peer presented identity {} where {} was expected",
                got.map_or("none".to_owned(), |g| g.to_string()),
                want.map_or("none".to_owned(), |w| w.to_string())
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.signature(message, cert, dss, false)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.signature(message, cert, dss, true)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms.supported_schemes()
    }
}

/// Server side: a client certificate is required and must chain to the
/// bundle. Its SPIFFE ID is checked after the handshake, where the reason
/// for a refusal can be logged with the peer's address.
#[derive(Debug)]
pub struct CallerVerifier(pub Arc<CertStore>);

impl ClientCertVerifier for CallerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.0.verify_chain(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.signature(message, cert, dss, false)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.signature(message, cert, dss, true)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn cert_with(sans: &[&str]) -> CertificateDer<'static> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans
            .iter()
            .map(|s| match s.strip_prefix("dns:") {
                Some(dns) => SanType::DnsName((*dns).try_into().unwrap()),
                None => SanType::URI((*s).try_into().unwrap()),
            })
            .collect();
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().clone()
    }

    /// A CA (optionally naming a trust domain) and a leaf it signs.
    fn ca(domain: Option<&str>) -> (CertificateDer<'static>, rcgen::Issuer<'static, KeyPair>) {
        let mut p = CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        if let Some(d) = domain {
            p.subject_alt_names = vec![SanType::URI(format!("spiffe://{d}").try_into().unwrap())];
        }
        let key = KeyPair::generate().unwrap();
        let der = p.self_signed(&key).unwrap().der().clone();
        (der, rcgen::Issuer::new(p, key))
    }

    fn leaf(issuer: &rcgen::Issuer<'static, KeyPair>, uri: &str) -> CertificateDer<'static> {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        p.signed_by(&KeyPair::generate().unwrap(), issuer)
            .unwrap()
            .der()
            .clone()
    }

    #[test]
    fn a_root_vouches_only_for_its_own_trust_domain() {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let store = CertStore::new("cluster.local", &provider);
        let (ours, our_issuer) = ca(None);
        let (partner, partner_issuer) = ca(Some("partner.example"));
        store.set_roots(&[ours, partner]).unwrap();
        let now = UnixTime::now();
        let checkout = "spiffe://cluster.local/ns/payments/sa/checkout";
        assert!(
            store
                .verify_caller(&[leaf(&our_issuer, checkout)], now)
                .is_ok()
        );
        let forged = store.verify_caller(&[leaf(&partner_issuer, checkout)], now);
        let forged = format!("{:?}", forged.unwrap_err());
        assert!(
            forged.contains("RootOutOfDomain") && forged.contains("partner.example"),
            "{forged}"
        );
        assert!(
            store
                .verify_caller(
                    &[leaf(&partner_issuer, "spiffe://partner.example/ns/a/sa/b")],
                    now
                )
                .is_ok()
        );
    }

    #[test]
    fn a_certificate_names_exactly_one_spiffe_id() {
        let id = "spiffe://cluster.local/ns/payments/sa/checkout";
        assert_eq!(
            identity_of(&cert_with(&[id, "dns:ledger.example"])),
            Ok(Identity::new("cluster.local", "payments", "checkout"))
        );
        assert_eq!(
            identity_of(&cert_with(&[
                "spiffe://cluster.local/ns/payments/sa/intruder",
                id
            ])),
            Err(IdentityError::SeveralUris(2))
        );
        assert_eq!(
            identity_of(&cert_with(&["dns:ledger.example"])),
            Err(IdentityError::NoUri)
        );
        assert!(matches!(
            identity_of(&cert_with(&["https://example.com/x"])),
            Err(IdentityError::NotSpiffe(_))
        ));
        assert_eq!(
            identity_of(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])),
            Err(IdentityError::Unparsable)
        );
    }
}
