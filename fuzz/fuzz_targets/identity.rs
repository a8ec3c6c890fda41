//! Identities from outside: the SPIFFE ID in a peer's certificate (any
//! DER a peer sends reaches `identity_of`) and SPIFFE URIs from config and
//! certificates. Neither may panic, and an accepted URI must print back as
//! itself and name the same identity through its TLS server name, since
//! peers are matched by those forms.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;
use sluice::tls::Identity;

fuzz_target!(|data: &[u8]| {
    let _ = sluice::tls::identity_of(&CertificateDer::from(data.to_vec()));

    let Ok(uri) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = Identity::parse(uri) {
        assert_eq!(
            id.to_string(),
            uri,
            "an accepted SPIFFE ID prints back as itself"
        );
        assert_eq!(
            Identity::from_server_name(&id.server_name(), &id.trust_domain).as_ref(),
            Some(&id),
            "the server name of {id} names it again"
        );
    }
});
