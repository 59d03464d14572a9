//! `ferry demo` — the README's first command — runs green: full backup and dirty-bitmap
//! incremental over qemu-nbd, restores identical to the disk at backup time.

use std::process::Command;

#[test]
fn demo_runs_green() {
    // The demo finds qemu-img/qemu-nbd/qemu-io itself; fail loudly here if they are missing.
    for t in ["qemu-img", "qemu-nbd", "qemu-io"] {
        ferry_testkit::tool(t);
    }
    let dir = ferry_testkit::scratch_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "demo",
            "--size-mib",
            "256",
            "--dir",
            dir.path().to_str().unwrap(),
        ])
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
            .matches("identical to the disk at backup time")
            .count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("incremental (dirty bitmap)"), "{stdout}");
    assert!(stdout.contains("0 mismatch"), "{stdout}");
}
