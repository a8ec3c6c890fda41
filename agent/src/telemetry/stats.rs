//! The counters the data plane keeps as it works and the collector reads at
//! scrape time: bytes per connection, and the inbound listener's outcomes
//! by reason. Plain atomics, so the hot path never waits.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes moved each way, readable while the connection lives.
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// Client to upstream.
    pub sent: AtomicU64,
    /// Upstream to client.
    pub received: AtomicU64,
}

impl ByteCounters {
    /// (sent, received) so far.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

/// Why an inbound connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not TLS at all: a plain TCP client or garbage.
    NotTls,
    /// Closed before the handshake finished.
    ClosedDuringHandshake,
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// No client certificate.
    NoClientCertificate,
    /// The certificate does not chain to the trust bundle.
    UnknownCa,
    CertificateExpired,
    CertificateNotYetValid,
    /// Any other certificate problem (bad signature, wrong usage, ...).
    BadCertificate,
    /// TLS versions or algorithms in common: none (e.g. a TLS 1.2 client).
    Incompatible,
    /// The client asked for an identity this node does not host.
    UnknownServerIdentity,
    /// The certificate carries no SPIFFE ID.
    NoIdentity,
    /// The SPIFFE ID is of another trust domain.
    WrongTrustDomain,
    PreambleTimeout,
    PreambleOversized,
    PreambleMalformed,
    /// The preamble names no workload of this node.
    UnknownTarget,
    /// The target is served by another identity than the one asked for.
    IdentityMismatch,
    /// Authorization denied the caller.
    Denied,
    /// The local workload did not accept the connection.
    TargetUnreachable,
    /// Any other TLS failure.
    TlsError,
    /// Plaintext from outside the mesh to a strict workload, caught by the
    /// capture hook.
    Plaintext,
    /// Over a bound of `mesh.inbound_limits`: reset before any handshake
    /// (a connection bound at once, a handshake bound after a wait).
    Overloaded,
    /// A tunnel connection (ALPN h2) that did not speak HTTP/2 as it
    /// should: no connection preface, a protocol error, a flood of resets,
    /// or a request that is no CONNECT to an address.
    TunnelProtocol,
    /// A stream that would take up a tunnelled connection paused for an
    /// upgrade, with a token that is unknown or expired, or from another
    /// identity than the paused connection's (answered 410).
    ResumeRefused,
}

impl Refusal {
    pub const ALL: [Refusal; 24] = [
        Refusal::NotTls,
        Refusal::ClosedDuringHandshake,
        Refusal::HandshakeTimeout,
        Refusal::NoClientCertificate,
        Refusal::UnknownCa,
        Refusal::CertificateExpired,
        Refusal::CertificateNotYetValid,
        Refusal::BadCertificate,
        Refusal::Incompatible,
        Refusal::UnknownServerIdentity,
        Refusal::NoIdentity,
        Refusal::WrongTrustDomain,
        Refusal::PreambleTimeout,
        Refusal::PreambleOversized,
        Refusal::PreambleMalformed,
        Refusal::UnknownTarget,
        Refusal::IdentityMismatch,
        Refusal::Denied,
        Refusal::TargetUnreachable,
        Refusal::TlsError,
        Refusal::Plaintext,
        Refusal::Overloaded,
        Refusal::TunnelProtocol,
        Refusal::ResumeRefused,
    ];

    /// Stable name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::NotTls => "not_tls",
            Refusal::ClosedDuringHandshake => "closed_during_handshake",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::NoClientCertificate => "no_client_certificate",
            Refusal::UnknownCa => "unknown_ca",
            Refusal::CertificateExpired => "certificate_expired",
            Refusal::CertificateNotYetValid => "certificate_not_yet_valid",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::Incompatible => "incompatible",
            Refusal::UnknownServerIdentity => "unknown_server_identity",
            Refusal::NoIdentity => "no_identity",
            Refusal::WrongTrustDomain => "wrong_trust_domain",
            Refusal::PreambleTimeout => "preamble_timeout",
            Refusal::PreambleOversized => "preamble_oversized",
            Refusal::PreambleMalformed => "preamble_malformed",
            Refusal::UnknownTarget => "unknown_target",
            Refusal::IdentityMismatch => "identity_mismatch",
            Refusal::Denied => "denied",
            Refusal::TargetUnreachable => "target_unreachable",
            Refusal::TlsError => "tls_error",
            Refusal::Plaintext => "plaintext",
            Refusal::Overloaded => "overloaded",
            Refusal::TunnelProtocol => "tunnel_protocol",
            Refusal::ResumeRefused => "resume_refused",
        }
    }
}

/// Counters of the inbound listener.
#[derive(Debug, Default)]
pub struct InboundStats {
    accepted: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
    plaintext_passed: AtomicU64,
}

impl InboundStats {
    /// Connections that reached their workload.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Refusals for `why`.
    pub fn refused(&self, why: Refusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }

    /// Counts a connection that reached its workload.
    pub fn count_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refusal.
    pub fn count_refusal(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Plaintext connections from outside the mesh passed to a permissive
    /// workload.
    pub fn plaintext_passed(&self) -> u64 {
        self.plaintext_passed.load(Ordering::Relaxed)
    }

    pub fn count_plaintext_passed(&self) {
        self.plaintext_passed.fetch_add(1, Ordering::Relaxed);
    }
}
