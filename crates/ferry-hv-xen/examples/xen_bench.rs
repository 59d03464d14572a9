//! Benchmark (run by `tests/bench/xen.sh`): full read of a seeded VM's disks through each
//! transport against the XenAPI simulator, beside `qemu-img convert` reading the same snapshot
//! VHD (the reference). Prints one table.
//!
//! `cargo run --release -p ferry-hv-xen --example xen_bench -- [DISK_MIB]`

use ferry_core::BlockSource;
use ferry_hv::{BackupOptions, FerryConfig, HypervisorDriver, Outcome};
use ferry_hv_xen::XenDriver;
use ferry_sim::xen::{Value, XenSim, XenSimConfig};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const READ: usize = 4 << 20;

async fn read_source(src: Arc<dyn BlockSource>) -> u64 {
    let size = src.size();
    let alloc = src.allocated(0..size).await.unwrap();
    let ranges: Vec<(u64, u64)> = alloc
        .iter()
        .flat_map(|e| {
            (e.offset..e.end())
                .step_by(READ)
                .map(move |o| (o, (e.end() - o).min(READ as u64)))
        })
        .collect();
    let sem = Arc::new(tokio::sync::Semaphore::new(4));
    let mut tasks = Vec::new();
    for (o, l) in ranges {
        let (src, sem) = (src.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let mut b = vec![0u8; l as usize];
            src.read_at(o, &mut b).await.unwrap();
            l
        }));
    }
    let mut n = 0;
    for t in tasks {
        n += t.await.unwrap();
    }
    n
}

#[tokio::main]
async fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = XenSimConfig::new(dir.path().join("sim"));
    cfg.disk_mib = mib;
    let sim = XenSim::start(cfg).await.unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, sim.password()).unwrap();
    let mut san = String::new();
    for sr in sim.all("SR").await.unwrap() {
        let u = sim.field("SR", &sr, "uuid").await.unwrap();
        san.push_str(&format!("\"{u}\" = \"{}\"\n", sim.dir().join(&u).display()));
    }
    println!(
        "{:<10} {:>10} {:>10} {:>12} {:>8}",
        "transport", "bytes", "seconds", "MiB/s", "vs qemu-img"
    );
    let mut reference = None;
    for mode in ["san", "hotadd", "network"] {
        let text = format!(
            "[sources.b]\nkind = \"xen\"\nurl = \"{}\"\nusername = \"root\"\npassword-file = \"{}\"\ntls-fingerprint = \"{}\"\ntransports = [\"{mode}\"]\nproxy-vm = \"ferry-proxy\"\nhotadd-device-dir = \"{}\"\nstate-dir = \"{}\"\n[sources.b.san-paths]\n{san}",
            sim.url(),
            pw.display(),
            sim.tls_fingerprint(),
            sim.dir().join("dev").display(),
            dir.path().join("state").display()
        );
        let cfg = FerryConfig::parse(&text, Path::new("bench.toml")).unwrap();
        let d = XenDriver::connect("b", cfg.source("b").unwrap())
            .await
            .unwrap();
        let s = d
            .begin_backup("debian-web", &BackupOptions::default(), None)
            .await
            .unwrap();
        if reference.is_none() {
            // qemu-img converting the same snapshot VHDs to a sparse raw file (it must write somewhere).
            let sess = sim.login().await.unwrap();
            let t = Instant::now();
            for disk in s.disks() {
                let r = sim
                    .call(
                        "VDI.get_by_uuid",
                        vec![Value::s(&sess), Value::s(&disk.token.0)],
                    )
                    .await
                    .unwrap();
                let f = sim.vdi_file(r.as_str().unwrap()).await.unwrap().unwrap();
                let st = std::process::Command::new("qemu-img")
                    .args(["convert", "-f", "vpc", "-O", "raw"])
                    .arg(&f)
                    .arg(dir.path().join("ref.raw"))
                    .status()
                    .unwrap();
                assert!(st.success());
            }
            reference = Some(t.elapsed().as_secs_f64());
        }
        let t = Instant::now();
        let mut n = 0;
        for disk in s.disks() {
            n += read_source(disk.source.clone()).await;
        }
        let secs = t.elapsed().as_secs_f64();
        let r = reference.unwrap_or(secs);
        println!(
            "{mode:<10} {n:>10} {secs:>10.3} {:>12.1} {:>8.2}x",
            n as f64 / secs / 1048576.0,
            r / secs
        );
        s.finish(Outcome::Aborted).await.unwrap();
        d.close().await;
    }
    println!("qemu-img   (reference)  {:.3} s", reference.unwrap_or(0.0));
    raw_transfers(&sim, dir.path(), mib).await;
}

