//! The client's reply parser and EHLO capability reader, on the lines a server sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mb_smtp::reply::{Capabilities, ReplyParser};

fuzz_target!(|input: &[u8]| {
    let mut parser = ReplyParser::default();
    for line in input.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match parser.line(line) {
            Ok(Some(reply)) => {
                assert!((200..600).contains(&reply.code));
                let _ = reply.status();
                let _ = reply.text();
                let _ = Capabilities::from_ehlo(&reply);
            }
            Ok(None) => {}
            Err(_) => parser = ReplyParser::default(),
        }
    }
});
