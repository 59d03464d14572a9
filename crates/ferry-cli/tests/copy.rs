//! `ferry copy` end to end through the binary: local → local with different passwords (restore
//! byte for byte, same `snapshots`, nothing re-sent, incrementals send only new chunks,
//! destination-only retention), local → S3 (moto) and S3 → Azure (Azurite, another chunk
//! size), SIGKILL mid-copy then a resuming re-run, and a corrupted source chunk.

use ferry_core::Secret;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SRC_PW: &str = "source password";
const DST_PW: &str = "destination password";

fn ferry(args: &[&str], env: &[(String, String)]) -> Output {
    let mut all = vec![
        ("FERRY_PASSWORD".to_string(), SRC_PW.to_string()),
        ("FERRY_TO_PASSWORD".to_string(), DST_PW.to_string()),
    ];
    all.extend_from_slice(env);
    ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &all)
}

fn ferry_ok(args: &[&str], env: &[(String, String)]) -> String {
    let out = ferry(args, env);
    assert!(out.status.success(), "ferry {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `ferry copy … --json` and returns the report.
fn copy(from: &str, to: &str, extra: &[&str], env: &[(String, String)]) -> serde_json::Value {
    let mut args = vec!["copy", "--from", from, "--to", to, "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&ferry_ok(&args, env)).unwrap()
}

fn init_repo(location: &str, password: &str, chunk_size: u32, env: &[(String, String)]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open_with(location, true, env).unwrap();
        let opts = InitOptions {
            chunk_size,
            kdf: KdfParams::insecure_fast(),
            ..Default::default()
        };
        Repository::init(store, Some(&Secret::new(password)), opts)
            .await
            .unwrap();
    });
}

/// A 12 MiB raw disk: noise, patterned data, zeros and a hole.
fn make_disk(path: &Path, seed: u64) {
    let mut data = vec![0u8; 12 << 20];
    data[..3 << 20].copy_from_slice(&ferry_testkit::noise(3 << 20, seed));
    data[5 << 20..6 << 20].fill(0x22);
    data[(11 << 20) + 4096..(11 << 20) + 8192]
        .copy_from_slice(&ferry_testkit::noise(4096, seed + 1));
    std::fs::write(path, data).unwrap();
}

fn compare(a: &Path, b: &Path) {
    ferry_testkit::qemu_img_compare(a, "raw", b, "raw");
}

fn backup(repo: &str, vm: &str, disks: &[String], env: &[(String, String)]) -> String {
    let mut args = vec!["backup", "--repo", repo, "--vm", vm];
    for d in disks {
        args.extend(["--disk", d.as_str()]);
    }
    ferry_ok(&args, env).trim().to_string()
}

/// Restores restore point `id` of `repo` (destination password) to `out`: a file for one
/// disk, a directory of `NAME.raw` files for several.
fn restore_from_destination(repo: &str, id: &str, out: &Path, env: &[(String, String)]) {
    let mut all = vec![("FERRY_PASSWORD".to_string(), DST_PW.to_string())];
    all.extend_from_slice(env);
    let o = ferry_testkit::run_logged(
        env!("CARGO_BIN_EXE_ferry"),
        &["restore", "--repo", repo, id, "--to", out.to_str().unwrap()],
        &all,
    );
    assert!(o.status.success(), "restore of {id} from {repo} failed");
}

/// The manifests of `repo` as `ferry snapshots --json` shows them, without the index digests
/// (keyed by each repository's own key, so they differ between copies).
fn snapshots(repo: &str, password: &str, env: &[(String, String)]) -> Vec<serde_json::Value> {
    let mut all = vec![("FERRY_PASSWORD".to_string(), password.to_string())];
    all.extend_from_slice(env);
    let o = ferry_testkit::run_logged(
        env!("CARGO_BIN_EXE_ferry"),
        &["snapshots", "--repo", repo, "--json"],
        &all,
    );
    assert!(o.status.success());
    let mut list: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    for m in &mut list {
        for d in m["disks"].as_array_mut().unwrap() {
            d.as_object_mut().unwrap().remove("index-digest");
        }
    }
    list
}

/// Chunk objects of a local repository.
fn chunk_objects(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(prefixes) = std::fs::read_dir(repo.join("chunks")) else {
        return out;
    };
    for p in prefixes {
        for f in std::fs::read_dir(p.unwrap().path()).unwrap() {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_string_lossy().to_string();
            if name.len() == 64 && name.chars().all(|c| c.is_ascii_hexdigit()) {
                out.push(f);
            }
        }
    }
    out
}

fn n(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no `{key}` in {v}"))
}

#[test]
fn local_copy_restores_byte_for_byte_and_sends_only_missing_chunks() {
    let dir = ferry_testkit::scratch_dir();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    init_repo(s, SRC_PW, 256 << 10, &[]);
    init_repo(d, DST_PW, 256 << 10, &[]);
    let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    make_disk(&a, 1);
    make_disk(&b, 2);
    let disks = [
        format!("sys={}", a.display()),
        format!("data={}", b.display()),
    ];
    let first = backup(s, "vm-1", &disks, &[]);

    // The destination's password is its own: the source's does not open it.
    let out = ferry(
        &["copy", "--from", s, "--to", d],
        &[("FERRY_TO_PASSWORD".into(), SRC_PW.into())],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wrong password") && err.contains("destination"),
        "{err}"
    );

    let r = copy(s, d, &[], &[]);
    assert_eq!(r["copied"], serde_json::json!([first]));
    let stored = chunk_objects(&src).len() as u64;
    assert!(stored > 20, "{stored} source chunks");
    assert_eq!(n(&r, "chunks_sent"), stored, "{r}");
    assert_eq!(chunk_objects(&dst).len() as u64, stored);
    assert!(
        n(&r, "bytes_read") > 6 << 20 && n(&r, "bytes_written") > 6 << 20,
        "{r}"
    );
    assert!(n(&r, "zero_chunks") > 0, "{r}");
    assert_eq!(snapshots(s, SRC_PW, &[]), snapshots(d, DST_PW, &[]));
    let out = dir.path().join("out1");
    restore_from_destination(d, &first, &out, &[]);
    compare(&a, &out.join("sys.raw"));
    compare(&b, &out.join("data.raw"));

    // Nothing missing, nothing sent.
    let r = copy(s, d, &[], &[]);
    assert_eq!(r["copied"], serde_json::json!([]));
    assert_eq!(r["already_present"], serde_json::json!([first]));
    assert_eq!(n(&r, "chunks_sent"), 0);

    // An incremental: only its new chunks travel, unchanged ones are not even read.
    let mut data = std::fs::read(&a).unwrap();
    data[(1 << 20)..(1 << 20) + 300_000].copy_from_slice(&ferry_testkit::noise(300_000, 9));
    std::fs::write(&a, data).unwrap();
    let before = chunk_objects(&src).len() as u64;
    let second = backup(s, "vm-1", &disks, &[]);
    let new = chunk_objects(&src).len() as u64 - before;
    assert_eq!(new, 2, "300 kB across a 256 KiB boundary touch two chunks");
    let r = copy(s, d, &[], &[]);
    assert_eq!(r["copied"], serde_json::json!([second]));
    assert_eq!(n(&r, "chunks_sent"), new, "{r}");
    assert!(n(&r, "chunks_not_fetched") >= stored - new, "{r}");
    assert!(n(&r, "bytes_read") < 2 << 20, "{r}");
    let out = dir.path().join("out2");
    restore_from_destination(d, &second, &out, &[]);
    compare(&a, &out.join("sys.raw"));
    compare(&b, &out.join("data.raw"));

    // Retention applies to the destination only.
    let third = backup(s, "vm-1", &disks, &[]);
    let r = copy(s, d, &["--keep-last", "1"], &[]);
    assert_eq!(r["copied"], serde_json::json!([third]));
    assert_eq!(n(&r, "chunks_sent"), 0, "{r}");
    let mut removed: Vec<&str> = r["pruned"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["keep"] == false)
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    removed.sort_unstable();
    assert_eq!(removed, [first.as_str(), second.as_str()]);
    let ids = |l: Vec<serde_json::Value>| -> Vec<String> {
        l.iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(snapshots(d, DST_PW, &[])), std::slice::from_ref(&third));
    assert_eq!(ids(snapshots(s, SRC_PW, &[])), [first, second, third]);
}

#[test]
fn copies_go_from_local_to_s3_and_from_s3_to_azure_with_another_chunk_size() {
    let dir = ferry_testkit::scratch_dir();
    let local = dir.path().join("src");
    let l = local.to_str().unwrap();
    init_repo(l, SRC_PW, 256 << 10, &[]);
    let disk = dir.path().join("d.raw");
    make_disk(&disk, 5);
    let id = backup(l, "cloud", &[disk.display().to_string()], &[]);

    let s3 = ferry_testkit::Moto::start();
    let az = ferry_testkit::Azurite::start();
    let mut both = s3.env();
    both.extend(az.env());
    init_repo(&s3.url(), DST_PW, 256 << 10, &s3.env());
    let r = copy(l, &s3.url(), &[], &s3.env());
    assert_eq!(r["copied"], serde_json::json!([id]));
    assert_eq!(n(&r, "chunks_sent"), chunk_objects(&local).len() as u64);
    let out = dir.path().join("from-s3.raw");
    restore_from_destination(&s3.url(), &id, &out, &s3.env());
    compare(&disk, &out);

    // S3 → Azure: the S3 repository is now the source (its password is FERRY_PASSWORD), and
    // the Azure one cuts disks into 128 KiB chunks.
    init_repo(&az.url(), DST_PW, 128 << 10, &az.env());
    let dst_pw = dir.path().join("dst.pw");
    std::fs::write(&dst_pw, format!("{DST_PW}\n")).unwrap();
    let mut env = both.clone();
    env.push(("FERRY_PASSWORD".into(), DST_PW.into()));
    env.push(("FERRY_TO_PASSWORD".into(), "not the password".into()));
    let r = copy(
        &s3.url(),
        &az.url(),
        &["--to-password-file", dst_pw.to_str().unwrap()],
        &env,
    );
    assert_eq!(r["copied"], serde_json::json!([id]));
    assert!(
        n(&r, "chunks_sent") > chunk_objects(&local).len() as u64,
        "{r}"
    );
    let out = dir.path().join("from-azure.raw");
    restore_from_destination(&az.url(), &id, &out, &az.env());
    compare(&disk, &out);
    let r = copy(
        &s3.url(),
        &az.url(),
        &["--to-password-file", dst_pw.to_str().unwrap()],
        &env,
    );
    assert_eq!(n(&r, "chunks_sent"), 0, "{r}");
}

#[test]
fn sigkill_mid_copy_leaves_no_restore_point_and_a_rerun_resumes() {
    let dir = ferry_testkit::scratch_dir();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    init_repo(s, SRC_PW, 64 << 10, &[]);
    init_repo(d, DST_PW, 64 << 10, &[]);
    let disk = dir.path().join("big.raw");
    std::fs::write(&disk, ferry_testkit::noise(16 << 20, 7)).unwrap();
    let id = backup(s, "k", &[disk.display().to_string()], &[]);
    let total = chunk_objects(&src).len();
    assert_eq!(total, 256);

    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["copy", "--from", s, "--to", d, "--limit-rate", "4M"])
        .env("FERRY_PASSWORD", SRC_PW)
        .env("FERRY_TO_PASSWORD", DST_PW)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while chunk_objects(&dst).len() < 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "the copy never got going"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let arrived = chunk_objects(&dst).len();
    assert!(arrived >= 40 && arrived < total, "{arrived} of {total}");
    assert!(
        snapshots(d, DST_PW, &[]).is_empty(),
        "a killed copy must not leave a restore point"
    );

    let r = copy(s, d, &[], &[]);
    assert_eq!(r["copied"], serde_json::json!([id]));
    assert_eq!(n(&r, "chunks_sent") as usize, total - arrived, "{r}");
    assert_eq!(n(&r, "chunks_skipped") as usize, arrived, "{r}");
    let out = dir.path().join("out.raw");
    restore_from_destination(d, &id, &out, &[]);
    compare(&disk, &out);
}

