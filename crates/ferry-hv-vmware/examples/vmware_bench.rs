//! Benchmark (run by `tests/bench/vmware.sh`): the vSphere driver's inventory of 1,000 VMs from
//! govmomi's vcsim, and the per-disk QueryChangedDiskAreas time (paged to the capacity) against
//! `ferry sim vmware`, each beside pyvmomi doing the same calls in the same run. Prints one table.
//!
//! `cargo run --release -p ferry-hv-vmware --example vmware_bench -- [VMS] [DISK_MIB]`

use ferry_core::Secret;
use ferry_hv_vmware::model::VM_PATHS;
use ferry_hv_vmware::{MoRef, VimClient};
use ferry_sim::vmware::{BLOCK, VmwareSim, VmwareSimConfig};
use std::process::Command;
use std::time::Instant;

fn opts(fp: &str) -> ferry_http::ClientOptions {
    let mut o = ferry_http::ClientOptions::new(
        "bench",
        ferry_tls::Trust::Fingerprint(ferry_tls::parse_fingerprint(fp).unwrap()),
    );
    o.proxy = ferry_http::ProxySetting::Off;
    o
}

fn host_port(url: &str) -> (String, String) {
    let hp = url.trim_start_matches("https://").trim_end_matches("/sdk");
    let (h, p) = hp.rsplit_once(':').unwrap();
    (h.into(), p.into())
}

fn python(args: &[&str]) -> f64 {
    let py = ferry_testkit::peers_dir().join("venv/bin/python");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/vmware_bench.py");
    let out = Command::new(py).arg(script).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["seconds"].as_f64().unwrap()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let vms: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let disk_mib: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1024);

    // Inventory: vcsim's two resource pools get VMS/2 VMs each.
    let t = Instant::now();
    let sim = ferry_testkit::Vcsim::start_with(&["-vm", &(vms / 2).to_string()]);
    let boot = t.elapsed();
    let c = VimClient::connect(
        sim.url(),
        &opts(sim.tls_fingerprint()),
        "user",
        &Secret::new("pass"),
    )
    .await
    .unwrap();
    let mut ours = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let got = c
            .retrieve_all("VirtualMachine", VM_PATHS, 500)
            .await
            .unwrap();
        ours.push(t.elapsed().as_secs_f64());
        assert_eq!(got.len() as u32, vms / 2 * 2);
    }
    let (h, p) = host_port(sim.url());
    let theirs: Vec<f64> = (0..3).map(|_| python(&["inventory", &h, &p])).collect();
    let best = |v: &[f64]| v.iter().cloned().fold(f64::MAX, f64::min);
    println!("| case | ferry | pyvmomi (same run) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| inventory of {} VMs, 12 properties incl. devices, pages of 500 (vcsim started in {:.1} s) | {:.3} s | {:.3} s | {:.2}× |",
        vms / 2 * 2,
        boot.as_secs_f64(),
        best(&ours),
        best(&theirs),
        best(&theirs) / best(&ours)
    );
    drop(c);
    drop(sim);

    // CBT: one disk of DISK_MIB, 1,000 scattered guest writes, 64 MiB windows.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = VmwareSimConfig::new(dir.path());
    cfg.vcsim = ferry_testkit::tool("vcsim");
    cfg.disk_mib = disk_mib;
    cfg.cbt_page = 64 << 20;
    let vs = VmwareSim::start(cfg).await.unwrap();
    let c = VimClient::connect(
        vs.url(),
        &opts(vs.tls_fingerprint()),
        "user",
        &Secret::new("pass"),
    )
    .await
    .unwrap();
    let (vm, key, cap, _) = vs
        .disks()
        .await
        .into_iter()
        .find(|d| d.2 == disk_mib << 20)
        .unwrap();
    let vmref = MoRef::new("VirtualMachine", &vm);
    c.set_change_tracking(&vmref, true).await.unwrap();
    let s1 = c
        .create_snapshot(&vmref, "bench-1", "", false)
        .await
        .unwrap();
    let dev = c
        .retrieve_one(&s1, &["config.hardware.device"])
        .await
        .unwrap();
    let (disks, _) =
        ferry_hv_vmware::model::parse_devices(dev.prop("config.hardware.device").unwrap());
    let cid = disks
        .iter()
        .find(|d| d.device_key as i64 == key)
        .unwrap()
        .change_id
        .clone()
        .unwrap();
    let blocks = cap / BLOCK;
    for i in 0..1000u64 {
        let b = (i * 7919) % blocks;
        vs.guest_write(&vm, key, b * BLOCK, b"x").await.unwrap();
    }
    let s2 = c
        .create_snapshot(&vmref, "bench-2", "", false)
        .await
        .unwrap();
    let mut ours = Vec::new();
    let mut areas = 0;
    for _ in 0..5 {
        let t = Instant::now();
        areas = c
            .query_changed_disk_areas(&vmref, &s2, key as i32, cap, &cid)
            .await
            .unwrap()
            .len();
        ours.push(t.elapsed().as_secs_f64());
    }
    let (h, p) = host_port(vs.url());
    let theirs: Vec<f64> = (0..5)
        .map(|_| {
            python(&[
                "cbt",
                &h,
                &p,
                &vm,
                &s2.value,
                &key.to_string(),
                &cap.to_string(),
                &cid,
            ])
        })
        .collect();
    println!(
        "| QueryChangedDiskAreas of a {disk_mib} MiB disk since the last changeId, {} windows of 64 MiB, {areas} areas | {:.1} ms | {:.1} ms | {:.2}× |",
        cap.div_ceil(64 << 20),
        best(&ours) * 1e3,
        best(&theirs) * 1e3,
        best(&theirs) / best(&ours)
    );
}
