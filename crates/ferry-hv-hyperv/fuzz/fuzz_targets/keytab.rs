#![no_main]
//! The MIT keytab reader (a keytab file is input the appliance reads from disk) never panics, and
//! every entry it accepts is well-formed.

use ferry_wsman::kerberos::parse_keytab;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = parse_keytab(data) {
        for e in &entries {
            assert!(!e.principal().is_empty());
        }
    }
});
