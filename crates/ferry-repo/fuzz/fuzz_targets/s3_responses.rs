//! The parsers of S3 Object Lock answers (untrusted: whatever the endpoint sends).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ferry_repo::fuzz::s3_responses(data);
});
