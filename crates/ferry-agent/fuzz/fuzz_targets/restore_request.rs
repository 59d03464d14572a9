//! The restore request parser (export names prefixed `ferry-restore:1:`, ADR 0169).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_agent::restore::fuzz_request(data);
});
