#![no_main]
//! Decoders of XenAPI answers (CBT bitmap, NBD certificate PEM, task results) never panic.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().unwrap()) % (1 << 40);
    let rest = &data[8..];
    if let Ok(m) = ferry_hv_xen::cbt::decode(rest, size) {
        assert!(m.iter().all(|e| e.end() <= size));
    }
    if let Ok(s) = std::str::from_utf8(rest) {
        let _ = ferry_hv_xen::cbt::pem_fingerprint(s);
        let _ = ferry_hv_xen::client::unwrap_value(s);
    }
});
