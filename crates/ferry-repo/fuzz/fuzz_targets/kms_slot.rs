//! The KMS key slot decoder and the KMS error-body parser (ADR 0182).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_repo::kms::fuzz(data);
});
