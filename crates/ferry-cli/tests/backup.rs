//! `ferry backup` / `ferry restore` end to end through the binary, against qemu-img, qemu-io,
//! qemu-nbd (plain, TLS, dirty bitmap) and nbdkit: every source kind, every output format,
//! changed-block incrementals, SIGKILL then a clean re-run, corrupted chunks, small targets.

use ferry_core::Secret;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use std::path::Path;
use std::process::{Command, Output};

const PASSWORD: &str = "test password";

fn ferry(args: &[&str], env: &[(String, String)]) -> Output {
    let mut all = vec![("FERRY_PASSWORD".to_string(), PASSWORD.to_string())];
    all.extend_from_slice(env);
    ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &all)
}

fn ferry_ok(args: &[&str]) -> String {
    let out = ferry(args, &[]);
    assert!(out.status.success(), "ferry {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

fn init_repo(location: &str, options: &[(String, String)]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open_with(location, true, options).unwrap();
        let opts = InitOptions {
            chunk_size: 256 << 10,
            kdf: KdfParams::insecure_fast(),
            ..Default::default()
        };
        Repository::init(store, Some(&Secret::new(PASSWORD)), opts)
            .await
            .unwrap();
    });
}

fn snapshot_count(location: &str) -> usize {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(location, false).unwrap();
        let repo = Repository::open(store, Some(&Secret::new(PASSWORD)))
            .await
            .unwrap();
        repo.snapshot_ids().await.unwrap().len()
    })
}

/// A 24 MiB raw disk: patterned data, zeros and holes.
fn make_raw(path: &Path) {
    let p = path.to_str().unwrap();
    ferry_testkit::qemu_img(&["create", "-q", "-f", "raw", p, "24M"]);
    ferry_testkit::qemu_io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x11 0 3M",
        "-c",
        "write -P 0x22 5M 1M",
        "-c",
        "write -P 0x33 9437184 4096",
        "-c",
        "write -P 0x44 23M 1M",
        "-c",
        "write -z 12M 2M",
        p,
    ]);
}

fn compare(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    ferry_testkit::qemu_img_compare(a, a_fmt, b, b_fmt);
}

