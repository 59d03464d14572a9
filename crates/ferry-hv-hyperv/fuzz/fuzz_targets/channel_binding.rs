#![no_main]
//! The channel-binding readers (ADR 0172) never panic: the NTLM AUTHENTICATE reader the
//! simulator's strict mode uses on what a client sends, and the certificate reader on what a
//! server presents. A binding found is 16 bytes, not all zero; a certificate binding starts
//! with `tls-server-end-point:`.

use ferry_wsman::cbt;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = cbt::authenticate_bindings(data) {
        assert_ne!(h, [0; 16]);
    }
    if let Ok(b) = cbt::tls_server_end_point(data) {
        assert!(b.starts_with(cbt::TLS_SERVER_END_POINT));
    }
});
