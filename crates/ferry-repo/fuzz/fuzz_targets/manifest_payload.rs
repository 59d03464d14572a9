//! The manifest payload parser (behind authentication, reached directly).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_repo::Manifest::from_payload("snapshots/fuzz/manifest", data);
});