#[test]
fn every_image_format_backs_up_and_restores_to_every_format() {
    let dir = ferry_testkit::scratch_dir();
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    init_repo(r, &[]);
    let raw = dir.path().join("disk.raw");
    make_raw(&raw);
    let mut specs = vec![format!("raw={}", raw.display())];
    for (name, fmt, opts) in [
        ("vhdx", "vhdx", "block_size=1M"),
        ("vhd", "vpc", "subformat=dynamic"),
        ("vmdk", "vmdk", "subformat=monolithicSparse"),
        ("streamvmdk", "vmdk", "subformat=streamOptimized"),
    ] {
        let p = dir.path().join(format!("disk.{name}"));
        ferry_testkit::qemu_img(&[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            fmt,
            "-o",
            opts,
            raw.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        specs.push(format!("{name}={}", p.display()));
    }
    let mut args = vec!["backup", "--repo", r, "--vm", "vm1"];
    for s in &specs {
        args.extend(["--disk", s.as_str()]);
    }
    let id = ferry_ok(&args).trim().to_string();
    assert!(
        !id.is_empty() && !id.contains(' '),
        "stdout is the restore point id: {id}"
    );

    // VHD rounds the virtual size to its CHS geometry: compare it through qemu too.
    for disk in ["raw", "vhdx", "vhd", "vmdk", "streamvmdk"] {
        let out = dir.path().join(format!("back-{disk}.raw"));
        ferry_ok(&[
            "restore",
            "--repo",
            r,
            &id,
            "--disk",
            disk,
            "--to",
            out.to_str().unwrap(),
        ]);
        let src = specs
            .iter()
            .find_map(|s| s.strip_prefix(&format!("{disk}=")))
            .unwrap();
        let fmt = match disk {
            "raw" => "raw",
            "vhdx" => "vhdx",
            "vhd" => "vpc",
            _ => "vmdk",
        };
        compare(Path::new(src), fmt, &out, "raw");
    }
    // One disk into every output format, each checked by qemu-img.
    for (format, qfmt) in [
        ("raw", "raw"),
        ("vhd", "vpc"),
        ("vhd-fixed", "vpc"),
        ("vhdx", "vhdx"),
        ("vmdk", "vmdk"),
        ("vmdk-stream", "vmdk"),
    ] {
        let out = dir.path().join(format!("out-{format}.img"));
        ferry_ok(&[
            "restore",
            "--repo",
            r,
            "vm1@latest",
            "--disk",
            "raw",
            "--to",
            out.to_str().unwrap(),
            "--format",
            format,
        ]);
        if matches!(qfmt, "vhdx" | "vmdk") {
            // qemu-img check supports only these of our formats.
            ferry_testkit::qemu_img(&["check", "-f", qfmt, out.to_str().unwrap()]);
        }
        compare(&raw, "raw", &out, qfmt);
    }
    // The restored sparse raw file holds little more than the non-zero data (5 MiB + 4 KiB).
    let meta = std::fs::metadata(dir.path().join("out-raw.img")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 <= 6 << 20,
        "allocated {}",
        meta.blocks() * 512
    );

    // All disks at once into a directory.
    let all = dir.path().join("all");
    ferry_ok(&[
        "restore",
        "--repo",
        r,
        "latest",
        "--to",
        all.to_str().unwrap(),
    ]);
    compare(&raw, "raw", &all.join("raw.raw"), "raw");
    assert!(all.join("vmdk.raw").exists());
}

#[test]
fn qemu_nbd_with_tls_and_dirty_bitmap_gives_a_changed_block_incremental() {
    let dir = ferry_testkit::scratch_dir();
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    init_repo(r, &[]);
    let img = dir.path().join("vm.qcow2");
    let i = img.to_str().unwrap();
    ferry_testkit::qemu_img(&["create", "-q", "-f", "qcow2", i, "64M"]);
    ferry_testkit::qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x61 0 8M",
        "-c",
        "write -P 0x62 32M 4M",
        i,
    ]);
    ferry_testkit::qemu_img(&["bitmap", "--add", "-f", "qcow2", i, "b0"]);
    let tls = ferry_testkit::TlsFiles::generate();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, tls.ca_cert_pem()).unwrap();
    let ca = ca.to_str().unwrap();

    let full = {
        let nbd = ferry_testkit::QemuNbd::new(&img)
            .format("qcow2")
            .read_only(true)
            .bitmap("b0")
            .tls(&tls)
            .tcp(true)
            .start();
        assert!(nbd.uri().starts_with("nbds://"));
        // Without trust the TLS source is refused with a clear message.
        let out = ferry(
            &["backup", "--repo", r, "--vm", "v", "--disk", &nbd.uri()],
            &[],
        );
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-ca"));
        ferry_ok(&[
            "backup",
            "--repo",
            r,
            "--vm",
            "v",
            "--disk",
            &nbd.uri(),
            "--tls-ca",
            ca,
            "--json",
        ])
    };
    let full: serde_json::Value = serde_json::from_str(&full).unwrap();
    assert_eq!(full["disks"][0]["mode"], "full");
    assert_eq!(full["disks"][0]["read_bytes"], 12u64 << 20);

    // Guest writes: 1 MiB + 4 KiB, recorded by the bitmap.
    ferry_testkit::qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x71 1M 1M",
        "-c",
        "write -P 0x72 50M 4096",
        i,
    ]);
    let nbd = ferry_testkit::QemuNbd::new(&img)
        .format("qcow2")
        .read_only(true)
        .bitmap("b0")
        .tls(&tls)
        .tcp(true)
        .start();
    let out = ferry_ok(&[
        "backup",
        "--repo",
        r,
        "--vm",
        "v",
        "--disk",
        &nbd.uri(),
        "--tls-ca",
        ca,
        "--bitmap",
        "b0",
        "--verify-sample",
        "10",
        "--json",
    ]);
    let incr: serde_json::Value = serde_json::from_str(&out).unwrap();
    let d = &incr["disks"][0];
    assert_eq!(d["mode"], "changed-blocks");
    assert_eq!(incr["previous"], full["snapshot"]);
    // Changed: 1 MiB in one 256 KiB-chunk-aligned run (4 chunks) + one chunk at 50M (a hole
    // apart from the 4 KiB), plus the verification sample (10 % of 251 unchanged chunks).
    let read = d["read_bytes"].as_u64().unwrap();
    let sampled = d["verify"]["sampled"].as_u64().unwrap();
    assert_eq!(sampled, 26);
    assert!(
        read >= (1 << 20) + 4096 && read <= (1 << 20) + 4096 + sampled * (256 << 10),
        "read {read}"
    );
    assert_eq!(
        d["verify"]["mismatched_offsets"].as_array().unwrap().len(),
        0
    );
    drop(nbd);

    let out = dir.path().join("latest.raw");
    ferry_ok(&[
        "restore",
        "--repo",
        r,
        "v@latest",
        "--to",
        out.to_str().unwrap(),
    ]);
    compare(&img, "qcow2", &out, "raw");
}

