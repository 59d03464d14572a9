//! Every sealed-object decoder (chunk, index, manifest, catalog) with encrypted and MAC keys,
//! plus the config, key-slot and lease parsers.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_repo::fuzz::decode_all(data);
});
