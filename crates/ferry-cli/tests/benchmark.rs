//! `ferry benchmark` through the binary: generated data, samples read from an image file that
//! qemu-img wrote and from qemu-nbd, storage rates of local, S3 (moto) and Azure (Azurite)
//! repositories, and clear errors for bad samples, options and targets.

use ferry_core::Secret;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use std::process::Output;

fn ferry(args: &[&str]) -> Output {
    ferry_env(args, &[])
}

fn ferry_env(args: &[&str], env: &[(String, String)]) -> Output {
    ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, env)
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "ferry failed");
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

fn rates_are_positive(v: &serde_json::Value) {
    let rates = v["one_core"].as_array().expect("one_core");
    assert_eq!(rates.len(), 6);
    for r in rates {
        let x = r["bytes_per_sec"].as_f64().expect("rate");
        assert!(x.is_finite() && x > 0.0, "{r}");
    }
    assert!(v["backup_all_cores"].as_f64().unwrap() > 0.0);
    assert!(v["restore_all_cores"].as_f64().unwrap() > 0.0);
}

#[test]
fn generated_sample_reports_rates_ratio_and_a_human_summary() {
    let out = ferry(&[
        "benchmark",
        "--sample-size",
        "4M",
        "--seconds",
        "0.05",
        "--json",
    ]);
    let v = json(&out);
    rates_are_positive(&v);
    assert_eq!(v["sample_bytes"], 4 << 20);
    assert_eq!(v["sample_chunks"], 4);
    assert_eq!(v["compression"], "lz4");
    assert_eq!(v["encrypted"], true);
    assert!(v["compression_ratio"].as_f64().unwrap() > 1.5, "{v}");

    let out = ferry(&[
        "benchmark",
        "--sample-size",
        "2M",
        "--chunk-size",
        "256K",
        "--compression",
        "zstd:3",
        "--threads",
        "3",
        "--seconds",
        "0.05",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "in 8 chunks of 256.0 KiB; zstd:3 encrypted",
        "compress",
        "3 threads:",
        "restore pipeline",
        "h per TiB",
    ] {
        assert!(text.contains(needle), "summary lacks {needle:?}");
    }
}

#[test]
fn image_sample_reads_only_its_non_zero_data() {
    let dir = ferry_testkit::scratch_dir();
    let raw = dir.path().join("disk.raw");
    let vhdx = dir.path().join("disk.vhdx");
    // 64 MiB, of which 3 MiB of incompressible data at 8 MiB and 1 MiB of written zeros.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&ferry_repo::testdata::incompressible(7, 3 << 20), 8 << 20)
            .unwrap();
        f.write_all_at(&vec![0u8; 1 << 20], 32 << 20).unwrap();
    }
    ferry_testkit::qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vhdx",
        raw.to_str().unwrap(),
        vhdx.to_str().unwrap(),
    ]);
    // The same disk over NBD: qemu-nbd's block status tells the holes apart.
    let nbd = ferry_testkit::QemuNbd::new(&raw).read_only(true).start();
    for sample in [
        raw.display().to_string(),
        vhdx.display().to_string(),
        nbd.uri(),
    ] {
        let out = ferry(&[
            "benchmark",
            "--sample",
            &sample,
            "--compression",
            "none",
            "--no-encryption",
            "--seconds",
            "0.05",
            "--json",
        ]);
        let v = json(&out);
        rates_are_positive(&v);
        assert_eq!(v["sample_bytes"], 3 << 20, "{sample}");
        assert_eq!(v["encrypted"], false);
        let ratio = v["compression_ratio"].as_f64().unwrap();
        assert!((0.99..=1.0).contains(&ratio), "ratio {ratio}");
        assert!(!v["sample"].as_str().unwrap().is_empty());
    }
}

#[test]
fn bad_samples_and_options_fail_clearly() {
    let dir = ferry_testkit::scratch_dir();
    let missing = dir.path().join("no-such-disk.raw");
    let out = ferry(&["benchmark", "--sample", missing.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-disk.raw"), "{err}");

    let holes = dir.path().join("holes.raw");
    std::fs::File::create(&holes)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let out = ferry(&["benchmark", "--sample", holes.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no non-zero data"));

    for (flag, value, needle) in [
        ("--compression", "zstd:99", "not a zstd level"),
        ("--compression", "brotli", "is not lz4, zstd"),
        ("--chunk-size", "3M", "power of two"),
        ("--seconds", "0", "positive"),
        ("--sample-size", "5G", "at most 4G"),
    ] {
        let out = ferry(&["benchmark", flag, value]);
        assert!(!out.status.success(), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{flag} {value}: {err}");
    }
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Runtime::new().unwrap().block_on(f)
}

/// Every object key of the store at `url`.
fn keys(url: &str, env: &[(String, String)]) -> Vec<String> {
    block_on(async {
        let store = Store::open_with(url, false, env).unwrap();
        let mut k: Vec<_> = store
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        k.sort();
        k
    })
}

#[test]
fn storage_rates_of_local_s3_and_azure_repositories_leave_nothing_behind() {
    let dir = ferry_testkit::scratch_dir();
    let local = dir.path().join("repo");
    let s3 = ferry_testkit::Moto::start();
    let az = ferry_testkit::Azurite::start();
    for (url, env) in [
        (local.display().to_string(), Vec::new()),
        (s3.url(), s3.env()),
        (az.url(), az.env()),
    ] {
        block_on(async {
            let store = Store::open_with(&url, true, &env).unwrap();
            let opts = InitOptions {
                kdf: KdfParams::insecure_fast(),
                ..Default::default()
            };
            Repository::init(store, Some(&Secret::new("pw")), opts)
                .await
                .unwrap();
        });
        let before = keys(&url, &env);
        // The listing sees top-level objects, where the benchmark writes its own.
        assert!(before.iter().any(|k| k == "config"), "{url}: {before:?}");
        let out = ferry_env(
            &[
                "benchmark",
                "--repo",
                &url,
                "--sample-size",
                "2M",
                "--chunk-size",
                "256K",
                "--in-flight",
                "4",
                "--seconds",
                "0.1",
                "--json",
            ],
            &env,
        );
        let v = json(&out);
        let st = &v["storage"];
        assert!(st["objects"].as_u64().unwrap() >= 8, "{url}: {st}");
        assert_eq!(st["in_flight"], 4);
        for k in ["upload_bytes_per_sec", "download_bytes_per_sec"] {
            assert!(st[k].as_f64().unwrap() > 0.0, "{url}: {st}");
        }
        assert_eq!(
            keys(&url, &env),
            before,
            "{url}: benchmark objects left behind"
        );
    }
}

#[test]
fn storage_benchmark_writes_only_into_repositories() {
    let dir = ferry_testkit::scratch_dir();
    std::fs::write(dir.path().join("precious.txt"), b"keep").unwrap();
    let out = ferry(&[
        "benchmark",
        "--repo",
        dir.path().to_str().unwrap(),
        "--seconds",
        "0.05",
    ]);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no measurement before the check");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a Ferry repository"));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["precious.txt"]);
}