#[test]
fn broken_dirty_bitmap_is_reported_and_the_backup_is_still_right() {
    let dir = ferry_testkit::scratch_dir();
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    init_repo(r, &[]);
    let img = dir.path().join("vm.qcow2");
    let i = img.to_str().unwrap();
    ferry_testkit::qemu_img(&["create", "-q", "-f", "qcow2", i, "16M"]);
    ferry_testkit::qemu_io(&["-f", "qcow2", "-c", "write -P 0x61 0 16M", i]);
    ferry_testkit::qemu_img(&["bitmap", "--add", "-f", "qcow2", i, "b0"]);
    {
        let nbd = ferry_testkit::QemuNbd::new(&img)
            .format("qcow2")
            .read_only(true)
            .start();
        ferry_ok(&["backup", "--repo", r, "--vm", "v", "--disk", &nbd.uri()]);
    }
    // A write the bitmap does not see (disabled), then one it does.
    ferry_testkit::qemu_img(&["bitmap", "--disable", "-f", "qcow2", i, "b0"]);
    ferry_testkit::qemu_io(&["-f", "qcow2", "-c", "write -P 0x99 3M 64k", i]);
    ferry_testkit::qemu_img(&["bitmap", "--enable", "-f", "qcow2", i, "b0"]);
    ferry_testkit::qemu_io(&["-f", "qcow2", "-c", "write -P 0x98 9M 64k", i]);
    let nbd = ferry_testkit::QemuNbd::new(&img)
        .format("qcow2")
        .read_only(true)
        .bitmap("b0")
        .start();
    let out = ferry(
        &[
            "backup",
            "--repo",
            r,
            "--vm",
            "v",
            "--disk",
            &nbd.uri(),
            "--bitmap",
            "b0",
            "--verify-sample",
            "100",
        ],
        &[],
    );
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CHANGE TRACKING IS BROKEN"), "{err}");
    assert!(err.contains(&format!("offset {}", 3 << 20)), "{err}");
    let restored = dir.path().join("r.raw");
    ferry_ok(&[
        "restore",
        "--repo",
        r,
        "latest",
        "--to",
        restored.to_str().unwrap(),
    ]);
    compare(&img, "qcow2", &restored, "raw");
}

