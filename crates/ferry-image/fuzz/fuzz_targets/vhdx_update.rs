//! The in-place VHDX updater's parser (headers, region table, metadata, BAT).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_image::fuzzing::load_vhdx_for_update(data);
});
