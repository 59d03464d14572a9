//! The QMP line parser of boot verification (what qemu sends on its monitor socket).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_engine::boot::qmp::parse(data);
});
