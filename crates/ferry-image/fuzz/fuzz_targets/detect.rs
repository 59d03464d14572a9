//! Format detection plus whichever reader it picks.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_image::fuzzing::open_and_read(None, data);
});
