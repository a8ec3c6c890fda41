//! Mutual TLS between agents: workload identities, where their
//! certificates come from, and the rustls configurations that use them.
//!
//! Crypto provider: aws-lc-rs, rustls's default. It is the faster of the
//! two on what a handshake costs (ECDSA P-256 signatures, X25519), is
//! maintained by AWS, and has a FIPS mode a payment platform may need.
//! TLS 1.3 only unless `mesh.allow_tls12` asks for 1.2 as well.

pub mod identity;
pub mod local_ca;
pub mod session;
pub mod store;
pub mod verify;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use log::{error, info, warn};
use rustls::{ClientConfig, ServerConfig, crypto::CryptoProvider, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

pub use identity::Identity;
pub use store::{CertStore, IdentityError, IssuedCert, identity_of};
pub use verify::RootOutOfDomain;

use crate::{
    config::{CertificateSource, MeshConfig},
    drain::DrainWatch,
};
use local_ca::LocalCa;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(transparent)]
    Ca(#[from] local_ca::CaError),
    #[error("{0}")]
    Config(String),
    #[error("{path}: {error}")]
    Files { path: PathBuf, error: String },
}

/// The agent's TLS state: the store, the server configuration of the
/// inbound listener, and one client configuration per local identity.
pub struct TlsContext {
    pub store: Arc<CertStore>,
    provider: Arc<CryptoProvider>,
    server: Arc<ServerConfig>,
    clients: ArcSwap<HashMap<Identity, Arc<ClientConfig>>>,
    allow_tls12: bool,
    source: Source,
}

enum Source {
    LocalCa {
        ca: Box<LocalCa>,
        lifetime: Duration,
    },
    Files {
        dir: PathBuf,
        bundle: PathBuf,
    },
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn versions(allow_tls12: bool) -> &'static [&'static rustls::SupportedProtocolVersion] {
    if allow_tls12 {
        rustls::ALL_VERSIONS
    } else {
        TLS13_ONLY
    }
}

