//! Configuration as an operator (or whoever writes the file) gives it: the TOML file
//! (`config::ConfigFile::parse`, which also turns every `[[port]]` table into a port spec)
//! and a `--port` spec (`config::parse_port`), from arbitrary text. Errors are fine; a
//! panic is a bug.
//!
//! Input: the first byte picks the parser (even: TOML file, odd: `--port` spec); the rest is
//! the text (invalid UTF-8 is decoded lossily, as a file read would refuse it anyway).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use xvdpa::config::{parse_port, ConfigFile};

fuzz_target!(|data: &[u8]| {
    let Some((&which, text)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(text);
    if which & 1 == 0 {
        let _ = ConfigFile::parse(Path::new("fuzz.toml"), &text);
    } else if let Ok(spec) = parse_port(&text) {
        assert!(spec.queue_pairs >= 1);
    }
});
