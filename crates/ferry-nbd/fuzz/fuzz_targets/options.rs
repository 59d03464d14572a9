//! Option payload parsers of both sides (GO/INFO, meta contexts, INFO items, LIST entries).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_nbd::fuzzing::decode_options(data);
});
