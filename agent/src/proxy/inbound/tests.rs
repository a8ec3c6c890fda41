//! How inbound handshake failures are named and counted.

use rustls::{CertificateError, Error as TlsError, InvalidMessage, PeerIncompatible};

use super::{refusals::refusal_of_tls, *};

/// Each refusal reason is an operator's first clue: the kernel of
/// rustls's error must land on the reason that names it.
#[test]
fn handshake_failures_are_counted_under_the_reason_that_names_them() {
    let cases = [
        (
            TlsError::InvalidMessage(InvalidMessage::InvalidContentType),
            Refusal::NotTls,
        ),
        (
            TlsError::NoCertificatesPresented,
            Refusal::NoClientCertificate,
        ),
        (
            TlsError::InvalidCertificate(CertificateError::UnknownIssuer),
            Refusal::UnknownCa,
        ),
        (
            TlsError::InvalidCertificate(CertificateError::Expired),
            Refusal::CertificateExpired,
        ),
        (
            TlsError::InvalidCertificate(CertificateError::NotValidYet),
            Refusal::CertificateNotYetValid,
        ),
        (
            TlsError::InvalidCertificate(CertificateError::BadSignature),
            Refusal::BadCertificate,
        ),
        (
            TlsError::PeerIncompatible(PeerIncompatible::Tls13RequiredForQuic),
            Refusal::Incompatible,
        ),
        (
            TlsError::General("no server certificate for that name".into()),
            Refusal::UnknownServerIdentity,
        ),
        (TlsError::HandshakeNotComplete, Refusal::TlsError),
    ];
    for (error, expected) in cases {
        assert_eq!(refusal_of_tls(&error), expected, "{error:?}");
        let wrapped = io::Error::new(io::ErrorKind::InvalidData, error);
        assert_eq!(refusal_of_handshake(&wrapped), expected);
    }
    let closed = io::Error::new(io::ErrorKind::UnexpectedEof, "eof");
    assert_eq!(
        refusal_of_handshake(&closed),
        Refusal::ClosedDuringHandshake
    );
    let other = io::Error::other("not a TLS error");
    assert_eq!(refusal_of_handshake(&other), Refusal::TlsError);
}
