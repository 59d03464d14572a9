//! `ferry image info`: format, sizes and chain, as text and JSON, on qemu-made and
//! Ferry-written images; clear errors for missing parents.

use ferry_image::{ImageWriter, OutputFormat, WriterOptions};
use std::process::Output;

fn ferry(args: &[&str]) -> Output {
    ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &[])
}

#[test]
fn info_reports_format_sizes_and_chain() {
    let dir = ferry_testkit::scratch_dir();
    let base = dir.path().join("base.vhdx");
    let b = base.to_str().unwrap();
    ferry_testkit::qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        b,
        "16M",
    ]);
    ferry_testkit::qemu_io(&["-f", "vhdx", "-c", "write -P 0x42 1M 1M", b]);
    let child = dir.path().join("child.avhdx");
    let opts = WriterOptions {
        block_size: Some(1 << 20),
        parent: Some(base.clone()),
    };
    let mut w = ImageWriter::create_with(&child, OutputFormat::Vhdx, 16 << 20, &opts).unwrap();
    w.write(5 << 20, &[7u8; 4096]).unwrap();
    w.finish().unwrap();

    let out = ferry(&["image", "info", "--json", child.to_str().unwrap()]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["format"], "vhdx");
    assert_eq!(v["subformat"], "differencing");
    assert_eq!(v["virtual_size"], 16u64 << 20);
    // The parent's 1 MiB block plus the 4 KiB the child holds (sector-precise).
    assert_eq!(v["allocated_bytes"], (1u64 << 20) + 4096);
    let chain = v["chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2);
    assert!(chain[1]["file"].as_str().unwrap().ends_with("base.vhdx"));
    assert_eq!(chain[1]["subformat"], "dynamic");

    let out = ferry(&["image", "info", b]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("vhdx (dynamic)") && text.contains("16777216 bytes"),
        "{text}"
    );

    std::fs::remove_file(&base).unwrap();
    let out = ferry(&["image", "info", child.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("parent not found") && err.contains("child.avhdx"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout on failure");
}

#[test]
fn info_detects_by_content_not_name() {
    let dir = ferry_testkit::scratch_dir();
    let p = dir.path().join("disk.img");
    let s = p.to_str().unwrap();
    ferry_testkit::qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s,
        "8M",
    ]);
    let out = ferry(&["image", "info", "--json", s]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format"], "vmdk");
    assert_eq!(v["subformat"], "streamOptimized");
    assert_eq!(v["allocated_bytes"], 0);
}

#[test]
fn info_warns_about_a_file_named_like_an_image_without_its_signature() {
    let dir = ferry_testkit::scratch_dir();
    for (ext, named, signature) in [("vhdx", "VHDX", "`vhdxfile`"), ("vhd", "VHD", "`conectix`")] {
        let junk = dir.path().join(format!("junk.{ext}"));
        let bytes: Vec<u8> = (0..1000u32)
            .map(|i| (i * 7919 % 251) as u8 ^ 0x5c)
            .collect();
        std::fs::write(&junk, &bytes).unwrap();
        let j = junk.to_str().unwrap();
        for args in [vec!["image", "info", j], vec!["image", "info", "--json", j]] {
            let out = ferry(&args);
            assert!(out.status.success(), "a warning, not a refusal");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.starts_with("warning: "), "{err}");
            for needle in [
                format!("junk.{ext}"),
                format!("the name says {named}"),
                signature.to_string(),
                "showing it as raw".into(),
                "--format raw".into(),
            ] {
                assert!(err.contains(&needle), "the warning names {needle}: {err}");
            }
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("format:       raw") || text.contains("\"format\": \"raw\""),
                "{text}"
            );
        }
    }
}
