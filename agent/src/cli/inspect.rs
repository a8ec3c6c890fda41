//! The troubleshooting commands that ask the running agent: tables for
//! people, `-o json` for scripts.

use std::{io::IsTerminal, net::SocketAddr};

use super::Outcome;
use crate::admin::{
    client::{self, AdminError},
    views,
};

/// What to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Why an inspection failed, with the exit code scripts can rely on.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("the agent answered {path} with status {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("the agent's answer to {path} is not JSON: {error}")]
    Json {
        path: String,
        error: serde_json::Error,
    },
}

impl InspectError {
    /// 3: the agent cannot be reached; 1: anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            InspectError::Admin(AdminError::Unreachable { .. }) => 3,
            _ => 1,
        }
    }
}

fn fetch<T: serde::de::DeserializeOwned>(admin: SocketAddr, path: &str) -> Result<T, InspectError> {
    let (status, body) = client::get(admin, path)?;
    if status != 200 {
        return Err(InspectError::Status {
            path: path.to_owned(),
            status,
            body,
        });
    }
    serde_json::from_str(&body).map_err(|error| InspectError::Json {
        path: path.to_owned(),
        error,
    })
}

/// One row of a list view as the tables show it.
trait Row: serde::de::DeserializeOwned + serde::Serialize {
    const PATH: &'static str;
    const HEADERS: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
    /// The service the row is about, for `--service`; None: not filtered.
    fn service(&self) -> Option<&str> {
        None
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

impl Row for views::TunnelRow {
    const PATH: &'static str = "/debug/tunnels";
    const HEADERS: &'static [&'static str] = &[
        "NODE",
        "SOURCE",
        "DESTINATION",
        "POD NETNS",
        "CONNECTIONS",
        "CLOSING",
        "MOVABLE",
        "STREAMS",
        "LAST DIAL FAILURE",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.node.clone(),
            self.source.clone(),
            self.destination.clone(),
            self.netns.clone().unwrap_or_else(|| "-".to_owned()),
            self.connections.to_string(),
            self.closing.to_string(),
            self.movable.to_string(),
            self.streams.to_string(),
            match (&self.last_dial_failure, self.last_dial_failure_seconds_ago) {
                (Some(why), Some(ago)) => format!("{ago}s ago: {why}"),
                _ => "-".to_owned(),
            },
        ]
    }
}

impl Row for views::ServiceRow {
    const PATH: &'static str = "/debug/services";
    const HEADERS: &'static [&'static str] = &[
        "NAMESPACE",
        "NAME",
        "ADDRESS",
        "MODE",
        "ENDPOINTS",
        "ELIGIBLE",
        "CONNECTIONS",
        "PANIC",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.namespace.clone(),
            self.name.clone(),
            self.address.clone(),
            self.mode.clone(),
            self.endpoints.to_string(),
            self.eligible.to_string(),
            self.connections.to_string(),
            yes_no(self.panicking),
        ]
    }
}

impl Row for views::EndpointRow {
    const PATH: &'static str = "/debug/endpoints";
    const HEADERS: &'static [&'static str] = &[
        "SERVICE",
        "ADDRESS",
        "NODE",
        "WEIGHT",
        "HEALTHY",
        "BREAKER",
        "EJECTED FOR (S)",
        "IN FLIGHT",
        "EJECTIONS",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.service.clone(),
            self.address.clone(),
            self.node.clone(),
            self.weight.to_string(),
            yes_no(self.healthy),
            self.breaker.clone(),
            or_dash(self.ejected_for_seconds.map(|s| format!("{s:.1}"))),
            self.in_flight.to_string(),
            self.ejections.to_string(),
        ]
    }
    fn service(&self) -> Option<&str> {
        Some(&self.service)
    }
}

impl Row for views::ConnRow {
    const PATH: &'static str = "/debug/conns";
    const HEADERS: &'static [&'static str] = &[
        "ID",
        "SOURCE",
        "DESTINATION",
        "ENDPOINT",
        "SECURITY",
        "AGE (S)",
        "SENT",
        "RECEIVED",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.to_string(),
            self.source_workload.clone(),
            self.destination_service.clone(),
            self.endpoint.clone(),
            self.security.clone(),
            format!("{:.1}", self.age_seconds),
            self.bytes_sent.to_string(),
            self.bytes_received.to_string(),
        ]
    }
}

impl Row for views::BreakerRow {
    const PATH: &'static str = "/debug/breakers";
    const HEADERS: &'static [&'static str] = &[
        "SERVICE",
        "CONNECTIONS",
        "MAX",
        "PENDING",
        "PENDING REQUESTS",
        "EJECTED",
        "RETRIES",
        "BUDGET EXHAUSTED",
        "FAST FAILURES",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.service.clone(),
            self.connections.to_string(),
            self.max_connections.to_string(),
            self.pending_connects.to_string(),
            self.pending_requests.to_string(),
            self.ejected_endpoints.to_string(),
            self.retries.to_string(),
            self.retry_budget_exhausted.to_string(),
            self.fast_failures_total.to_string(),
        ]
    }
    fn service(&self) -> Option<&str> {
        Some(&self.service)
    }
}

impl Row for views::CertRow {
    const PATH: &'static str = "/debug/certs";
    const HEADERS: &'static [&'static str] = &["IDENTITY", "NOT AFTER (UNIX)", "EXPIRES IN (S)"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.identity.clone(),
            self.not_after.to_string(),
            self.expires_in_seconds.to_string(),
        ]
    }
}

