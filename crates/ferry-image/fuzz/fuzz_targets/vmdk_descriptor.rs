//! The VMDK text descriptor parser.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_image::fuzzing::parse_vmdk_descriptor(&String::from_utf8_lossy(data));
});
