//! Checking the other side's certificate at each handshake: it chains to
//! the current trust bundle, through a root that vouches for the trust
//! domain it names, and (for a peer agent) names the identity the server
//! name asked for. The bundle is read at each handshake, so a new one
//! takes effect at the next connection.

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{
    identity::Identity,
    store::{CertStore, identity_of},
};

impl CertStore {
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

/// A certificate of one trust domain signed under a root of another.
#[derive(Debug, thiserror::Error)]
#[error("{identity} chains to a root bound to trust domain {domain}")]
pub struct RootOutOfDomain {
    identity: String,
    domain: String,
}

/// webpki's refusal as rustls reports it: the kinds rustls turns into
/// specific alerts mapped, the rest carried whole.
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
                Identity::from_server_name(name.as_ref(), self.0.trust_domain())
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
mod tests;
