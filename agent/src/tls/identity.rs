//! Workload identity: a SPIFFE ID, and the TLS server name that asks a
//! peer agent for that identity's certificate.

use std::fmt;

use crate::config::mesh::{is_label, is_trust_domain};

/// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Why a string is not a workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a SPIFFE workload ID (spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT)"
)]
pub struct NotAnIdentity(pub String);

/// Suffix of the server names that carry an identity: `SA.NS.SUFFIX`.
const SNI_SUFFIX: &str = "sluice";

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Identity {
        Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// Parses a SPIFFE URI.
    pub fn parse(uri: &str) -> Result<Identity, NotAnIdentity> {
        let err = || NotAnIdentity(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(err)?;
        let (td, path) = rest.split_once('/').ok_or_else(err)?;
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["ns", ns, "sa", sa] if is_trust_domain(td) && is_label(ns) && is_label(sa) => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(err()),
        }
    }

    /// The TLS server name (SNI) under which a peer agent presents this
    /// identity. Namespaces and service accounts are DNS labels, so the
    /// name is a valid DNS name.
    pub fn server_name(&self) -> String {
        format!("{}.{}.{SNI_SUFFIX}", self.service_account, self.namespace)
    }

    /// The identity a server name asks for, in `trust_domain`.
    pub fn from_server_name(name: &str, trust_domain: &str) -> Option<Identity> {
        let mut parts = name.split('.');
        let (sa, ns, suffix) = (parts.next()?, parts.next()?, parts.next()?);
        (suffix == SNI_SUFFIX && parts.next().is_none() && is_label(sa) && is_label(ns))
            .then(|| Identity::new(trust_domain, ns, sa))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = Identity::parse("spiffe://cluster.local/ns/payments/sa/checkout").unwrap();
        assert_eq!(id, Identity::new("cluster.local", "payments", "checkout"));
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/payments/sa/checkout"
        );
        assert_eq!(id.server_name(), "checkout.payments.sluice");
        assert_eq!(
            Identity::from_server_name(&id.server_name(), "cluster.local"),
            Some(id)
        );
        assert!(Identity::parse("spiffe://td/ns/a").is_err());
        assert!(Identity::parse("https://td/ns/a/sa/b").is_err());
        assert_eq!(Identity::from_server_name("example.com", "td"), None);
    }
}