impl Row for views::WorkloadRow {
    const PATH: &'static str = "/debug/workloads";
    const HEADERS: &'static [&'static str] = &[
        "NAMESPACE",
        "NAME",
        "IDENTITY",
        "CGROUP",
        "NETNS",
        "LISTENER",
        "RATE LIMIT",
        "RATE LIMITED",
        "REQUEST RULES",
    ];
    fn cells(&self) -> Vec<String> {
        let limit = self.rate_limit.as_ref();
        vec![
            self.namespace.clone(),
            self.name.clone(),
            self.identity.clone(),
            self.cgroup.clone(),
            or_dash(self.netns.as_ref()),
            self.listener.clone(),
            or_dash(limit.map(|l| {
                let each = if l.per_source { " per caller" } else { "" };
                format!("{}/s burst {}{each}", l.requests_per_second, l.burst)
            })),
            or_dash(limit.map(|l| l.refused)),
            self.request_rules.to_string(),
        ]
    }
}

/// Prints `rows` as a table under `headers`.
fn table(headers: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
                .max(h.len())
        })
        .collect();
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        let padded: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let header = line(&mut headers.iter().copied());
    if std::io::stdout().is_terminal() {
        println!("\x1b[1m{header}\x1b[0m");
    } else {
        println!("{header}");
    }
    for row in rows {
        println!("{}", line(&mut row.iter().map(String::as_str)));
    }
}

/// One of the list views.
#[derive(Debug, Clone, Copy)]
pub enum View {
    Services,
    Endpoints,
    Conns,
    Breakers,
    Certs,
    Workloads,
    Tunnels,
}

/// Prints a list view, optionally only the rows whose `service` is
/// `filter` (`name` or `namespace/name`).
pub fn list(
    admin: SocketAddr,
    view: View,
    filter: Option<&str>,
    output: Output,
) -> Result<Outcome, InspectError> {
    match view {
        View::Services => list_rows::<views::ServiceRow>(admin, filter, output),
        View::Endpoints => list_rows::<views::EndpointRow>(admin, filter, output),
        View::Conns => list_rows::<views::ConnRow>(admin, filter, output),
        View::Breakers => list_rows::<views::BreakerRow>(admin, filter, output),
        View::Certs => list_rows::<views::CertRow>(admin, filter, output),
        View::Workloads => list_rows::<views::WorkloadRow>(admin, filter, output),
        View::Tunnels => list_rows::<views::TunnelRow>(admin, filter, output),
    }
}

fn list_rows<R: Row>(
    admin: SocketAddr,
    filter: Option<&str>,
    output: Output,
) -> Result<Outcome, InspectError> {
    let mut rows: Vec<R> = fetch(admin, R::PATH)?;
    if let Some(f) = filter {
        rows.retain(|r| {
            r.service()
                .is_some_and(|s| s == f || s.rsplit('/').next() == Some(f))
        });
    }
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string(&rows).expect("a view serializes")
        ),
        Output::Table => table(R::HEADERS, &rows.iter().map(Row::cells).collect::<Vec<_>>()),
    }
    Ok(Outcome::Success)
}

/// `sluice status`: exit 0 when the agent is ready, 4 when it answers but
/// is not (starting or stopping).
pub fn status(admin: SocketAddr, output: Output) -> Result<Outcome, InspectError> {
    let s: views::Status = fetch(admin, "/debug/status")?;
    match output {
        Output::Json => println!("{}", serde_json::to_string(&s).expect("a view serializes")),
        Output::Table => print_status(&s),
    }
    Ok(if s.ready {
        Outcome::Success
    } else {
        Outcome::NotReady
    })
}

fn print_status(s: &views::Status) {
    println!("agent        sluice {} on node {}", s.version, s.node);
    let reasons = if s.not_ready_reasons.is_empty() {
        String::new()
    } else {
        format!(" ({})", s.not_ready_reasons.join("; "))
    };
    println!("ready        {}{reasons}", yes_no(s.ready));
    println!("uptime       {}s", s.uptime_seconds);
    println!("config       {}", s.config);
    if !s.restart_pending.is_empty() {
        println!(
            "restart      needed: the file in force changed {} (a reload does not apply them)",
            s.restart_pending.join(", ")
        );
    }
    for p in &s.programs {
        println!(
            "program      {} ({}) on {}: {}",
            p.name,
            p.kind,
            p.cgroup,
            if p.attached {
                "attached"
            } else {
                "not attached"
            }
        );
    }
    println!("pinned in    {}", s.pin_dir);
    let l = &s.listeners;
    println!(
        "listeners    outbound {}, inbound mTLS {}, admin {}{}",
        l.outbound,
        l.inbound_mtls,
        l.admin,
        l.metrics
            .as_ref()
            .map(|m| format!(", metrics {m}"))
            .unwrap_or_default()
    );
    println!(
        "totals       {} services, {} workloads, {} connections open, {} inbound accepted",
        s.services, s.workloads, s.connections_active, s.inbound_accepted
    );
    let redirects: Vec<String> = s
        .redirects
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!("redirects    {}", redirects.join(", "));
    match &s.tunnels {
        Some(t) => println!(
            "tunnels      {} pools to peers, {} connections, {} streams; {} connections from peers",
            t.pools, t.connections, t.streams, t.from_peers
        ),
        None => println!("tunnels      off"),
    }
}
