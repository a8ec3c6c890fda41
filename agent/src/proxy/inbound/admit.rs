//! The checks an inbound connection passes after its TLS handshake: who
//! calls (once per connection), and for each application connection (a
//! preamble's, or a tunnel stream's) the workload endpoint it asks for,
//! authorization, and the workload reachable.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use super::{InboundContext, refusals::refusal_of_tls};
use crate::{
    authz,
    carry::preamble::{self, PreambleError},
    catalog::LocalTarget,
    connect::connect_marked,
    telemetry::Refusal,
    tls::{Identity, identity_of, session::TlsSession},
};

/// What passed every check after the handshake: who calls, which local
/// workload endpoint it asked for, and the connection to it.
pub(super) struct Admission {
    pub(super) caller: Identity,
    pub(super) local: Arc<LocalTarget>,
    pub(super) target: SocketAddr,
    pub(super) upstream: TcpStream,
}

/// A refusal after the handshake: who asked (once known), for what (once
/// known), why.
pub(super) struct Refused {
    pub(super) caller: Option<Identity>,
    pub(super) target: Option<DeniedTarget>,
    pub(super) why: Refusal,
    pub(super) detail: String,
}

/// The local workload endpoint a refused caller asked for, and the
/// authorization rule that refused it.
pub(super) struct DeniedTarget {
    pub(super) identity: Identity,
    pub(super) addr: SocketAddr,
    pub(super) workload: String,
    pub(super) rule: String,
}

impl DeniedTarget {
    pub(super) fn as_party(&self) -> (&Identity, SocketAddr, &str, Option<&str>) {
        (&self.identity, self.addr, &self.workload, Some(&self.rule))
    }
}

fn refused(caller: Option<&Identity>, why: Refusal, detail: impl std::fmt::Display) -> Refused {
    Refused {
        caller: caller.cloned(),
        target: None,
        why,
        detail: detail.to_string(),
    }
}

/// The checks after the handshake, in order: who calls ([`caller_of`]), a
/// preamble in time naming the workload endpoint, and [`admit_target`].
pub(super) async fn admit(
    ctx: &InboundContext,
    tls: &mut TlsSession,
) -> Result<Admission, Refused> {
    let (caller, asked_for) = caller_of(ctx, tls)?;
    let target = match tokio::time::timeout(ctx.handshake_timeout, preamble::read(tls)).await {
        Ok(Ok(target)) => target,
        Ok(Err(e)) => {
            let why = match e {
                PreambleError::Oversized(_) => Refusal::PreambleOversized,
                _ => Refusal::PreambleMalformed,
            };
            return Err(refused(Some(&caller), why, e));
        }
        Err(_) => {
            let limit = format!("no preamble within {:?}", ctx.handshake_timeout);
            return Err(refused(Some(&caller), Refusal::PreambleTimeout, limit));
        }
    };
    let (local, upstream) = admit_target(ctx, &caller, asked_for.as_ref(), target).await?;
    Ok(Admission {
        caller,
        local,
        target,
        upstream,
    })
}

/// Who calls, once per connection: a resumed session's certificate still
/// valid, a SPIFFE identity of this trust domain. With it, the identity
/// the caller asked for (SNI), if it names one of this domain.
#[expect(
    clippy::result_large_err,
    reason = "a refusal is the cold path; admit and admit_target return it as it is"
)]
pub(super) fn caller_of(
    ctx: &InboundContext,
    conn: &TlsSession,
) -> Result<(Identity, Option<Identity>), Refused> {
    let trust_domain = ctx.inputs.tls.store.trust_domain();
    let asked_for = conn
        .server_name()
        .and_then(|n| Identity::from_server_name(n, trust_domain));
    if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
        && let Err(e) = ctx.inputs.tls.store.verify_caller(
            conn.peer_certificates().unwrap_or_default(),
            rustls_pki_types::UnixTime::now(),
        )
    {
        return Err(refused(
            None,
            refusal_of_tls(&e),
            format!("resumed session: {e}"),
        ));
    }
    let caller = match conn.peer_certificates().and_then(|c| c.first()) {
        Some(leaf) => identity_of(leaf),
        None => Err(crate::tls::IdentityError::NoUri),
    };
    let caller = match caller {
        Ok(caller) => caller,
        Err(e) => return Err(refused(None, Refusal::NoIdentity, e)),
    };
    if caller.trust_domain != trust_domain {
        return Err(refused(
            Some(&caller),
            Refusal::WrongTrustDomain,
            format!("trust domain is not {trust_domain}"),
        ));
    }
    Ok((caller, asked_for))
}

/// The checks for one application connection (a connection's preamble, or
/// a tunnel's stream), in order: `target` is a workload endpoint of this
/// node served by the identity the caller asked for, authorization admits
/// the caller, and the workload is reachable.
pub(super) async fn admit_target(
    ctx: &InboundContext,
    caller: &Identity,
    asked_for: Option<&Identity>,
    target: SocketAddr,
) -> Result<(Arc<LocalTarget>, TcpStream), Refused> {
    let Some(local) = ctx.inputs.catalog.load().local_target(target).cloned() else {
        let detail = format!("{target} is not a workload endpoint on this node");
        return Err(refused(Some(caller), Refusal::UnknownTarget, detail));
    };
    if asked_for != Some(&local.workload.identity) {
        let detail = format!(
            "{target} is served by {}, not by the identity asked for",
            local.workload.identity
        );
        return Err(refused(Some(caller), Refusal::IdentityMismatch, detail));
    }
    let verdict = authz::evaluate(&local.policies, caller);
    if !verdict.allowed {
        let workload = local.workload.qualified_name();
        let detail = format!("{target} (workload {workload}) {verdict}");
        return Err(Refused {
            caller: Some(caller.clone()),
            target: Some(DeniedTarget {
                identity: local.workload.identity.clone(),
                addr: target,
                workload,
                rule: verdict.rule.to_string(),
            }),
            why: Refusal::Denied,
            detail,
        });
    }
    // From inside the workload's own namespace, over its loopback: the
    // capture hook lets that through, and nothing else of the agent's
    // reaches a captured workload.
    let netns = local.workload.netns.as_deref();
    let upstream =
        match connect_marked(target, ctx.inputs.mark, ctx.inputs.connect_timeout, netns).await {
            Ok(upstream) => upstream,
            Err(e) => return Err(refused(Some(caller), Refusal::TargetUnreachable, e)),
        };
    Ok((local, upstream))
}
