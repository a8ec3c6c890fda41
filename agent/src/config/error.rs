//! What can be wrong with a config: it cannot be read, it is not YAML of
//! the right shape, or it is, and says something the agent cannot do.

use std::fmt;

use super::load::MAX_CONFIG_BYTES;

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: the config file is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge { path: String },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: u64,
        column: u64,
        message: String,
    },
    #[error("{}", .0)]
    Invalid(Problems),
}

/// Every problem found in one config, in file order.
#[derive(Debug)]
pub struct Problems {
    pub path: String,
    pub items: Vec<Problem>,
}

/// One problem: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the file; 0 when the value was defaulted.
    pub line: u64,
    /// Dotted path of the field, e.g. `services[1].endpoints[0].port`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.items.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}: {}: {}", self.path, p.line, p.field, p.message)?;
        }
        Ok(())
    }
}
