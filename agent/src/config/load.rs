//! Reading the file: its size, its text, the YAML parse, and parse errors
//! that name the line, the column and the key.

use std::path::Path;

use super::{Config, ConfigError, Problems};

/// Largest config file accepted; a catalog bigger than this belongs in a
/// discovery source, not a file.
pub(super) const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|error| ConfigError::Read {
            path: display.clone(),
            error,
        })?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge { path: display });
        }
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: display.clone(),
            error,
        })?;
        Config::from_text(&text, path)
    }

    /// Like [`Config::load`], from the text of the file at `path` as read
    /// earlier: Kubernetes discovery applies its changes over the file as
    /// last read, without reading it again for every event.
    pub fn from_text(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let mut config = Config::parse(text, &display)?;
        config.source = path.to_owned();
        config.validate().map_err(|items| {
            ConfigError::Invalid(Problems {
                path: display,
                items,
            })
        })?;
        Ok(config)
    }

    /// Parses YAML text without validating it; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        serde_saphyr::from_str::<Config>(text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            let mut message = bare_message(&e.to_string());
            // Type errors point at a value; name the key it belongs to.
            if let Some(key) = key_on_line(text, line)
                && !message.contains(&format!("`{key}`"))
            {
                message = format!("{key}: {message}");
            }
            ConfigError::Syntax {
                path: origin.to_owned(),
                line,
                column,
                message,
            }
        })
    }
}

/// The mapping key written on 1-based `line` of `text`, if any
/// (`  - port: x` -> `port`).
fn key_on_line(text: &str, line: u64) -> Option<&str> {
    let l = text
        .lines()
        .nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let l = l.trim_start().trim_start_matches("- ").trim_start();
    let (key, _) = l.split_once(':')?;
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then_some(key)
}

/// The parser's message without its own `error: line L column C:` prefix
/// and snippet, since [`ConfigError::Syntax`] says where.
fn bare_message(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message).trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    if let Some(rest) = first.strip_prefix("line ")
        && let Some((_, after)) = rest.split_once(": ")
        && rest.contains(" column ")
    {
        return after.to_owned();
    }
    first.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::GOOD;

    #[test]
    fn unknown_field_names_field_and_line() {
        let text = GOOD.replace("    port: 8080\n", "    port: 8080\n    prot: 1\n");
        let err = Config::parse(&text, "t.yaml").unwrap_err().to_string();
        assert!(err.starts_with("t.yaml:11:"), "{err}");
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn type_errors_name_the_key() {
        let text = GOOD.replace("port: 8080", "port: eighty");
        let err = Config::parse(&text, "t.yaml").unwrap_err().to_string();
        assert_eq!(err, "t.yaml:10:11: port: invalid u16");
    }

    #[test]
    fn endpoint_without_port_is_a_syntax_error_with_line() {
        let text = GOOD.replace("        port: 9001\n", "");
        let err = Config::parse(&text, "t.yaml").unwrap_err().to_string();
        assert!(err.contains("port"), "{err}");
        assert!(err.starts_with("t.yaml:12:"), "{err}");
    }
}
