//! The audit trail an assessor asks for (PCI DSS 10.2): one JSON line per
//! denial (plaintext refused, failed authentication, authorization
//! denied), and with `audit.connections: true` one per closed connection.
//!
//! Lines go through a bounded queue to a writer thread of their own, so
//! the data path never waits for a disk or a pipe: when the queue is full
//! the line is dropped and counted (`sluice_audit_dropped`), never blocked
//! on.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{SyncSender, TrySendError, sync_channel},
    },
};

use serde::Serialize;

use crate::{
    config::{AuditConfig, AuditOutput as Output},
    tls::Identity,
};

/// The audit trail's sender side, shared by every listener.
#[derive(Debug)]
pub struct Audit {
    tx: Option<SyncSender<String>>,
    connections: bool,
    requests: bool,
    queued: AtomicU64,
    dropped: AtomicU64,
}

/// A refused connection.
#[derive(Debug, Serialize)]
pub struct Denial<'a> {
    /// `plaintext`, an inbound refusal reason (`unknown_ca`, ...), or
    /// `denied` (authorization).
    pub reason: &'a str,
    pub source: Party<'a>,
    pub destination: Party<'a>,
    /// The service the caller dialled, `namespace/name`, when known.
    pub service: Option<&'a str>,
    /// The rule that decided, for authorization denials.
    pub rule: Option<&'a str>,
    /// What else the refusal said (the TLS error, ...).
    pub detail: Option<&'a str>,
}

/// One side of a connection.
#[derive(Debug, Default, Serialize)]
pub struct Party<'a> {
    pub identity: Option<&'a Identity>,
    pub address: Option<SocketAddr>,
    /// A local workload, `namespace/name`.
    pub workload: Option<&'a str>,
}

/// A request served through the request path, as its answer's head went
/// back.
#[derive(Debug, Serialize)]
pub struct Served<'a> {
    pub source: Party<'a>,
    /// The endpoint that answered (or was tried last).
    pub destination: Party<'a>,
    pub service: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    /// The answer's status (the agent's own when it answered).
    pub status: u16,
    /// gRPC: the status of a trailers-only answer (in trailers otherwise,
    /// after this line).
    pub grpc_status: Option<u16>,
    pub duration_ms: f64,
    pub retries: u32,
    pub response_flags: &'a str,
    /// The request's hop of its W3C trace: the trace, the agent's span
    /// (the endpoint's parent), and the caller's span (None: the agent
    /// started the trace). Lower-case hex, as in `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
}

/// A connection that ended.
#[derive(Debug, Serialize)]
pub struct Closed<'a> {
    pub source: Party<'a>,
    pub destination: Party<'a>,
    pub service: Option<&'a str>,
    /// `mutual_tls` or `plaintext`.
    pub security: &'a str,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
    pub close_reason: &'a str,
}

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    time: String,
    event: &'static str,
    decision: &'static str,
    #[serde(flatten)]
    body: &'a T,
}

impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Audit {
    /// Starts the writer for `config`; fails when the file cannot be
    /// opened for appending.
    pub fn start(config: &AuditConfig) -> io::Result<Arc<Audit>> {
        let mut sink: Box<dyn Write + Send> = match &config.output {
            Output::Stdout => Box::new(io::stdout()),
            Output::File(path) => Box::new(io::BufWriter::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("audit.output {}: {e}", path.display()))
                    })?,
            )),
        };
        let (tx, rx) = sync_channel::<String>(config.queue);
        std::thread::Builder::new()
            .name("sluice-audit".into())
            .spawn(move || {
                // A failed write loses that line only; the counters keep
                // the data plane's view exact. Flushed once the queue is
                // empty: prompt when quiet, one write per batch under load.
                while let Ok(line) = rx.recv() {
                    let _ = sink.write_all(line.as_bytes());
                    while let Ok(more) = rx.try_recv() {
                        let _ = sink.write_all(more.as_bytes());
                    }
                    let _ = sink.flush();
                }
            })?;
        Ok(Arc::new(Audit {
            tx: Some(tx),
            connections: config.connections,
            requests: config.requests,
            queued: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }))
    }

    /// An audit trail that writes nothing (unit tests, tools).
    pub fn disabled() -> Arc<Audit> {
        Arc::new(Audit {
            tx: None,
            connections: false,
            requests: false,
            queued: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    /// Records a refused connection.
    pub fn deny(&self, denial: &Denial<'_>) {
        self.send("denial", "deny", denial);
    }

    /// Records an attempt to get around the mesh that the agent turned
    /// into an ordinary meshed connection (decision `redirect`).
    pub fn attempt(&self, attempt: &Denial<'_>) {
        self.send("bypass_attempt", "redirect", attempt);
    }

    /// Whether closed connections are recorded (`audit.connections`).
    pub fn wants_connections(&self) -> bool {
        self.connections && self.tx.is_some()
    }

    /// Records a connection that ended, when `audit.connections` is on.
    pub fn closed(&self, closed: &Closed<'_>) {
        if self.connections {
            self.send("connection", "allow", closed);
        }
    }

    /// Whether requests are recorded (`audit.requests`).
    pub fn wants_requests(&self) -> bool {
        self.requests && self.tx.is_some()
    }

    /// Records a request, when `audit.requests` is on.
    pub fn served(&self, served: &Served<'_>) {
        if self.requests {
            self.send("request", "allow", served);
        }
    }

    /// Lines handed to the writer.
    pub fn queued(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }

    /// Lines dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn send<T: Serialize>(&self, event: &'static str, decision: &'static str, body: &T) {
        let Some(tx) = &self.tx else {
            return;
        };
        let line = Line {
            time: now_rfc3339(),
            event,
            decision,
            body,
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            return;
        };
        text.push('\n');
        match tx.try_send(text) {
            Ok(()) => self.queued.fetch_add(1, Ordering::Relaxed),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// Now as RFC 3339 in UTC with milliseconds.
pub(crate) fn now_rfc3339() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// How long a test may wait for the writer thread.
#[cfg(test)]
const SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(path: &std::path::Path, queue: usize) -> AuditConfig {
        AuditConfig {
            output: Output::File(path.to_owned()),
            connections: true,
            requests: false,
            queue,
        }
    }

    #[test]
    fn a_denial_is_one_json_line_naming_both_sides_and_the_rule() {
        let path = std::env::temp_dir().join(format!("sluice-audit-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let audit = Audit::start(&config(&path, 16)).unwrap();
        let caller = Identity::new("td", "shop", "intruder");
        let target = Identity::new("td", "payments", "ledger");
        audit.deny(&Denial {
            reason: "denied",
            source: Party {
                identity: Some(&caller),
                address: Some("10.0.0.1:40000".parse().unwrap()),
                workload: None,
            },
            destination: Party {
                identity: Some(&target),
                address: Some("10.0.0.2:5432".parse().unwrap()),
                workload: Some("payments/ledger"),
            },
            service: Some("payments/ledger"),
            rule: Some("workload payments/ledger deny[0] spiffe://td/ns/shop/*"),
            detail: None,
        });
        let deadline = std::time::Instant::now() + SETTLE;
        let text = loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.ends_with('\n') || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["event"], "denial");
        assert_eq!(line["decision"], "deny");
        assert_eq!(line["reason"], "denied");
        assert_eq!(
            line["source"]["identity"],
            "spiffe://td/ns/shop/sa/intruder"
        );
        assert_eq!(line["source"]["address"], "10.0.0.1:40000");
        assert_eq!(
            line["destination"]["identity"],
            "spiffe://td/ns/payments/sa/ledger"
        );
        assert_eq!(
            line["rule"],
            "workload payments/ledger deny[0] spiffe://td/ns/shop/*"
        );
        assert!(line["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(audit.queued(), 1);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        // No writer: a queue that nobody drains.
        let (tx, _rx) = sync_channel::<String>(2);
        let audit = Audit {
            tx: Some(tx),
            connections: false,
            requests: false,
            queued: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        };
        let d = Denial {
            reason: "plaintext",
            source: Party::default(),
            destination: Party::default(),
            service: None,
            rule: None,
            detail: None,
        };
        for _ in 0..5 {
            audit.deny(&d);
        }
        assert_eq!(audit.queued(), 2);
        assert_eq!(audit.dropped(), 3);
    }
}
