//! `mb-config set KEY VALUE`: every key's value parser and its own check, on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mb_core::registry::KEYS;

fuzz_target!(|input: &[u8]| {
    let Some((&pick, text)) = input.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let key = KEYS[usize::from(pick) % KEYS.len()].key;
    if let Ok((_, value)) = mb_core::config::parse_key_value(key, text) {
        // What was accepted prints in a form that is accepted again as the same value.
        let canonical = value.to_string();
        let again = mb_core::config::parse_key_value(key, &canonical)
            .unwrap_or_else(|e| panic!("{key}: {text:?} -> {canonical:?} refused: {e}"));
        assert_eq!(again.1, value, "{key}: {text:?} -> {canonical:?}");
    }
});
