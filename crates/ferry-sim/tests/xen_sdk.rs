//! Fidelity: the official Python XenAPI SDK drives the simulator (login, inventory, snapshots,
//! tasks, CBT bitmaps, NBD info, data_destroy, JSON-RPC) and finds the documented shapes.

use ferry_sim::xen::{XenSim, XenSimConfig};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_accepts_the_simulator() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = XenSimConfig::new(dir.path());
    cfg.disk_mib = 16;
    let sim = XenSim::start(cfg).await.unwrap();
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "peer `python` (venv) not found: run tests/peers/install.sh"
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/xen_sdk.py");
    let mut child = Command::new(&python)
        .args([script, sim.url(), sim.username(), sim.password()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let Some(vdi) = line.trim().strip_prefix("WRITE ") else {
        let o = child.wait_with_output().unwrap();
        panic!(
            "script failed before WRITE: {line}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    // The guest writes into blocks 3, 80 and 81 (the second write straddles two blocks).
    sim.guest_write(vdi, 3 * 65536 + 100, b"hello")
        .await
        .unwrap();
    sim.guest_write(vdi, 81 * 65536 - 6, b"straddling")
        .await
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"GO\n").unwrap();
    drop(stdin);
    let mut last = String::new();
    out.read_line(&mut last).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "script failed: {last}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(v["changed_blocks"], serde_json::json!([3, 80, 81]));
    assert_eq!(v["size"], 16 << 20);
    assert!(sim.sessions().await.is_empty(), "the SDK logged out");
}
