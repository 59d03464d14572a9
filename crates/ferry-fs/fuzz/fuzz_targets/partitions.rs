//! MBR (with extended boot records) and GPT decoding, then file-system detection per volume.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_fs::fuzzing::partitions(data);
});
