//! `ferry demo` — the README's first command — runs green: a full backup and a CBT incremental
//! of a VM through the Xen driver and the in-tree simulator (NBD with TLS), restores identical
//! to the disks at snapshot time, a whole-VM restore into the pool, nothing left behind.

use std::process::Command;

#[test]
fn demo_runs_green() {
    let dir = ferry_testkit::scratch_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "demo",
            "--size-mib",
            "64",
            "--dir",
            dir.path().to_str().unwrap(),
        ])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "--- stdout\n{stdout}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    assert_eq!(
        stdout
            .matches("identical to the disks at snapshot time")
            .count(),
        2,
        "{stdout}"
    );
    assert!(
        stdout.contains("disks identical to the VM at snapshot time"),
        "{stdout}"
    );
    assert!(stdout.contains("incremental (CBT)"), "{stdout}");
    assert!(stdout.contains(", 0 mismatch(es)"), "{stdout}");
    assert!(
        stdout.contains("left on the pool: 0 snapshot VM(s), 2 CBT anchor(s) without data, 0 snapshot disk(s) with data, 0 VBD(s) on the proxy, 0 task(s)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("CBT (VDI.list_changed_blocks) reported"),
        "{stdout}"
    );
    // The numbered steps are the story: no log lines or Rust debug dumps around them.
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [" INFO ", "DEBUG", "StatsSnapshot", "Some(", " { "] {
        assert!(
            !stderr.contains(needle) && !stdout.contains(needle),
            "`{needle}` in the demo's output"
        );
    }
    assert!(stdout.starts_with("1. repository "), "{stdout}");
}
