//! The encrypted-body decoder (also a cargo-fuzz target, `wsman_encrypted`) on random and
//! mutated input: never a panic, and what it accepts re-encodes to the same parts.

use ferry_wsman::sealed::{PROTOCOL_SPNEGO, decode, encode};
use proptest::prelude::*;

fn check(data: &[u8]) {
    if let Ok(parts) = decode(data) {
        for p in &parts {
            let again = encode(p.protocol, p.original_length, p.signature, p.sealed);
            let q = decode(&again).unwrap();
            assert_eq!((q[0].signature, q[0].sealed), (p.signature, p.sealed));
        }
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
        check(&data);
    }

    #[test]
    fn mutated_bodies_never_panic(
        sig in proptest::collection::vec(any::<u8>(), 0..40),
        sealed in proptest::collection::vec(any::<u8>(), 0..200),
        at in any::<usize>(),
        byte in any::<u8>(),
        cut in any::<usize>(),
    ) {
        let mut body = encode(PROTOCOL_SPNEGO, sealed.len(), &sig, &sealed);
        let n = body.len();
        body[at % n] = byte;
        body.truncate(n - cut % 8);
        check(&body);
        let clean = encode(PROTOCOL_SPNEGO, sealed.len(), &sig, &sealed);
        let p = decode(&clean).unwrap();
        prop_assert_eq!(p[0].signature, &sig[..]);
        // The payload runs to the boundary, so a payload holding one is cut there.
        prop_assert!(sealed.starts_with(p[0].sealed));
    }
}
