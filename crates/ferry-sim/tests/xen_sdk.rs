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
    // Keep-alive: the SDK's XML-RPC transport makes dozens of calls on one connection; only the
    // script's two urllib JSON-RPC calls (which close) open connections of their own.
    let conns = sim.http_connections();
    assert!(
        (1..=4).contains(&conns),
        "{conns} connections for the whole SDK session"
    );
}

/// `curl --upload-file -` of `data` to `url`, trusting `ca`; its output.
fn upload(ca: &std::path::Path, url: &str, data: &[u8], chunked: bool) -> std::process::Output {
    let mut up = curl();
    up.arg("--cacert").arg(ca);
    if chunked {
        up.args(["-H", "Transfer-Encoding: chunked"]);
    }
    let mut child = up
        .args(["--upload-file", "-", url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(data); // the server may stop reading early
    drop(stdin);
    child.wait_with_output().unwrap()
}

fn curl() -> Command {
    let mut c = Command::new(ferry_testkit::tool("curl"));
    c.args(["--silent", "--show-error", "--fail-with-body", "--http1.1"]);
    c
}

/// curl, as an operator would script it: a keep-alive sequence of JSON-RPC calls on one
/// connection, a chunked `import_raw_vdi` upload, and the refusals of a bad upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_keeps_alive_and_uploads_chunked() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = XenSimConfig::new(dir.path().join("sim"));
    cfg.disk_mib = 8;
    let sim = XenSim::start(cfg).await.unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, sim.cert_pem()).unwrap();
    let session = sim.login().await.unwrap();
    let vm = sim.vm("debian-web").await.unwrap();
    let vdi = sim.vm_disks(&vm).await.unwrap()[0].clone();
    let before = sim.http_connections();

    // Five calls in one curl run: one TLS connection, reused.
    let mut c = curl();
    c.arg("--cacert").arg(&ca);
    for (i, method) in [
        "VM.get_all",
        "SR.get_all",
        "VM.get_power_state",
        "VDI.get_virtual_size",
        "VM.get_name_label",
    ]
    .iter()
    .enumerate()
    {
        let params = match i {
            0 | 1 => serde_json::json!([session]),
            3 => serde_json::json!([session, vdi]),
            _ => serde_json::json!([session, vm]),
        };
        if i > 0 {
            c.arg("--next").arg("--cacert").arg(&ca);
        }
        c.args(["-H", "Content-Type: application/json", "--data"])
            .arg(
                serde_json::json!({"jsonrpc": "2.0", "method": method, "params": params, "id": i})
                    .to_string(),
            )
            .arg(format!("{}/jsonrpc", sim.url()));
    }
    let out = ferry_testkit::run_ok(&mut c);
    let answers: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&out)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(answers.len(), 5, "{answers:?}");
    assert_eq!(answers[2]["result"], "Running");
    assert_eq!(answers[3]["result"], 8 << 20);
    assert_eq!(answers[4]["result"], "debian-web");
    assert_eq!(
        sim.http_connections() - before,
        1,
        "five calls, one connection"
    );

    // A chunked upload of 3 MiB + 5 bytes (curl sends stdin chunked: its length is unknown).
    let data: Vec<u8> = (0..(3u32 << 20) + 5).map(|i| (i % 251) as u8 | 1).collect();
    let target = format!(
        "{}/import_raw_vdi?session_id={session}&vdi={vdi}&format=raw",
        sim.url()
    );
    let o = upload(&ca, &target, &data, true);
    assert!(
        o.status.success(),
        "upload: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let disk = sim.read_vdi(&vdi).await.unwrap();
    assert_eq!(
        disk[..data.len()],
        data[..],
        "the uploaded bytes are in the VDI"
    );

    // Larger than the VDI, chunked: refused with XenAPI's error, and nothing past the end.
    let big = vec![7u8; (9 << 20) as usize];
    let o = upload(&ca, &target, &big, true);
    assert!(!o.status.success(), "an oversize upload must fail");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("VDI_TOO_SMALL"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    // A wrong session is refused before any byte is written.
    let bad = target.replace(&session, "OpaqueRef:nope");
    let o = upload(&ca, &bad, b"hello", false);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("SESSION_INVALID"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}
