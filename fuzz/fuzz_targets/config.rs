//! The config file: whatever the text, parsing and validation return a
//! config or an error, never panic, and the error renders (the agent
//! prints it, file:line:field, to whoever wrote the file).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::config::{Config, ConfigError, Problems};

fuzz_target!(|data: &[u8]| {
    // The agent reads the file with read_to_string, so text that is not
    // UTF-8 never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let error = match Config::parse(text, "fuzz.yaml") {
        Ok(config) => match config.validate() {
            Ok(()) => return,
            Err(items) => ConfigError::Invalid(Problems {
                path: "fuzz.yaml".into(),
                items,
            }),
        },
        Err(error) => error,
    };
    let _ = error.to_string();
});
