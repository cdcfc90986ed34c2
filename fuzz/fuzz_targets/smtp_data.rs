//! The DATA decoder and the line checker, fed in arbitrary chunks: never more output than
//! input, never a panic, and the end of data only ever at <CRLF>.<CRLF>.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mb_smtp::data::{DataDecoder, LineChecker};

fuzz_target!(|input: &[u8]| {
    let Some((&chunk, stream)) = input.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut decoder = DataDecoder::default();
    let mut out = Vec::new();
    let mut consumed = 0;
    for piece in stream.chunks(chunk) {
        match decoder.feed(piece, &mut out) {
            Ok((used, done)) => {
                assert!(used <= piece.len());
                consumed += used;
                if done {
                    // The stream up to here ends with the one true terminator.
                    let seen = &stream[..consumed];
                    assert!(seen.ends_with(b"\r\n.\r\n") || seen == b".\r\n");
                    break;
                }
            }
            Err(_) => break,
        }
        assert!(out.len() <= consumed + 2);
    }
    let mut checker = LineChecker::default();
    for piece in stream.chunks(chunk) {
        checker.feed(piece);
    }
    checker.finish();
});
