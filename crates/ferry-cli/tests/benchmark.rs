//! `ferry benchmark` through the binary: generated data, a sample read from an image file that
//! qemu-img wrote, and clear errors for bad samples and options.

use std::process::{Command, Output};

fn ferry(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run ferry");
    eprintln!(
        "$ ferry {}\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
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
    let nbd = ferry_testkit::QemuNbd::new(&raw)
        .read_only(true)
        .start();
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
