//! The keytab reader (also a cargo-fuzz target, `keytab` in ferry-hv-hyperv/fuzz) on random and
//! mutated input: never a panic; a well-formed file reads back exactly.

use ferry_wsman::kerberos::parse_keytab;
use proptest::prelude::*;

/// One MIT keytab (format 0x502) with one entry.
fn keytab(components: &[String], realm: &str, kvno: u32, enctype: u16, key: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(&(components.len() as u16).to_be_bytes());
    for s in std::iter::once(realm).chain(components.iter().map(String::as_str)) {
        e.extend_from_slice(&(s.len() as u16).to_be_bytes());
        e.extend_from_slice(s.as_bytes());
    }
    e.extend_from_slice(&1u32.to_be_bytes()); // name type: principal
    e.extend_from_slice(&0u32.to_be_bytes()); // timestamp
    e.push(kvno as u8);
    e.extend_from_slice(&enctype.to_be_bytes());
    e.extend_from_slice(&(key.len() as u16).to_be_bytes());
    e.extend_from_slice(key);
    e.extend_from_slice(&kvno.to_be_bytes());
    let mut kt = vec![5, 2];
    kt.extend_from_slice(&(e.len() as i32).to_be_bytes());
    kt.extend_from_slice(&e);
    kt
}

proptest! {
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_keytab(&data);
    }

    #[test]
    fn a_written_entry_reads_back_and_mutations_never_panic(
        components in proptest::collection::vec("[A-Za-z0-9.]{1,12}", 1..3),
        realm in "[A-Z.]{1,16}",
        kvno in 1u32..200,
        key in proptest::collection::vec(any::<u8>(), 16..33),
        at in any::<usize>(),
        byte in any::<u8>(),
        cut in any::<usize>(),
    ) {
        let kt = keytab(&components, &realm, kvno, 18, &key);
        let got = parse_keytab(&kt).expect("a well-formed keytab reads");
        prop_assert_eq!(got.len(), 1);
        prop_assert_eq!(&got[0].components, &components);
        prop_assert_eq!(&got[0].realm, &realm);
        prop_assert_eq!((got[0].kvno, got[0].enctype), (kvno, 18));
        prop_assert_eq!(&got[0].key, &key);
        let mut m = kt.clone();
        let i = at % m.len();
        m[i] = byte;
        let _ = parse_keytab(&m);
        let _ = parse_keytab(&kt[..cut % (kt.len() + 1)]);
    }
}
