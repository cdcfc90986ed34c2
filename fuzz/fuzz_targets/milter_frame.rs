//! The milter frame decoder and the packet fields the session reads (NUL-separated
//! strings, addresses), on any byte stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mb_milter::proto;

fuzz_target!(|input: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async {
        let mut stream = input;
        for _ in 0..64 {
            match proto::read(&mut stream).await {
                Ok((_, data)) => {
                    assert!(data.len() < proto::MAX_PACKET);
                    for s in proto::strings(&data) {
                        let _ = proto::address(&s);
                    }
                }
                Err(_) => break,
            }
        }
    });
});
