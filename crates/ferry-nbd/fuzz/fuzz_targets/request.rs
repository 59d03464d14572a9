//! The server's request decoder and request checks on arbitrary client bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ferry_nbd::fuzzing::decode_request_stream(data);
});
