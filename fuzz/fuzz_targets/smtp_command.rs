//! The SMTP command parser (every verb, paths, ESMTP parameters, xtext) on any line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    if let Err(e) = mb_smtp::proto::parse_command(line) {
        // The refusal is a reply the session writes as it is: one well-formed line.
        let wire = e.0.to_wire();
        assert!(wire.ends_with("\r\n") && !wire[..wire.len() - 2].contains(['\r', '\n']));
    }
    if let Ok(text) = std::str::from_utf8(line) {
        let _ = mb_smtp::proto::parse_path(text, true);
        let _ = mb_smtp::proto::parse_path(text, false);
        let _ = mb_smtp::proto::xtext_decode(text);
    }
});
