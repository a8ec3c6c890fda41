//! The admin API: health, readiness, metrics, and JSON views of the agent's
//! state for `sluice status` and friends. It runs apart from the data
//! plane's accept loops, on two kinds of listener ([`Surface`]):
//!
//! - `agent.admin`, loopback only (config validation refuses anything
//!   else): everything, including the `/debug/` views, which name
//!   workloads, endpoints and live connections, and `/debug/trace`.
//! - `agent.metrics`, optional and allowed on the node's address, for
//!   Prometheus and kubelet's probes: `/metrics`, `/healthz` and `/readyz`
//!   only.
//!
//! A deliberately small HTTP/1.1 server: GET only, one request per
//! connection, bounded in size and time, and at most [`MAX_TRACE_STREAMS`]
//! traces at once. It answers while the agent starts and stops, honestly
//! (`/readyz` says why it is not ready).

pub mod client;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

mod collector;
pub mod views;

pub use collector::{KernelView, StateCollector};

use crate::{
    accept::accept_until_drained, drain::DrainWatch, proxy::ProxyInputs, telemetry::TraceLog,
};

/// Largest request the admin server reads.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Most `/debug/trace` streams open at once. Each holds a connection and a
/// copy of every eBPF event for up to an hour; a few are plenty for the
/// people debugging one node, and the bound keeps a runaway script from
/// piling them up.
pub const MAX_TRACE_STREAMS: usize = 4;

/// What a listener of the admin server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Everything: probes, metrics and the `/debug/` views (`agent.admin`).
    Admin,
    /// `/metrics`, `/healthz` and `/readyz`; 404 for the rest
    /// (`agent.metrics`).
    Metrics,
}

impl Surface {
    /// Whether this surface serves `path`.
    fn serves(self, path: &str) -> bool {
        match self {
            Surface::Admin => true,
            Surface::Metrics => matches!(path, "/metrics" | "/healthz" | "/readyz"),
        }
    }
}

/// The slots of the live `/debug/trace` streams.
#[derive(Debug)]
pub struct TraceStreams {
    slots: tokio::sync::Semaphore,
}

impl Default for TraceStreams {
    fn default() -> Self {
        TraceStreams {
            slots: tokio::sync::Semaphore::new(MAX_TRACE_STREAMS),
        }
    }
}

impl TraceStreams {
    /// A slot for one more stream, held until dropped; none when
    /// [`MAX_TRACE_STREAMS`] are open.
    fn open(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.slots.try_acquire().ok()
    }

    /// Streams open now.
    pub fn open_count(&self) -> usize {
        MAX_TRACE_STREAMS.saturating_sub(self.slots.available_permits())
    }
}

/// Facts about the running agent that do not change after start.
#[derive(Debug, Clone)]
pub struct StaticInfo {
    pub node: String,
    pub config: String,
    pub cgroup: String,
    pub pin_dir: String,
    pub outbound: String,
    pub inbound: String,
    pub admin: String,
    /// The metrics-only listener, if configured.
    pub metrics: Option<String>,
    pub trust_domain: String,
}

/// Everything the admin views read.
pub struct AdminState {
    pub info: StaticInfo,
    pub started: Instant,
    /// What the data plane shares: the catalog, TLS, metrics, counters.
    pub inputs: Arc<ProxyInputs>,
    pub kernel: Arc<KernelView>,
    /// Set once the programs are attached.
    pub attached: AtomicBool,
    /// Set when the drain starts.
    pub stopping: AtomicBool,
    /// The eBPF programs' events, for `/debug/trace`.
    pub trace: TraceLog,
    /// The `/debug/trace` streams open now, bounded.
    pub trace_streams: TraceStreams,
    /// Network namespaces (pods) where the outbound listener is open.
    pub pod_listeners: Arc<std::sync::Mutex<Vec<std::path::PathBuf>>>,
    /// With Kubernetes discovery: every watched resource was listed once.
    pub discovery_synced: Option<Arc<AtomicBool>>,
    /// The outbound tunnel pools, with `mesh.tunnels.enabled`.
    pub tunnels: Option<Arc<crate::proxy::tunnels::Tunnels>>,
}