/// Peak RSS of this process (MiB) since the last reset.
fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        >> 10
}

/// Raw VDI import and export of a `mib`×8 MiB disk (a quarter data) through Ferry's XenAPI
/// client, beside curl moving the same bytes to and from the same simulator.
async fn raw_transfers(sim: &XenSim, dir: &Path, mib: u64) {
    use std::os::unix::fs::FileExt;
    let size = (mib * 8) << 20;
    let raw = dir.join("raw-src.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(size).unwrap();
    let quarter: Vec<u8> = (0..size / 4)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    f.write_all_at(&quarter, size / 2).unwrap();
    drop((f, quarter)); // out of the peak-RSS measurement
    let mut http = ferry_http::ClientOptions::new(
        "b",
        ferry_tls::Trust::Fingerprint(ferry_tls::parse_fingerprint(sim.tls_fingerprint()).unwrap()),
    );
    http.proxy = ferry_http::ProxySetting::Off;
    let c = ferry_hv_xen::client::XenClient::login(
        sim.url(),
        sim.username(),
        &ferry_core::Secret::new(sim.password()),
        &http,
    )
    .await
    .unwrap();
    let sr = c.call("SR.get_all", vec![]).await.unwrap()[0]
        .as_str()
        .unwrap()
        .to_string();
    let vdi = c
        .call_str(
            "VDI.create",
            vec![serde_json::json!({"SR": sr, "name_label": "bench", "virtual_size": size.to_string(),
                "type": "user", "sharable": false, "read_only": false, "other_config": {},
                "xenstore_data": {}, "sm_config": {}, "tags": []})],
        )
        .await
        .unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, sim.cert_pem()).unwrap();
    let q = format!("session_id={}&vdi={vdi}&format=raw", c.session().await);
    let curl = |args: &[&str]| {
        let t = Instant::now();
        let st = std::process::Command::new("curl")
            .args(["-sS", "--fail", "--http1.1", "--cacert"])
            .arg(&ca)
            .args(args)
            .status()
            .unwrap();
        assert!(st.success());
        t.elapsed().as_secs_f64()
    };
    let gib = size as f64 / 1048576.0;
    let src = ferry_image::FileSource::open(&raw).unwrap();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let t = Instant::now();
    c.import_raw(&vdi, &src).await.unwrap();
    let ferry_import = t.elapsed().as_secs_f64();
    let import_rss = peak_rss_mib();
    let curl_import = curl(&[
        "--upload-file",
        raw.to_str().unwrap(),
        &format!("{}/import_raw_vdi?{q}", sim.url()),
    ]);
    let out = dir.join("raw-out.raw");
    let dst = ferry_image::FileTarget::create(&out, size).unwrap();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let t = Instant::now();
    c.export_raw(&vdi, &dst).await.unwrap();
    let ferry_export = t.elapsed().as_secs_f64();
    let export_rss = peak_rss_mib();
    let curl_out = dir.join("raw-curl.raw");
    let curl_export = curl(&[
        "-o",
        curl_out.to_str().unwrap(),
        &format!("{}/export_raw_vdi?{q}", sim.url()),
    ]);
    c.logout().await;
    println!();
    println!(
        "raw VDI transfer of {gib:.0} MiB (simulator and client in this process; curl beside it)"
    );
    println!(
        "import_raw_vdi  ferry {ferry_import:.2} s ({:.0} MiB/s, peak RSS {import_rss} MiB)  curl {curl_import:.2} s  ratio {:.2}x",
        gib / ferry_import,
        curl_import / ferry_import
    );
    println!(
        "export_raw_vdi  ferry {ferry_export:.2} s ({:.0} MiB/s, peak RSS {export_rss} MiB)  curl {curl_export:.2} s  ratio {:.2}x",
        gib / ferry_export,
        curl_export / ferry_export
    );
}
