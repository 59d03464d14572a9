//! The Vhdx reader on arbitrary bytes: open, map, read — errors are fine, panics are bugs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_image::fuzzing::open_and_read(Some(ferry_image::Format::Vhdx), data);
});
