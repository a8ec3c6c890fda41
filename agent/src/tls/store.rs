//! The certificates the agent holds: one per local workload identity, the
//! trust bundle, and the rustls hooks that pick this node's certificate at
//! each handshake (the hooks that check the peer's are in verify.rs), so a
//! rotation or a new bundle takes effect without rebuilding anything and
//! without touching open connections.

use std::{collections::HashMap, fmt, sync::Arc, time::SystemTime};

use arc_swap::ArcSwap;
use rustls::{
    SignatureScheme,
    client::ResolvesClientCert,
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, TrustAnchor};

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
    /// Read by the verifiers (verify.rs) at each handshake.
    pub(super) bundle: ArcSwap<Bundle>,
    pub(super) algorithms: WebPkiSupportedAlgorithms,
    /// Certificates replaced by a renewal (not the first of an identity).
    renewals: std::sync::atomic::AtomicU64,
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
            renewals: Default::default(),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Installs (or replaces) the certificate of `id`.
    pub fn install(&self, id: Identity, cert: IssuedCert) {
        let renewal = self.certs.load().contains_key(&id);
        self.certs.rcu(|current| {
            let mut next = HashMap::clone(current);
            next.insert(id.clone(), cert.clone());
            next
        });
        if renewal {
            self.renewals
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Certificates replaced by a newer one for the same identity, since
    /// the start.
    pub fn renewals(&self) -> u64 {
        self.renewals.load(std::sync::atomic::Ordering::Relaxed)
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
}

/// The trust anchors and the trust domain each one vouches for.
#[derive(Debug, Default)]
pub(super) struct Bundle {
    pub(super) anchors: Vec<TrustAnchor<'static>>,
    /// The trust domain of `anchors[i]`.
    pub(super) domains: Vec<String>,
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
