//! Fuzzes the config loader: any text must parse to a config or to errors, never panic.
#![no_main]

use std::path::Path;

use crmbridge::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A config file that is not UTF-8 is refused before parsing (`read_to_string`).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text, Path::new("fuzz.toml")) {
        // What `crmbridge check` prints for a valid config, and the flow lookups.
        let _ = config.summary();
        for name in config.connectors.keys() {
            let _ = config.targets_of(name);
        }
    }
});