impl TlsContext {
    /// Sets up TLS for `identities` (this node's workloads).
    pub fn new(
        mesh: &MeshConfig,
        state_dir: &Path,
        identities: &[Identity],
    ) -> Result<Arc<TlsContext>, TlsSetupError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let store = Arc::new(CertStore::new(mesh.trust_domain.get(), &provider));
        let source = match &mesh.certificates {
            CertificateSource::LocalCa { lifetime } => {
                let dir = local_ca::ca_dir(state_dir);
                if !dir.join("ca.pem").exists() {
                    let path = local_ca::init(&dir, mesh.trust_domain.get())?;
                    info!(
                        "no local CA in {}; made one ({}). Nodes that talk to each other must \
                         share it: copy it, or run `sluice ca init` once and distribute",
                        dir.display(),
                        path.display()
                    );
                }
                let ca = LocalCa::load(&dir, provider.clone())?;
                store
                    .set_roots(&[ca.certificate()])
                    .map_err(|e| TlsSetupError::Config(format!("local CA: {e}")))?;
                Source::LocalCa {
                    ca: Box::new(ca),
                    lifetime: lifetime.0,
                }
            }
            CertificateSource::Files { dir, trust_bundle } => Source::Files {
                dir: dir.clone(),
                bundle: trust_bundle.clone(),
            },
        };
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions(mesh.allow_tls12))
            .map_err(|e| TlsSetupError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verify::CallerVerifier(store.clone())))
            .with_cert_resolver(Arc::new(store::ServerCerts(store.clone())));
        // A peer that asks for HTTP/2 gets a tunnel connection; one that
        // asks for nothing, a connection per application connection.
        server.alpn_protocols = vec![b"h2".to_vec()];
        // Stateless resumption: a reconnecting peer skips the full handshake.
        server.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|e| TlsSetupError::Config(e.to_string()))?;
        let ctx = Arc::new(TlsContext {
            store,
            provider,
            server: Arc::new(server),
            clients: ArcSwap::from_pointee(HashMap::new()),
            allow_tls12: mesh.allow_tls12,
            source,
        });
        ctx.refresh(identities, true)?;
        ctx.set_identities(identities);
        Ok(ctx)
    }

    /// The inbound listener's configuration.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The client configuration presenting `source`, if it is a local
    /// identity. Its session cache makes reconnects resume.
    pub fn client_config(&self, source: &Identity) -> Option<Arc<ClientConfig>> {
        self.clients.load().get(source).cloned()
    }

    /// [`Self::client_config`] for a tunnel connection: it asks for HTTP/2
    /// by ALPN. It shares the per-connection configuration's session
    /// cache, so a pool reconnect resumes.
    pub fn tunnel_client_config(&self, source: &Identity) -> Option<Arc<ClientConfig>> {
        let mut config = ClientConfig::clone(&*self.client_config(source)?);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Some(Arc::new(config))
    }

    /// Makes client configurations for exactly these local identities
    /// (existing ones keep their session caches).
    pub fn set_identities(&self, identities: &[Identity]) {
        let current = self.clients.load();
        let mut next = HashMap::new();
        for id in identities {
            let config = current.get(id).cloned().or_else(|| self.make_client(id));
            if let Some(config) = config {
                next.insert(id.clone(), config);
            }
        }
        self.clients.store(Arc::new(next));
        self.store.retain(identities);
    }

    fn make_client(&self, id: &Identity) -> Option<Arc<ClientConfig>> {
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(versions(self.allow_tls12))
            .map_err(|e| error!("TLS client configuration for {id}: {e}"))
            .ok()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::PeerVerifier(self.store.clone())))
            .with_client_cert_resolver(Arc::new(store::ClientCert {
                store: self.store.clone(),
                identity: id.clone(),
            }));
        Some(Arc::new(config))
    }

    /// Issues, renews or reloads certificates for `identities`. At start
    /// (`initial`) a failure is an error; later it is logged and the last
    /// good certificates stay in use.
    pub fn refresh(&self, identities: &[Identity], initial: bool) -> Result<(), TlsSetupError> {
        let installed = |id: &Identity| self.store.get(id).map(|c| c.installed);
        let before: Vec<_> = identities.iter().map(installed).collect();
        let result = self.refresh_certificates(identities, initial);
        // A new certificate gets a new client configuration, and so a new
        // session cache: a session resumed from a ticket carries the
        // certificate of its first handshake, which peers refuse once it
        // has expired.
        let renewed: Vec<&Identity> = identities
            .iter()
            .zip(before)
            .filter(|(id, was)| installed(id) != *was)
            .map(|(id, _)| id)
            .collect();
        if !renewed.is_empty() {
            let mut next = HashMap::clone(&self.clients.load());
            for id in renewed {
                if let Some(config) = self.make_client(id) {
                    next.insert(id.clone(), config);
                }
            }
            self.clients.store(Arc::new(next));
        }
        result
    }

    fn refresh_certificates(
        &self,
        identities: &[Identity],
        initial: bool,
    ) -> Result<(), TlsSetupError> {
        match &self.source {
            Source::LocalCa { ca, lifetime } => {
                let now = SystemTime::now();
                for id in identities {
                    let due = self.store.get(id).is_none_or(|c| {
                        now.duration_since(c.installed).unwrap_or_default() >= *lifetime / 2
                    });
                    if due {
                        match ca.issue(id, *lifetime) {
                            Ok(cert) => {
                                if !initial {
                                    info!("renewed the certificate of {id} (valid {lifetime:?})");
                                }
                                self.store.install(id.clone(), cert);
                            }
                            Err(e) if initial => return Err(e.into()),
                            Err(e) => error!("{e}; the current certificate stays in use"),
                        }
                    }
                }
                Ok(())
            }
            Source::Files { dir, bundle } => {
                let result = load_files(&self.store, &self.provider, dir, bundle, identities);
                match result {
                    Ok(()) => Ok(()),
                    Err(e) if initial => Err(e),
                    Err(e) => {
                        error!("{e}; the last good certificates stay in use, retrying");
                        Ok(())
                    }
                }
            }
        }
    }

    /// How often [`Self::refresh`] should run.
    fn refresh_every(&self) -> Duration {
        match &self.source {
            Source::LocalCa { lifetime, .. } => {
                (*lifetime / 8).clamp(Duration::from_millis(100), Duration::from_secs(60))
            }
            Source::Files { .. } => Duration::from_secs(1),
        }
    }
}

