#![no_main]
//! The simulator's XML-RPC decoder must refuse any input with an error, never panic or
//! allocate beyond the input.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = ferry_sim::xen::value::decode_call(s);
        let _ = ferry_sim::xen::value::decode_value(s);
    }
});
