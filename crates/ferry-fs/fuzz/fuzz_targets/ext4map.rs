//! The ext4 block mapper used for swap files, and the swap header and fstab decoders.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_fs::fuzzing::ext4map(data);
});
