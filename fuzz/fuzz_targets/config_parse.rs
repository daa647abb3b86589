//! Config text, as an administrator (or a typo) writes it: a config or a
//! list of problems, never a panic.
#![no_main]

use std::path::Path;

use clusterd::core::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::parse(text, Path::new("/fuzz/clusterd.toml"), Vec::new());
});
