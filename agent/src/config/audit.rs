//! The `audit` section: where the audit trail goes and what it records.

use std::path::PathBuf;

use serde::Deserialize;

/// The audit trail (one JSON line per event).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// `stdout`, or the path of a file to append to.
    pub output: AuditOutput,
    /// Also one line per closed connection (identities, bytes, duration,
    /// close reason), not only per denial.
    pub connections: bool,
    /// Also one line per request to a request service (an access log):
    /// identities, method, authority, path, status, duration, retries.
    pub requests: bool,
    /// Lines waiting for the writer; beyond it lines are dropped and
    /// counted rather than slowing the data path.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            output: AuditOutput::Stdout,
            connections: false,
            requests: false,
            queue: 8192,
        }
    }
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    Stdout,
    File(PathBuf),
}

impl<'de> Deserialize<'de> for AuditOutput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "stdout" => Ok(AuditOutput::Stdout),
            "" => Err(serde::de::Error::custom(
                "expected `stdout` or the path of a file",
            )),
            path => Ok(AuditOutput::File(PathBuf::from(path))),
        }
    }
}
