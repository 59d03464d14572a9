//! The disk index payload parser (behind authentication, reached directly).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_repo::DiskIndex::from_payload("indexes/fuzz/0", data);
});