impl AdminState {
    /// Why the agent is not ready, if it is not, as `surface` may tell it.
    fn not_ready(&self, surface: Surface) -> Vec<String> {
        let mut why = Vec::new();
        if self.stopping.load(Ordering::Acquire) {
            why.push("stopping: draining connections".to_owned());
        }
        if !self.attached.load(Ordering::Acquire) {
            why.push("eBPF programs not attached yet".to_owned());
        }
        if let Some(synced) = &self.discovery_synced
            && !synced.load(Ordering::Acquire)
        {
            why.push("kubernetes: services, endpoints and pods not listed yet".to_owned());
        }
        let catalog = self.inputs.catalog.load();
        let uncertified = catalog
            .workloads()
            .iter()
            .filter(|w| self.inputs.tls.store.get(&w.identity).is_none())
            .map(|w| w.identity.to_string());
        why.extend(certificate_reasons(uncertified, surface));
        why
    }
}

/// The readiness reasons for workloads without a certificate: one per
/// identity on the admin API; on the metrics listener, which the network
/// reaches, only how many, so that it names no workload.
fn certificate_reasons(uncertified: impl Iterator<Item = String>, surface: Surface) -> Vec<String> {
    let named: Vec<String> = uncertified
        .map(|id| format!("no certificate for {id}"))
        .collect();
    match surface {
        Surface::Admin => named,
        Surface::Metrics if named.is_empty() => named,
        Surface::Metrics => vec![format!(
            "no certificate for {} workload identities (`sluice status` names them)",
            named.len()
        )],
    }
}

/// Serves `surface` of the admin API on `listener` until the drain ends.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    surface: Surface,
    mut drain: DrainWatch,
) {
    let name = match surface {
        Surface::Admin => "admin",
        Surface::Metrics => "metrics",
    };
    accept_until_drained(&listener, &mut drain, name, |stream, _, guard| {
        let state = state.clone();
        tokio::spawn(async move {
            let _ = answer(stream, &state, surface).await;
            drop(guard);
        });
    })
    .await;
}

async fn answer(
    mut stream: TcpStream,
    state: &AdminState,
    surface: Surface,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    // The request must arrive within the deadline; a trace then streams
    // for as long as it asked.
    let read = async {
        while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            if len == buf.len() {
                return Ok(false);
            }
            let n = stream.read(&mut buf[len..]).await?;
            if n == 0 {
                return Ok(false);
            }
            len += n;
        }
        Ok::<bool, std::io::Error>(true)
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, read).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) if len == buf.len() => {
            return respond(&mut stream, 431, "text/plain", "request too large\n").await;
        }
        _ => return Ok(()),
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    let path = target.split('?').next().unwrap_or("");
    if !surface.serves(path) {
        return respond(
            &mut stream,
            404,
            "text/plain",
            "not served here: this listener serves /metrics, /healthz and /readyz only\n",
        )
        .await;
    }
    match path {
        "/healthz" => respond(&mut stream, 200, "text/plain", "ok\n").await,
        "/readyz" => {
            let why = state.not_ready(surface);
            let body = json!({ "ready": why.is_empty(), "reasons": why }).to_string();
            let code = if why.is_empty() { 200 } else { 503 };
            respond(&mut stream, code, "application/json", &body).await
        }
        "/metrics" => {
            // Content negotiation: OpenMetrics for who asks for it (the
            // Prometheus server does), the classic text format otherwise.
            let openmetrics = head.lines().any(|l| {
                l.to_ascii_lowercase().starts_with("accept:")
                    && l.contains("application/openmetrics-text")
            });
            if openmetrics {
                let body = state.inputs.metrics.encode();
                let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                respond(&mut stream, 200, kind, &body).await
            } else {
                let body = state.inputs.metrics.encode_prometheus_text();
                let kind = "text/plain; version=0.0.4; charset=utf-8";
                respond(&mut stream, 200, kind, &body).await
            }
        }
        "/debug/trace" => match state.trace_streams.open() {
            Some(slot) => {
                let streamed = trace(&mut stream, state, target).await;
                drop(slot);
                streamed
            }
            None => {
                let body = format!(
                    "{MAX_TRACE_STREAMS} trace streams are open already, the most at once; \
                     try again when one of them ends\n"
                );
                respond(&mut stream, 429, "text/plain", &body).await
            }
        },
        _ => match views::render(state, path) {
            Some(v) => respond(&mut stream, 200, "application/json", &v).await,
            None => respond(&mut stream, 404, "text/plain", "no such page\n").await,
        },
    }
}

