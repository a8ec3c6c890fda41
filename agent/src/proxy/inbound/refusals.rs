//! What a peer's failed TLS handshake or certificate is counted and
//! logged as.

use std::io;

use rustls::{CertificateError, Error as TlsError};

use crate::{telemetry::Refusal, tls::RootOutOfDomain};

/// Why a failed TLS handshake failed, as counted and logged.
pub(super) fn refusal_of_handshake(e: &io::Error) -> Refusal {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return Refusal::ClosedDuringHandshake;
    }
    match e.get_ref().and_then(|i| i.downcast_ref::<TlsError>()) {
        Some(tls) => refusal_of_tls(tls),
        None => Refusal::TlsError,
    }
}

pub(super) fn refusal_of_tls(tls: &TlsError) -> Refusal {
    match tls {
        TlsError::InvalidMessage(_)
        | TlsError::InappropriateMessage { .. }
        | TlsError::InappropriateHandshakeMessage { .. } => Refusal::NotTls,
        TlsError::NoCertificatesPresented => Refusal::NoClientCertificate,
        TlsError::InvalidCertificate(CertificateError::UnknownIssuer) => Refusal::UnknownCa,
        TlsError::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => Refusal::CertificateExpired,
        TlsError::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => Refusal::CertificateNotYetValid,
        TlsError::InvalidCertificate(CertificateError::Other(other))
            if other.0.downcast_ref::<RootOutOfDomain>().is_some() =>
        {
            Refusal::WrongTrustDomain
        }
        TlsError::InvalidCertificate(_) => Refusal::BadCertificate,
        TlsError::PeerIncompatible(_) => Refusal::Incompatible,
        TlsError::General(m) if m.contains("no server certificate") => {
            Refusal::UnknownServerIdentity
        }
        _ => Refusal::TlsError,
    }
}
