//! Fidelity: pyvmomi (VMware's Python SDK) drives `ferry sim vmware` — login, ContainerView
//! inventory, ReconfigVM_Task (CBT), CreateSnapshot_Task with task polling, changeIds in the
//! snapshot's disk backings, QueryChangedDiskAreas paged by startOffset, FileFault for a
//! changeId the simulator never issued.

use ferry_sim::vmware::{BLOCK, VmwareSim, VmwareSimConfig};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyvmomi_accepts_the_simulator() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = VmwareSimConfig::new(dir.path());
    cfg.vcsim = ferry_testkit::tool("vcsim");
    cfg.disk_mib = 16;
    cfg.cbt_page = 4 << 20;
    let sim = VmwareSim::start(cfg).await.unwrap();
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "peer `python` (venv) not found: run tests/peers/install.sh"
    );
    let url = url_parts(sim.url());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vmware_sdk.py");
    let mut child = Command::new(&python)
        .args([script, &url.0, &url.1, sim.username(), sim.password()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let Some(rest) = line.trim().strip_prefix("WRITE ") else {
        let o = child.wait_with_output().unwrap();
        panic!(
            "script failed before WRITE: {line}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let parts: Vec<&str> = rest.split(' ').collect();
    let (vm, key, cap): (&str, i64, u64) = (
        parts[0],
        parts[1].parse().unwrap(),
        parts[2].parse().unwrap(),
    );
    assert_eq!(cap, 16 << 20);
    // Blocks 3, 80 and 81 (a write straddling two blocks); 80 lies in the second 4 MiB window.
    sim.guest_write(vm, key, 3 * BLOCK + 100, b"hello")
        .await
        .unwrap();
    sim.guest_write(vm, key, 81 * BLOCK - 6, b"straddling")
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
    assert_ne!(v["cid1"], v["cid2"], "a snapshot advances the changeId");
    assert_eq!(
        v["since"],
        serde_json::json!([[3 * BLOCK, BLOCK], [80 * BLOCK, 2 * BLOCK]]),
        "{v}"
    );
    // 16 MiB in 4 MiB windows: 4 calls each, whatever the answer holds.
    assert_eq!(v["since_calls"], 4);
    assert_eq!(v["all_calls"], 4);
    // `*`: the seeded boot sector, data block and log text (near the end), nothing else.
    let all: Vec<(u64, u64)> = serde_json::from_value(v["all"].clone()).unwrap();
    assert_eq!(all.first(), Some(&(0, 2 * BLOCK)), "{all:?}");
    assert!(all.iter().map(|a| a.1).sum::<u64>() <= 4 * BLOCK, "{all:?}");
    assert_eq!(v["fault"], "vim.fault.FileFault");
    assert!(sim.qcda_calls().await >= 9);
}

fn url_parts(u: &str) -> (String, String) {
    let hostport = u.trim_start_matches("https://").trim_end_matches("/sdk");
    let (h, p) = hostport.rsplit_once(':').unwrap();
    (h.to_string(), p.to_string())
}