#[test]
fn corrupted_source_chunk_fails_the_copy_naming_it_and_commits_nothing() {
    let dir = ferry_testkit::scratch_dir();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    init_repo(s, SRC_PW, 256 << 10, &[]);
    init_repo(d, DST_PW, 256 << 10, &[]);
    let disk = dir.path().join("d.raw");
    make_disk(&disk, 3);
    backup(s, "c", &[disk.display().to_string()], &[]);
    let chunk = chunk_objects(&src).into_iter().next().unwrap();
    let mut bytes = std::fs::read(&chunk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&chunk, bytes).unwrap();
    let key = chunk
        .strip_prefix(&src)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();

    let out = ferry(&["copy", "--from", s, "--to", d], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&key), "the error must name {key}: {err}");
    assert!(err.contains("corrupt"), "{err}");
    assert!(snapshots(d, DST_PW, &[]).is_empty());
}

#[test]
fn boot_verifications_travel_with_their_restore_points_and_are_checked_on_arrival() {
    let tmp = ferry_testkit::scratch_dir();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    let (src_s, dst_s) = (src.to_str().unwrap(), dst.to_str().unwrap());
    init_repo(src_s, SRC_PW, 1 << 20, &[]);
    init_repo(dst_s, DST_PW, 1 << 20, &[]);
    let disk = tmp.path().join("d.raw");
    make_disk(&disk, 7);
    let id = backup(src_s, "web01", &[disk.to_str().unwrap().to_string()], &[]);
    // A boot verification with a screenshot, and one without, as `verify --boot` stores them.
    let png =
        b"\x89PNG\r\n\x1a\nnot really an image, but sealed and compared byte for byte".to_vec();
    let records = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = Store::open(src_s, false).unwrap();
        let repo = Repository::open(store, Some(&Secret::new(SRC_PW)))
            .await
            .unwrap();
        let mut out = Vec::new();
        for (i, shot) in [Some(png.as_slice()), None].into_iter().enumerate() {
            let rec = ferry_repo::BootVerification {
                version: 1,
                snapshot: id.clone(),
                disk: "d".into(),
                started: format!("2026-12-07T10:0{i}:00Z"),
                result: if i == 0 {
                    ferry_repo::BootResult::Ok
                } else {
                    ferry_repo::BootResult::Failed
                },
                seconds_to_heartbeat: (i == 0).then_some(12.5),
                seconds: 14.0,
                reason: format!("record {i}"),
                heartbeat: "login:".into(),
                timeout_secs: 300,
                emulator: "qemu-system-x86_64 10.0.2 (TCG)".into(),
                console_tail: "ferry-boot login: ".into(),
                screenshot: None,
                key: String::new(),
            };
            out.push(repo.attach_boot_verification(rec, shot).await.unwrap());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        out
    });
    let report = copy(src_s, dst_s, &[], &[]);
    assert_eq!(report["copied"], serde_json::json!([id]), "{report}");
    assert_eq!(n(&report, "verifications_copied"), 2, "{report}");

    // The destination holds both, under the same keys, readable with its own password.
    let copied = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = Store::open(dst_s, false).unwrap();
        let repo = Repository::open(store, Some(&Secret::new(DST_PW)))
            .await
            .unwrap();
        let v = repo.boot_verifications(&id).await.unwrap();
        let shot = repo
            .load_screenshot(v[0].screenshot.as_deref().unwrap())
            .await
            .unwrap();
        (v, shot)
    });
    assert_eq!(copied.0, records);
    assert_eq!(copied.1, png);
    let listed = snapshots(dst_s, DST_PW, &[]);
    assert_eq!(
        listed[0]["boot-verification"]["reason"], "record 1",
        "{listed:?}"
    );

    // A re-run copies nothing; a restore point copied earlier gets a later verification.
    let again = copy(src_s, dst_s, &[], &[]);
    assert_eq!(n(&again, "verifications_copied"), 0, "{again}");
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = Store::open(src_s, false).unwrap();
        let repo = Repository::open(store, Some(&Secret::new(SRC_PW)))
            .await
            .unwrap();
        let mut rec = records[1].clone();
        rec.reason = "record 2".into();
        repo.attach_boot_verification(rec, None).await.unwrap();
    });
    let third = copy(src_s, dst_s, &[], &[]);
    assert_eq!(third["already_present"], serde_json::json!([id]), "{third}");
    assert_eq!(n(&third, "verifications_copied"), 1, "{third}");

    // A corrupt source record stops the copy, naming it.
    let key = &records[0].key;
    let path = src.join(key);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let fresh = tmp.path().join("fresh");
    init_repo(fresh.to_str().unwrap(), DST_PW, 1 << 20, &[]);
    let out = ferry(
        &["copy", "--from", src_s, "--to", fresh.to_str().unwrap()],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(key.as_str()), "{err}");
}