#[test]
fn sigkill_during_backup_leaves_nothing_visible_and_a_rerun_succeeds() {
    let dir = ferry_testkit::scratch_dir();
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    init_repo(r, &[]);
    let raw = dir.path().join("disk.raw");
    let p = raw.to_str().unwrap();
    ferry_testkit::qemu_img(&["create", "-q", "-f", "raw", p, "32M"]);
    ferry_testkit::qemu_io(&["-f", "raw", "-c", "write -P 0x5c 0 32M", p]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "backup",
            "--repo",
            r,
            "--vm",
            "k",
            "--disk",
            p,
            "--limit-rate",
            "4M",
        ])
        .env("FERRY_PASSWORD", PASSWORD)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(snapshot_count(r), 0, "a killed backup must not be visible");
    let id = ferry_ok(&["backup", "--repo", r, "--vm", "k", "--disk", p]);
    assert_eq!(snapshot_count(r), 1);
    let out = dir.path().join("r.raw");
    ferry_ok(&[
        "restore",
        "--repo",
        r,
        id.trim(),
        "--to",
        out.to_str().unwrap(),
    ]);
    compare(&raw, "raw", &out, "raw");
}

#[test]
fn corrupted_chunk_fails_restore_naming_it_and_writes_nothing() {
    let dir = ferry_testkit::scratch_dir();
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    init_repo(r, &[]);
    let raw = dir.path().join("disk.raw");
    make_raw(&raw);
    ferry_ok(&[
        "backup",
        "--repo",
        r,
        "--vm",
        "c",
        "--disk",
        raw.to_str().unwrap(),
    ]);
    // Flip one byte in the middle of one chunk object.
    let chunk = walk(&repo.join("chunks"))
        .into_iter()
        .next()
        .expect("a chunk object");
    let mut bytes = std::fs::read(&chunk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&chunk, bytes).unwrap();
    let key = chunk
        .strip_prefix(&repo)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();

    let out_path = dir.path().join("out.raw");
    let out = ferry(
        &[
            "restore",
            "--repo",
            r,
            "latest",
            "--to",
            out_path.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&key), "error must name {key}: {err}");
    assert!(!out_path.exists(), "no half-written output");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("ferry-part"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn restore_into_nbd_targets_and_refuses_small_ones() {
    let dir = ferry_testkit::scratch_dir();
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    init_repo(r, &[]);
    let raw = dir.path().join("disk.raw");
    make_raw(&raw);
    ferry_ok(&[
        "backup",
        "--repo",
        r,
        "--vm",
        "n",
        "--disk",
        raw.to_str().unwrap(),
    ]);

    let small = ferry_testkit::Nbdkit::new("memory").arg("size=8M").start();
    let out = ferry(
        &["restore", "--repo", r, "latest", "--to", &small.uri()],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds 8388608 bytes") && err.contains("25165824"),
        "{err}"
    );

    // A target full of garbage: zero chunks must be written as zeroes, not skipped.
    let target = dir.path().join("target.raw");
    let t = target.to_str().unwrap();
    ferry_testkit::qemu_img(&["create", "-q", "-f", "raw", t, "24M"]);
    ferry_testkit::qemu_io(&["-f", "raw", "-c", "write -P 0xff 0 24M", t]);
    {
        let nbd = ferry_testkit::QemuNbd::new(&target).start();
        ferry_ok(&["restore", "--repo", r, "latest", "--to", &nbd.uri()]);
    }
    compare(&raw, "raw", &target, "raw");

    // A source that is not there: a clear error naming it.
    let out = ferry(
        &[
            "backup",
            "--repo",
            r,
            "--vm",
            "n",
            "--disk",
            "/nonexistent/disk.img",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/disk.img"));
}

#[test]
fn backups_to_s3_and_azure_work_end_to_end() {
    let dir = ferry_testkit::scratch_dir();
    let raw = dir.path().join("disk.raw");
    make_raw(&raw);
    let s3 = ferry_testkit::Moto::start();
    let az = ferry_testkit::Azurite::start();
    for (url, env) in [(s3.url(), s3.env()), (az.url(), az.env())] {
        init_repo(&url, &env);
        let id = String::from_utf8(
            ferry(
                &[
                    "backup",
                    "--repo",
                    &url,
                    "--vm",
                    "cloud",
                    "--disk",
                    raw.to_str().unwrap(),
                ],
                &env,
            )
            .stdout,
        )
        .unwrap();
        assert!(!id.trim().is_empty(), "backup to {url} failed");
        let out = dir.path().join("cloud.raw");
        let o = ferry(
            &[
                "restore",
                "--repo",
                &url,
                id.trim(),
                "--to",
                out.to_str().unwrap(),
            ],
            &env,
        );
        assert!(o.status.success(), "restore from {url} failed");
        compare(&raw, "raw", &out, "raw");
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn files_named_like_images_without_their_signature_are_refused_unless_forced_raw() {
    let dir = ferry_testkit::scratch_dir();
    let repo = dir.path().join("repo");
    let r = repo.to_str().unwrap();
    init_repo(r, &[]);
    for (ext, named, signature) in [
        ("vhd", "VHD", "`conectix`"),
        ("vhdx", "VHDX", "`vhdxfile`"),
        ("avhdx", "VHDX", "`vhdxfile`"),
        ("vmdk", "VMDK", "`KDMV`"),
    ] {
        let junk = dir.path().join(format!("junk.{ext}"));
        std::fs::write(&junk, ferry_testkit::noise(1000, 42)).unwrap();
        let spec = format!("d={}", junk.display());
        let out = ferry(
            &["backup", "--repo", r, "--vm", "junk", "--disk", &spec],
            &[],
        );
        assert!(!out.status.success(), "junk.{ext} must be refused");
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        for needle in [
            format!("junk.{ext}"),
            format!("the name says {named}"),
            signature.to_string(),
            "found `".to_string(),
            "in a file of 1000 bytes".to_string(),
            format!("`--disk d=raw:{}`", junk.display()),
            "--format raw".to_string(),
        ] {
            assert!(err.contains(&needle), "the refusal names {needle}: {err}");
        }
        assert_eq!(err.lines().count(), 1, "one error line: {err}");
    }
    assert_eq!(
        snapshot_count(r),
        0,
        "a refused backup writes no restore point"
    );
    // `ferry benchmark --sample` opens disks the same way, and says how to force raw there.
    let junk = dir.path().join("junk.vhdx");
    let out = ferry(&["benchmark", "--sample", junk.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the name says VHDX")
            && err.contains(&format!("`--sample raw:{}`", junk.display())),
        "{err}"
    );

    // Forced raw, per disk or for all: backed up as the bytes they are.
    let junk = dir.path().join("junk.vhdx");
    let id = ferry_ok(&[
        "backup",
        "--repo",
        r,
        "--vm",
        "junk",
        "--disk",
        &format!("d=raw:{}", junk.display()),
    ]);
    let restored = dir.path().join("restored.raw");
    ferry_ok(&[
        "restore",
        "--repo",
        r,
        id.trim(),
        "--to",
        restored.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(&restored).unwrap(),
        ferry_testkit::noise(1000, 42)
    );
    ferry_ok(&[
        "backup",
        "--repo",
        r,
        "--vm",
        "junk",
        "--format",
        "raw",
        "--disk",
        dir.path().join("junk.vmdk").to_str().unwrap(),
    ]);
    // VMware's flat extents are raw by name.
    let flat = dir.path().join("web-flat.vmdk");
    std::fs::write(&flat, ferry_testkit::noise(4096, 7)).unwrap();
    ferry_ok(&[
        "backup",
        "--repo",
        r,
        "--vm",
        "flat",
        "--disk",
        flat.to_str().unwrap(),
    ]);
    // A real image with such a name is still read as what it is.
    let real = dir.path().join("real.vhdx");
    ferry_testkit::qemu_img(&["create", "-q", "-f", "vhdx", real.to_str().unwrap(), "4M"]);
    ferry_testkit::qemu_io(&[
        "-f",
        "vhdx",
        "-c",
        "write -P 0x5a 1M 64k",
        real.to_str().unwrap(),
    ]);
    let out = ferry(
        &[
            "backup",
            "--repo",
            r,
            "--vm",
            "real",
            "--json",
            "--disk",
            real.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["disks"][0]["size"], 4u64 << 20, "{report}");
    assert_eq!(snapshot_count(r), 4);
}
