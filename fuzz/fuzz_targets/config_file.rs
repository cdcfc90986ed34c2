//! The configuration file parser (TOML, unknown keys, wrong types) on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = mb_core::Config::from_toml_str_lenient(text, "fuzz.toml");
    }
});
