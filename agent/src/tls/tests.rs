//! The certificate sources: files reloaded as they change, roots included.

use super::*;
use crate::config::Config;

/// The files source loads a pair, keeps it when the file is replaced by
/// a broken one, and takes the next good one.
#[test]
fn files_source_keeps_the_last_good_certificate() {
    let dir = std::env::temp_dir().join(format!("sluice-files-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    local_ca::init(&dir.join("ca"), "td").unwrap();
    std::fs::copy(dir.join("ca/ca.pem"), dir.join("bundle.pem")).unwrap();
    let id = Identity::new("td", "payments", "checkout");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(dir.join("ca/ca.pem")).unwrap(),
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca/ca-key.pem")).unwrap())
            .unwrap(),
    )
    .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let base = dir.join("certs/payments/checkout");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::write(base.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(base.join("tls.key"), key.serialize_pem()).unwrap();

    let text = format!(
        "node:\n  name: n\nmesh:\n  trust_domain: td\n  certificates:\n    files:\n      dir: {}\n      \
         trust_bundle: {}\n",
        dir.join("certs").display(),
        dir.join("bundle.pem").display()
    );
    let config = Config::parse(&text, "t.yaml").unwrap();
    let ctx = TlsContext::new(&config.mesh, &dir, std::slice::from_ref(&id)).unwrap();
    let first = ctx.store.get(&id).expect("loaded");
    assert_eq!(first.key.cert[0].as_ref(), cert.der().as_ref());

    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(
        base.join("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .unwrap();
    ctx.refresh(std::slice::from_ref(&id), false).unwrap();
    let kept = ctx.store.get(&id).unwrap();
    assert_eq!(
        kept.key.cert[0].as_ref(),
        cert.der().as_ref(),
        "last good kept"
    );

    // A new good pair replaces it.
    std::thread::sleep(Duration::from_millis(20));
    let key2 = rcgen::KeyPair::generate().unwrap();
    let cert2 = params.signed_by(&key2, &issuer).unwrap();
    std::fs::write(base.join("tls.crt"), cert2.pem()).unwrap();
    std::fs::write(base.join("tls.key"), key2.serialize_pem()).unwrap();
    ctx.refresh(std::slice::from_ref(&id), false).unwrap();
    let now = ctx.store.get(&id).unwrap();
    assert_eq!(now.key.cert[0].as_ref(), cert2.der().as_ref());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CA rotation with the files source: a root added to the trust
/// bundle file is trusted after the next refresh, a broken bundle
/// leaves the last good one in force, and a root taken out is no
/// longer trusted.
#[test]
fn trust_bundle_roots_are_reloaded_while_running() {
    let dir = std::env::temp_dir().join(format!("sluice-roots-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let ca = |name: &str| {
        local_ca::init(&dir.join(name), "td").unwrap();
        local_ca::LocalCa::load(&dir.join(name), provider.clone()).unwrap()
    };
    let (old, new) = (ca("old"), ca("new"));
    let caller = Identity::new("td", "payments", "checkout");
    let chain = |ca: &local_ca::LocalCa| {
        let issued = ca.issue(&caller, Duration::from_secs(3600)).unwrap();
        issued.key.cert.clone()
    };
    let (by_old, by_new) = (chain(&old), chain(&new));
    let pem = |names: &[&str]| {
        names
            .iter()
            .map(|name| std::fs::read_to_string(dir.join(name).join("ca.pem")).unwrap())
            .collect::<String>()
    };
    let bundle = dir.join("bundle.pem");
    std::fs::write(&bundle, pem(&["old"])).unwrap();
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    let text = format!(
        "node:\n  name: n\nmesh:\n  trust_domain: td\n  certificates:\n    files:\n      dir: {}\n      \
         trust_bundle: {}\n",
        dir.join("certs").display(),
        bundle.display()
    );
    let config = Config::parse(&text, "t.yaml").unwrap();
    let ctx = TlsContext::new(&config.mesh, &dir, &[]).unwrap();
    let now = rustls_pki_types::UnixTime::now();
    let verify = |chain: &[CertificateDer<'static>]| ctx.store.verify_caller(chain, now).is_ok();
    assert!(verify(&by_old));
    assert!(!verify(&by_new));

    std::fs::write(&bundle, pem(&["old", "new"])).unwrap();
    ctx.refresh(&[], false).unwrap();
    assert!(
        verify(&by_old) && verify(&by_new),
        "both roots during the rotation"
    );

    std::fs::write(&bundle, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    // Logged, not fatal: the agent runs on with what it had.
    ctx.refresh(&[], false).unwrap();
    assert!(
        verify(&by_old) && verify(&by_new),
        "the last good bundle stays"
    );

    std::fs::write(&bundle, pem(&["new"])).unwrap();
    ctx.refresh(&[], false).unwrap();
    assert!(!verify(&by_old), "the old root is gone");
    assert!(verify(&by_new));
    let _ = std::fs::remove_dir_all(&dir);
}
