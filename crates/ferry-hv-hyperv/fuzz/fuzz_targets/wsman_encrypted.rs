#![no_main]
//! The decoder of WinRM's encrypted `multipart/encrypted` bodies never panics, and what it
//! accepts re-encodes to a body that decodes to the same parts.

use ferry_wsman::sealed;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(parts) = sealed::decode(data) {
        for p in &parts {
            let again = sealed::encode(p.protocol, p.original_length, p.signature, p.sealed);
            let q = sealed::decode(&again).expect("an encoded part decodes");
            assert_eq!(q.len(), 1);
            assert_eq!((q[0].signature, q[0].sealed), (p.signature, p.sealed));
        }
    }
});
