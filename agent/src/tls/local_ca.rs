//! The local CA of the single-machine default: `sluice ca init` writes it
//! into the state directory; the agent issues short-lived workload
//! certificates from it.

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{crypto::CryptoProvider, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{identity::Identity, store::IssuedCert};

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";
/// How long a CA made by `sluice ca init` is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Workload certificates start this far in the past, so a peer whose clock
/// is slightly behind still accepts them.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why the local CA could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{dir} already holds a CA; remove it first to make a new one (every node must then \
         trust the new one)"
    )]
    Exists { dir: PathBuf },
    #[error("{path}: not a usable CA: {error}")]
    Invalid { path: PathBuf, error: String },
    #[error("cannot issue a certificate for {identity}: {error}")]
    Issue { identity: String, error: String },
}

/// The CA directory under a state directory.
pub fn ca_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ca")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |error| CaError::Io {
        path: path.to_owned(),
        error,
    }
}

fn time(t: SystemTime) -> time::OffsetDateTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Writes a new CA (ECDSA P-256) into `dir`; refuses to replace one.
pub fn init(dir: &Path, trust_domain: &str) -> Result<PathBuf, CaError> {
    let cert_path = dir.join(CA_CERT);
    if cert_path.exists() {
        return Err(CaError::Exists {
            dir: dir.to_owned(),
        });
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = KeyPair::generate().map_err(|e| CaError::Invalid {
        path: dir.to_owned(),
        error: e.to_string(),
    })?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Sluice local CA for {trust_domain}"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = time(now - BACKDATE);
    params.not_after = time(now + CA_LIFETIME);
    let cert = params.self_signed(&key).map_err(|e| CaError::Invalid {
        path: dir.to_owned(),
        error: e.to_string(),
    })?;
    let key_path = dir.join(CA_KEY);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io(&key_path))?;
    f.write_all(key.serialize_pem().as_bytes())
        .map_err(io(&key_path))?;
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    Ok(cert_path)
}

/// A loaded CA that can sign workload certificates.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl LocalCa {
    /// Loads the CA in `dir`.
    pub fn load(dir: &Path, provider: Arc<CryptoProvider>) -> Result<LocalCa, CaError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let invalid = |path: &Path| {
            let path = path.to_owned();
            move |e: rcgen::Error| CaError::Invalid {
                path,
                error: e.to_string(),
            }
        };
        let key = KeyPair::from_pem(&key_pem).map_err(invalid(&key_path))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(invalid(&cert_path))?;
        let cert =
            rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
                CaError::Invalid {
                    path: cert_path.clone(),
                    error: e.to_string(),
                }
            })?;
        Ok(LocalCa {
            issuer,
            cert,
            provider,
        })
    }

    /// The CA certificate: the trust bundle of the local default.
    pub fn certificate(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    /// Issues a certificate for `id`, valid for `lifetime` from now.
    pub fn issue(&self, id: &Identity, lifetime: Duration) -> Result<IssuedCert, CaError> {
        let fail = |error: String| CaError::Issue {
            identity: id.to_string(),
            error,
        };
        let key = KeyPair::generate().map_err(|e| fail(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e: rcgen::Error| fail(e.to_string()))?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        let not_after = now + lifetime;
        params.not_before = time(now - BACKDATE);
        params.not_after = time(not_after);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = self
            .provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| fail(e.to_string()))?;
        Ok(IssuedCert {
            key: Arc::new(CertifiedKey::new(
                vec![cert.der().clone(), self.cert.clone()],
                signing,
            )),
            not_after,
            installed: now,
        })
    }
}
