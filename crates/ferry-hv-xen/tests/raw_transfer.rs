//! Raw VDI transfers stream: a 3 GiB `import_raw_vdi` and `export_raw_vdi` through the XenAPI
//! client and the simulator (both on Ferry's HTTP stack, in this one process) keep the process's
//! peak RSS flat, and the bytes come back identical (`qemu-img compare`). A test binary of its
//! own, so no other test's memory counts.

use ferry_core::BlockSource;
use ferry_http::{ClientOptions, ProxySetting};
use ferry_hv_xen::client::XenClient;
use ferry_image::{FileSource, FileTarget};
use ferry_sim::xen::{XenSim, XenSimConfig};
use serde_json::json;
use std::os::unix::fs::FileExt;
use std::time::Instant;

const SIZE: u64 = 3 << 30;

/// Peak resident set size of this process since the last [`reset_peak`], in MiB.
fn peak_rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kib >> 10
}

fn reset_peak() {
    // Writing 5 resets VmHWM to the current RSS (Linux 4.0+).
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_gib_import_and_export_keep_rss_flat() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = XenSimConfig::new(dir.path().join("sim"));
    cfg.seed = false;
    let sim = XenSim::start(cfg).await.unwrap();

    // A 3 GiB disk: 96 MiB of data in three places, holes elsewhere.
    let disk = dir.path().join("disk.raw");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(SIZE).unwrap();
    for (i, at) in [0u64, 1 << 30, (5 << 30) / 2].into_iter().enumerate() {
        let data: Vec<u8> = (0..32u64 << 20)
            .map(|j| (j.wrapping_mul(2654435761) >> (i + 7)) as u8)
            .collect();
        f.write_all_at(&data, at).unwrap();
    }
    drop(f);

    let mut http = ClientOptions::new(
        "lab",
        ferry_tls::Trust::Fingerprint(ferry_tls::parse_fingerprint(sim.tls_fingerprint()).unwrap()),
    );
    http.proxy = ProxySetting::Off;
    let password = ferry_core::Secret::new(sim.password());
    let client = XenClient::login(sim.url(), sim.username(), &password, &http)
        .await
        .unwrap();
    let sr = client
        .call("SR.get_all", vec![])
        .await
        .unwrap()
        .as_array()
        .unwrap()[0]
        .as_str()
        .unwrap()
        .to_string();
    let vdi = client
        .call_str(
            "VDI.create",
            vec![
                json!({"SR": sr, "name_label": "big", "virtual_size": SIZE.to_string(),
                "type": "user", "sharable": false, "read_only": false, "other_config": {},
                "xenstore_data": {}, "sm_config": {}, "tags": []}),
            ],
        )
        .await
        .unwrap();

    let src = FileSource::open(&disk).unwrap();
    assert_eq!(src.size(), SIZE);
    reset_peak();
    let base = peak_rss_mib();
    let t = Instant::now();
    client.import_raw(&vdi, &src).await.unwrap();
    let import_s = t.elapsed().as_secs_f64();
    let import_peak = peak_rss_mib();

    let out = dir.path().join("out.raw");
    let dst = FileTarget::create(&out, SIZE).unwrap();
    reset_peak();
    let t = Instant::now();
    let got = client.export_raw(&vdi, &dst).await.unwrap();
    let export_s = t.elapsed().as_secs_f64();
    let export_peak = peak_rss_mib();
    client.logout().await;

    let mib = (SIZE >> 20) as f64;
    eprintln!(
        "3 GiB import: {import_s:.2} s ({:.0} MiB/s), peak RSS {base} -> {import_peak} MiB; export: {export_s:.2} s ({:.0} MiB/s), peak {export_peak} MiB",
        mib / import_s,
        mib / export_s
    );
    assert_eq!(got, SIZE);
    // Flat: a few transfer pieces, TLS and socket buffers — nothing proportional to 3 GiB.
    assert!(
        import_peak < base + 64,
        "import grew the peak RSS from {base} to {import_peak} MiB"
    );
    assert!(
        export_peak < base + 64,
        "export grew the peak RSS from {base} to {export_peak} MiB"
    );
    ferry_testkit::qemu_img_compare(&disk, "raw", &out, "raw");
    // The export wrote zeros as holes: the copy is as sparse as the source.
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&out).unwrap().blocks() * 512
    };
    assert!(allocated < 200 << 20, "export allocated {allocated} bytes");
}
