//! `ferry verify --boot` end to end through the binary with qemu-system-x86_64 under TCG: a tiny
//! Linux disk the test builds (Debian kernel, busybox initramfs, syslinux; cached under
//! `$FERRY_PEERS_DIR/boot`) boots from the NBD export and shows its heartbeat; the verdict and a
//! PNG screenshot are attached to the restore point and listed by `ferry snapshots`; a disk of
//! zeros fails with a clear reason and a screenshot; no qemu is left behind and the repository
//! keeps every object it had.

use ferry_core::Secret;
use ferry_repo::{InitOptions, KdfParams, Repository, Store};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

const PW: &str = "boot test password";

/// The environment of every ferry run: its scratch files (the boot's `ferry-boot-*` directory)
/// go under this test's own directory, so the leftover check sees only this test's qemu.
fn env(tmp: &Path) -> Vec<(String, String)> {
    vec![
        ("FERRY_PASSWORD".into(), PW.into()),
        ("TMPDIR".into(), tmp.to_str().unwrap().into()),
    ]
}

fn ferry_in(tmp: &Path, args: &[&str]) -> Output {
    ferry_testkit::run_logged(env!("CARGO_BIN_EXE_ferry"), args, &env(tmp))
}

fn ferry_ok_in(tmp: &Path, args: &[&str]) -> String {
    let out = ferry_in(tmp, args);
    assert!(
        out.status.success(),
        "ferry {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The bootable test disk, built once per peers directory.
fn boot_disk() -> PathBuf {
    ferry_testkit::boot_disk(
        Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/make_boot_disk.sh"
        )),
        false,
    )
}

fn init_repo(path: &Path) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(path.to_str().unwrap(), true).unwrap();
        let opts = InitOptions {
            kdf: KdfParams::insecure_fast(),
            ..Default::default()
        };
        Repository::init(store, Some(&Secret::new(PW)), opts)
            .await
            .unwrap();
    });
}

/// Every object key of a local repository.
fn objects(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

/// qemu processes started by a boot verification whose scratch directory is under `tmp`.
fn boot_qemus(tmp: &Path) -> Vec<String> {
    let tmp = tmp.to_str().unwrap();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("qemu-system") && cmd.contains(&format!("{tmp}/ferry-boot-")) {
            out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
        }
    }
    out
}

fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert_eq!(&png[12..16], b"IHDR");
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&png[16..20]), be(&png[20..24]))
}

fn backup(tmp: &Path, repo: &str, disk: &Path, vm: &str) -> String {
    ferry_ok_in(
        tmp,
        &[
            "backup",
            "--repo",
            repo,
            "--vm",
            vm,
            "--disk",
            disk.to_str().unwrap(),
        ],
    )
    .trim()
    .to_string()
}

#[test]
fn a_restore_point_boots_and_the_verdict_is_attached() {
    let disk = boot_disk();
    let dir = ferry_testkit::scratch_dir();
    let root = dir.path().join("repo");
    init_repo(&root);
    let repo = root.to_str().unwrap();
    let tmp = dir.path();
    let ferry = |args: &[&str]| ferry_in(tmp, args);
    let ferry_ok = |args: &[&str]| ferry_ok_in(tmp, args);
    let id = backup(tmp, repo, &disk, "linux-vm");
    let before = objects(&root);

    let shot = dir.path().join("screen.png");
    let out = ferry(&[
        "verify",
        "--repo",
        repo,
        "--boot",
        "linux-vm@latest",
        "--timeout",
        "50s",
        "--screenshot",
        shot.to_str().unwrap(),
        "--json",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "boot verification failed: {text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["result"], "ok", "{v}");
    assert_eq!(v["snapshot"], id.as_str());
    assert_eq!(v["disk"], "disk0");
    let t = v["seconds-to-heartbeat"].as_f64().unwrap();
    assert!(t > 0.0 && t < 50.0, "{v}");
    assert!(
        v["console-tail"]
            .as_str()
            .unwrap()
            .contains("ferry-boot login:"),
        "{v}"
    );
    assert!(v["emulator"].as_str().unwrap().contains("TCG"), "{v}");
    let (w, h) = png_size(&std::fs::read(&shot).unwrap());
    assert!(w >= 320 && h >= 200, "{w}x{h}");
    assert!(
        boot_qemus(tmp).is_empty(),
        "qemu left running: {:?}",
        boot_qemus(tmp)
    );

    // The repository gained the record and the screenshot, and lost or changed nothing.
    let after = objects(&root);
    assert!(before.is_subset(&after));
    let added: Vec<&String> = after.difference(&before).collect();
    assert_eq!(added.len(), 2, "{added:?}");
    assert!(
        added
            .iter()
            .all(|k| k.starts_with(&format!("snapshots/{id}/verify/"))),
        "{added:?}"
    );
    let sealed = std::fs::read(root.join(v["screenshot"].as_str().unwrap())).unwrap();
    assert_eq!(&sealed[..4], b"FRYV", "screenshots are sealed objects");
    assert!(
        !sealed.windows(4).any(|w| w == b"IHDR"),
        "the screenshot is encrypted"
    );
    ferry_ok(&["verify", "--repo", repo]);

    // Listed with the restore point.
    let list: serde_json::Value =
        serde_json::from_str(&ferry_ok(&["snapshots", "--repo", repo, "--json"])).unwrap();
    assert_eq!(list[0]["boot-verification"]["result"], "ok", "{list}");
    let table = ferry_ok(&["snapshots", "--repo", repo]);
    assert!(table.contains("BOOT") && table.contains("ok ("), "{table}");
}

#[test]
fn a_disk_that_does_not_boot_fails_with_a_screenshot() {
    let dir = ferry_testkit::scratch_dir();
    let root = dir.path().join("repo");
    init_repo(&root);
    let repo = root.to_str().unwrap();
    let zeros = dir.path().join("zeros.raw");
    std::fs::write(&zeros, vec![0u8; 8 << 20]).unwrap();
    let tmp = dir.path();
    let ferry = |args: &[&str]| ferry_in(tmp, args);
    let ferry_ok = |args: &[&str]| ferry_ok_in(tmp, args);
    let id = backup(tmp, repo, &zeros, "blank-vm");
    let out = ferry(&[
        "verify",
        "--repo",
        repo,
        "--boot",
        &id,
        "--timeout",
        "8s",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "a failed verdict exits 1");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"], "failed", "{v}");
    assert!(
        v["reason"].as_str().unwrap().contains("no heartbeat"),
        "{v}"
    );
    assert!(v.get("seconds-to-heartbeat").is_none(), "{v}");
    assert!(
        v["screenshot"].as_str().is_some(),
        "a failed boot still has a screenshot: {v}"
    );
    assert!(
        boot_qemus(tmp).is_empty(),
        "qemu left running: {:?}",
        boot_qemus(tmp)
    );
    let table = ferry_ok(&["snapshots", "--repo", repo]);
    assert!(table.contains("failed"), "{table}");

    // Human output names the verdict and the reason.
    let out = ferry(&["verify", "--repo", repo, "--boot", &id, "--timeout", "3s"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("FAILED: restore point"), "{text}");
    assert!(text.contains("no heartbeat matching `login:`"), "{text}");

    // Bad input is refused before qemu starts.
    let out = ferry(&["verify", "--repo", repo, "--boot", &id, "--heartbeat", "("]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--heartbeat"));
    let out = ferry(&["verify", "--repo", repo, "--boot", &id, "--disk", "nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no disk `nope`"));
}
