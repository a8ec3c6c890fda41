//! The troubleshooting commands that ask the running agent: tables for
//! people, `-o json` for scripts.

use std::{io::IsTerminal, net::SocketAddr};

use serde_json::Value;

use super::Outcome;
use crate::admin::client::{self, AdminError};

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

fn fetch(admin: SocketAddr, path: &str) -> Result<Value, InspectError> {
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

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_owned(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Prints rows of `items` as a table with these (header, field) columns.
fn table(items: &[Value], columns: &[(&str, &str)]) {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| columns.iter().map(|(_, f)| text(&item[*f])).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            rows.iter()
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
                .max(h.len())
        })
        .collect();
    let bold = std::io::stdout().is_terminal();
    let header: Vec<String> = columns
        .iter()
        .zip(&widths)
        .map(|((h, _), w)| format!("{h:<w$}"))
        .collect();
    let header = header.join("  ");
    if bold {
        println!("\x1b[1m{}\x1b[0m", header.trim_end());
    } else {
        println!("{}", header.trim_end());
    }
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
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
}

impl View {
    fn path(self) -> &'static str {
        match self {
            View::Services => "/debug/services",
            View::Endpoints => "/debug/endpoints",
            View::Conns => "/debug/conns",
            View::Breakers => "/debug/breakers",
            View::Certs => "/debug/certs",
            View::Workloads => "/debug/workloads",
        }
    }

    fn columns(self) -> &'static [(&'static str, &'static str)] {
        match self {
            View::Services => &[
                ("NAMESPACE", "namespace"),
                ("NAME", "name"),
                ("ADDRESS", "address"),
                ("MODE", "mode"),
                ("ENDPOINTS", "endpoints"),
                ("ELIGIBLE", "eligible"),
                ("CONNECTIONS", "connections"),
                ("PANIC", "panicking"),
            ],
            View::Endpoints => &[
                ("SERVICE", "service"),
                ("ADDRESS", "address"),
                ("NODE", "node"),
                ("WEIGHT", "weight"),
                ("HEALTHY", "healthy"),
                ("BREAKER", "breaker"),
                ("EJECTED FOR (S)", "ejected_for_seconds"),
                ("IN FLIGHT", "in_flight"),
                ("EJECTIONS", "ejections"),
            ],
            View::Conns => &[
                ("ID", "id"),
                ("SOURCE", "source_workload"),
                ("DESTINATION", "destination_service"),
                ("ENDPOINT", "endpoint"),
                ("SECURITY", "security"),
                ("AGE (S)", "age_seconds"),
                ("SENT", "bytes_sent"),
                ("RECEIVED", "bytes_received"),
            ],
            View::Breakers => &[
                ("SERVICE", "service"),
                ("CONNECTIONS", "connections"),
                ("MAX", "max_connections"),
                ("PENDING", "pending_connects"),
                ("EJECTED", "ejected_endpoints"),
                ("RETRIES", "retries"),
                ("BUDGET EXHAUSTED", "retry_budget_exhausted"),
                ("FAST FAILURES", "fast_failures_total"),
            ],
            View::Certs => &[
                ("IDENTITY", "identity"),
                ("NOT AFTER (UNIX)", "not_after"),
                ("EXPIRES IN (S)", "expires_in_seconds"),
            ],
            View::Workloads => &[
                ("NAMESPACE", "namespace"),
                ("NAME", "name"),
                ("IDENTITY", "identity"),
                ("CGROUP", "cgroup"),
                ("NETNS", "netns"),
                ("LISTENER", "listener"),
            ],
        }
    }
}

/// Prints a list view, optionally only the rows whose `service` is
/// `filter` (`name` or `namespace/name`).
pub fn list(
    admin: SocketAddr,
    view: View,
    filter: Option<&str>,
    output: Output,
) -> Result<Outcome, InspectError> {
    let value = fetch(admin, view.path())?;
    let mut items = value.as_array().cloned().unwrap_or_default();
    if let Some(f) = filter {
        items.retain(|i| {
            let s = i["service"].as_str().unwrap_or("");
            s == f || s.rsplit('/').next() == Some(f)
        });
    }
    match output {
        Output::Json => println!("{}", Value::Array(items)),
        Output::Table => table(&items, view.columns()),
    }
    Ok(Outcome::Success)
}

/// `sluice status`: exit 0 when the agent is ready, 4 when it answers but
/// is not (starting or stopping).
pub fn status(admin: SocketAddr, output: Output) -> Result<Outcome, InspectError> {
    let s = fetch(admin, "/debug/status")?;
    let ready = s["ready"].as_bool().unwrap_or(false);
    match output {
        Output::Json => println!("{s}"),
        Output::Table => {
            println!(
                "agent        sluice {} on node {}",
                text(&s["version"]),
                text(&s["node"])
            );
            println!(
                "ready        {}{}",
                text(&s["ready"]),
                s["not_ready_reasons"]
                    .as_array()
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(" ({})", r.iter().map(text).collect::<Vec<_>>().join("; ")))
                    .unwrap_or_default()
            );
            println!("uptime       {}s", text(&s["uptime_seconds"]));
            println!("config       {}", text(&s["config"]));
            for p in s["programs"].as_array().into_iter().flatten() {
                println!(
                    "program      {} ({}) on {}: {}",
                    text(&p["name"]),
                    text(&p["type"]),
                    text(&p["cgroup"]),
                    if p["attached"].as_bool() == Some(true) {
                        "attached"
                    } else {
                        "not attached"
                    }
                );
            }
            println!("pinned in    {}", text(&s["pin_dir"]));
            let l = &s["listeners"];
            println!(
                "listeners    outbound {}, inbound mTLS {}, admin {}{}",
                text(&l["outbound"]),
                text(&l["inbound_mtls"]),
                text(&l["admin"]),
                l["metrics"]
                    .as_str()
                    .map(|m| format!(", metrics {m}"))
                    .unwrap_or_default()
            );
            println!(
                "totals       {} services, {} workloads, {} connections open, {} inbound accepted",
                text(&s["services"]),
                text(&s["workloads"]),
                text(&s["connections_active"]),
                text(&s["inbound_accepted"])
            );
            if let Some(r) = s["redirects"].as_object() {
                let parts: Vec<String> =
                    r.iter().map(|(k, v)| format!("{k} {}", text(v))).collect();
                println!("redirects    {}", parts.join(", "));
            }
        }
    }
    Ok(if ready {
        Outcome::Success
    } else {
        Outcome::NotReady
    })
}