/// Streams the eBPF programs' events, one per line, for `?seconds=N`
/// (default 10, at most 3600) or until the client goes away.
async fn trace(stream: &mut TcpStream, state: &AdminState, target: &str) -> std::io::Result<()> {
    let seconds = target
        .split_once("seconds=")
        .and_then(|(_, v)| v.split('&').next()?.parse::<u64>().ok())
        .unwrap_or(10)
        .min(3600);
    let mut events = state.trace.subscribe();
    let (mut reader, mut writer) = stream.split();
    writer
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n")
        .await?;
    let until = tokio::time::Instant::now() + Duration::from_secs(seconds);
    // The client sends nothing after its request: a read that ends means
    // it went away. Without this, a client gone while no event comes would
    // hold its stream slot until `seconds` pass.
    let mut ignored = [0u8; 64];
    loop {
        let event = tokio::select! {
            _ = tokio::time::sleep_until(until) => break,
            read = reader.read(&mut ignored) => match read {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            },
            e = events.recv() => e,
        };
        match event {
            Ok(line) => {
                writer.write_all(line.as_bytes()).await?;
                writer.write_all(b"\n").await?;
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                writer
                    .write_all(format!("({n} events dropped: tracing too slowly)\n").as_bytes())
                    .await?;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
        }
    }
    writer.shutdown().await
}

async fn respond(stream: &mut TcpStream, code: u16, kind: &str, body: &str) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_surface_serves_probes_and_metrics_only() {
        for path in ["/metrics", "/healthz", "/readyz"] {
            assert!(Surface::Metrics.serves(path), "{path}");
            assert!(Surface::Admin.serves(path), "{path}");
        }
        for path in [
            "/debug/conns",
            "/debug/trace",
            "/debug/status",
            "/",
            "/metricsx",
        ] {
            assert!(!Surface::Metrics.serves(path), "{path}");
            assert!(Surface::Admin.serves(path), "{path}");
        }
    }

    #[test]
    fn the_metrics_surface_counts_uncertified_workloads_without_naming_them() {
        let ids = || {
            ["spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/y"]
                .into_iter()
                .map(str::to_owned)
        };
        assert_eq!(
            certificate_reasons(ids(), Surface::Admin),
            [
                "no certificate for spiffe://td/ns/a/sa/x",
                "no certificate for spiffe://td/ns/b/sa/y"
            ]
        );
        let counted = certificate_reasons(ids(), Surface::Metrics);
        assert_eq!(counted.len(), 1);
        assert!(counted[0].starts_with("no certificate for 2 workload identities"));
        assert!(!counted[0].contains("spiffe://"));
        assert!(certificate_reasons(std::iter::empty(), Surface::Metrics).is_empty());
    }

    #[test]
    fn trace_streams_are_bounded_and_a_closed_one_frees_its_slot() {
        let streams = TraceStreams::default();
        let mut open: Vec<_> = (0..MAX_TRACE_STREAMS)
            .map(|_| streams.open().expect("a free slot"))
            .collect();
        assert_eq!(streams.open_count(), MAX_TRACE_STREAMS);
        assert!(streams.open().is_none());
        open.pop();
        assert_eq!(streams.open_count(), MAX_TRACE_STREAMS - 1);
        let again = streams.open();
        assert!(again.is_some());
        assert_eq!(streams.open_count(), MAX_TRACE_STREAMS);
    }
}
