//! The SAN reader's NTFS run-list decoder (file lookup, $DATA, $ATTRIBUTE_LIST, data runs).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_fs::fuzzing::ntfs_layout(data);
});
