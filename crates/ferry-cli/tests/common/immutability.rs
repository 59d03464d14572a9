//! What the immutability tests share (immutable.rs on S3 Object Lock, hardened.rs on the inode
//! flag): the `ferry` binary with an environment, its JSON answers, disks whose versions share
//! half their chunks, and dates.
#![allow(dead_code)]

use std::path::Path;
use std::process::Output;

/// Runs `ferry` with `env` (and no inherited log level or password).
pub fn ferry(args: &[&str], env: &[(String, String)]) -> Output {
    ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, env)
}

/// Runs `ferry`, fails the test unless it succeeds; returns its stdout.
pub fn ferry_ok(args: &[&str], env: &[(String, String)]) -> String {
    let out = ferry(args, env);
    assert!(
        out.status.success(),
        "ferry {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `ferry … --json` and parses its answer.
pub fn ferry_json(args: &[&str], env: &[(String, String)]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = ferry_ok(&a, env);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ferry {args:?}: not JSON ({e}): {out}"))
}

/// A 4 MiB disk: 2 MiB shared by every version, 2 MiB unique to `seed`.
pub fn make_disk(path: &Path, seed: u64) {
    let mut data = ferry_testkit::noise(2 << 20, 100);
    data.extend(ferry_testkit::noise(2 << 20, seed));
    std::fs::write(path, data).unwrap();
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Unix seconds of an RFC 3339 date from ferry's JSON.
pub fn unix(rfc3339: &str) -> i64 {
    ferry_repo::immutable::parse_date(rfc3339)
        .unwrap_or_else(|| panic!("`{rfc3339}`: not RFC 3339"))
}