/// Keeps certificates fresh until the drain: renews local-CA certificates
/// at half-life, reloads changed files.
pub async fn keep_fresh(
    ctx: Arc<TlsContext>,
    identities: Arc<ArcSwap<Vec<Identity>>>,
    mut drain: DrainWatch,
) {
    let mut tick = tokio::time::interval(ctx.refresh_every());
    loop {
        tokio::select! {
            _ = drain.draining() => return,
            _ = tick.tick() => {
                let ids = identities.load();
                let _ = ctx.refresh(&ids, false);
            }
        }
    }
}

fn file_err(path: &Path, error: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::Files {
        path: path.to_owned(),
        error: error.to_string(),
    }
}

/// Loads the trust bundle and each identity's `tls.crt`/`tls.key` from
/// `dir/<namespace>/<service_account>/`. Files that did not change since
/// their certificate was installed are skipped; a broken file leaves the
/// last good certificate in place.
fn load_files(
    store: &CertStore,
    provider: &CryptoProvider,
    dir: &Path,
    bundle: &Path,
    identities: &[Identity],
) -> Result<(), TlsSetupError> {
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(bundle)
        .map_err(|e| file_err(bundle, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(bundle, e))?;
    if roots.is_empty() {
        return Err(file_err(bundle, "no certificate in the trust bundle"));
    }
    store.set_roots(&roots).map_err(|e| file_err(bundle, e))?;
    let mut first_error = None;
    for id in identities {
        let base = dir.join(&id.namespace).join(&id.service_account);
        let (cert_path, key_path) = (base.join("tls.crt"), base.join("tls.key"));
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let newest = modified(&cert_path).max(modified(&key_path));
        if let (Some(current), Some(newest)) = (store.get(id), newest)
            && newest <= current.installed
        {
            continue;
        }
        match load_pair(provider, &cert_path, &key_path, id) {
            Ok(cert) => store.install(id.clone(), cert),
            Err(e) => {
                if store.get(id).is_some() {
                    warn!("{e}");
                }
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn load_pair(
    provider: &CryptoProvider,
    cert_path: &Path,
    key_path: &Path,
    id: &Identity,
) -> Result<IssuedCert, TlsSetupError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| file_err(cert_path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert_path, e))?;
    let leaf = chain
        .first()
        .ok_or_else(|| file_err(cert_path, "no certificate in the file"))?;
    match identity_of(leaf) {
        Ok(found) if &found == id => {}
        Ok(found) => {
            return Err(file_err(
                cert_path,
                format!("holds identity {found} where {id} was expected"),
            ));
        }
        Err(e) => {
            return Err(file_err(cert_path, format!("{e}, where {id} was expected")));
        }
    }
    let not_after = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| file_err(cert_path, e))?
        .1
        .validity()
        .not_after
        .timestamp();
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| file_err(key_path, e))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| file_err(key_path, e))?;
    let key = CertifiedKey::new(chain, signing);
    key.keys_match().map_err(|e| file_err(key_path, e))?;
    Ok(IssuedCert {
        key: Arc::new(key),
        not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.max(0) as u64),
        installed: SystemTime::now(),
    })
}

#[cfg(test)]
mod tests;
