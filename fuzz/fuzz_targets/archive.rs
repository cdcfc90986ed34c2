//! Archive listing (zip with leading data and ZIP64, tar, gzip, bzip2, nested archives)
//! within small expansion limits: any input ends in bounded time and memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mb_filter::archive::{Limits, inspect};

const NAMES: [&str; 6] = ["a.zip", "a.tar", "a.tar.gz", "a.tgz", "a.bz2", "a.bin"];

fuzz_target!(|input: &[u8]| {
    let Some((&pick, data)) = input.split_first() else {
        return;
    };
    let limits = Limits {
        depth: 3,
        max_size: 1 << 20,
        max_ratio: 100,
    };
    let contents = inspect(NAMES[usize::from(pick) % NAMES.len()], data, &limits);
    assert!(contents.members.len() <= 1 << 20);
});
