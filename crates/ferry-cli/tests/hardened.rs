//! Hardened local repositories (ADR 0185) end to end through the `ferry` binary on the test
//! machine's ext4: every data object carries the inode immutable flag (checked with the real
//! `lsattr` from e2fsprogs), the kernel refuses to delete it, prune and GC keep what is under
//! retention and say why, and once `FERRY_CLOCK_OFFSET_SECS` moves ferry's clock past the
//! retention they delete it and leave no flagged file behind. Init is refused on a file system
//! without inode flags (a private ramfs mount) and for a process without CAP_LINUX_IMMUTABLE
//! (`setpriv`). Every test clears the flags it leaves (`chattr -R -i`) so its directory can go.

#[path = "common/immutability.rs"]
mod immutability;

use immutability::{ferry, ferry_json, ferry_ok, make_disk, now, unix};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PW: &str = "hardened test password";

fn env() -> Vec<(String, String)> {
    vec![("FERRY_PASSWORD".into(), PW.into())]
}

fn ahead(secs: u64) -> Vec<(String, String)> {
    let mut e = env();
    e.push(("FERRY_CLOCK_OFFSET_SECS".into(), secs.to_string()));
    e
}

/// A system tool the test needs (e2fsprogs, util-linux): fails loudly when missing.
fn system_tool(name: &str) -> PathBuf {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("peer `{name}` not found: run tests/peers/install.sh"))
}

/// Clears the immutable flag of everything under a directory when dropped (declare it after
/// the directory's `TempDir`, so it runs first).
struct Unflag(PathBuf);

impl Drop for Unflag {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = Command::new(system_tool("chattr"))
                .arg("-R")
                .arg("-i")
                .arg(&self.0)
                .status();
        }
    }
}

/// `lsattr`'s view: relative path of every regular file under `root` → immutable or not.
fn flags(root: &Path) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    files.sort();
    if files.is_empty() {
        return out;
    }
    let o = ferry_testkit::run_ok(Command::new(system_tool("lsattr")).args(&files));
    for line in o.lines() {
        let (attrs, path) = line.split_once(' ').expect("lsattr line");
        let rel = Path::new(path.trim())
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        out.push((rel, attrs.contains('i')));
    }
    assert_eq!(out.len(), files.len(), "lsattr listed every file: {o}");
    out
}

fn backup(repo: &str, disk: &Path) -> String {
    let args = ["backup", "--repo", repo, "--vm", "vm-1", "--disk"];
    let mut a = args.to_vec();
    a.push(disk.to_str().unwrap());
    ferry_ok(&a, &env()).trim().to_string()
}

fn chunk_files(repo: &Path) -> BTreeSet<String> {
    flags(repo)
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("chunks/"))
        .collect()
}

fn decision<'a>(plan: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    plan.as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {plan}"))
}

#[test]
fn flagged_objects_survive_prune_and_gc_until_retention_passes() {
    let dir = ferry_testkit::scratch_dir();
    let _unflag = Unflag(dir.path().to_path_buf());
    let root = dir.path().join("repo");
    let repo = root.to_str().unwrap().to_string();
    let t0 = now();
    ferry_ok(
        &[
            "repo",
            "init",
            "--repo",
            &repo,
            "--immutable-seconds",
            "40",
            "--generation-seconds",
            "10",
        ],
        &env(),
    );
    let info = ferry_json(&["repo", "info", "--repo", &repo], &env());
    assert_eq!(info["immutable_by"], "inode-flag", "{info}");
    assert_eq!(info["immutability"]["retention-secs"], 40, "{info}");

    let disk = dir.path().join("disk0.raw");
    let mut snaps = Vec::new();
    let mut chunks = Vec::new();
    for seed in 1..=3 {
        make_disk(&disk, seed);
        snaps.push(backup(&repo, &disk));
        chunks.push(chunk_files(&root));
    }
    let (s1, s2, s3) = (&snaps[0], &snaps[1], &snaps[2]);
    // Chunks are 1 MiB: 2 shared, 2 new per restore point.
    assert_eq!(
        chunks.iter().map(BTreeSet::len).collect::<Vec<_>>(),
        [4, 6, 8]
    );

    // Every data object and ledger segment is flagged; leases and the catalog are not.
    let all = flags(&root);
    for (key, immutable) in &all {
        let data = key == "config"
            || ["keys/", "chunks/", "indexes/", "snapshots/", "retention/"]
                .iter()
                .any(|p| key.starts_with(p));
        assert_eq!(*immutable, data, "{key}: lsattr says immutable={immutable}");
        assert!(!key.contains('#'), "staging file left behind: {key}");
    }
    assert!(all.iter().any(|(k, _)| k.starts_with("retention/")));
    assert!(all.iter().any(|(k, _)| k.starts_with("catalog/")));

    // A crash between a write and its flag leaves an unflagged object: `ferry verify` flags it.
    let loose = root.join(chunks[1].iter().last().unwrap());
    ferry_testkit::run_ok(Command::new(system_tool("chattr")).arg("-i").arg(&loose));
    let report = ferry_json(&["verify", "--repo", &repo], &env());
    assert_eq!(report["sealed"], 1, "{report}");
    assert!(report["bad"].as_array().unwrap().is_empty(), "{report}");
    let rel = loose
        .strip_prefix(&root)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(flags(&root).contains(&(rel, true)));

    // The kernel refuses to delete a chunk or a restore point, even to root.
    let chunk = root.join(chunks[0].first().unwrap());
    let manifest1 = root.join(format!("snapshots/{s1}/manifest"));
    for p in [&chunk, &manifest1, &root.join("config")] {
        let e = std::fs::remove_file(p).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(nix::libc::EPERM),
            "{}: {e}",
            p.display()
        );
    }
    let out = Command::new("rm")
        .arg("-f")
        .arg(&manifest1)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{out:?}"
    );

    // Key slots are flagged too: a second one can be added, none removed (a thief holding one
    // password could otherwise remove the owner's).
    let mut with_new = env();
    with_new.push(("FERRY_NEW_PASSWORD".into(), "second password".into()));
    let added = ferry_ok(&["repo", "key", "add", "--repo", &repo], &with_new);
    let slot = added
        .split_whitespace()
        .find(|w| w.starts_with("keys/"))
        .unwrap_or_else(|| panic!("no slot in: {added}"))
        .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    assert_eq!(
        flags(&root).iter().find(|(k, _)| *k == slot).map(|f| f.1),
        Some(true)
    );
    let out = ferry(&["repo", "key", "remove", "--repo", &repo, &slot], &env());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "slot removed: {err}");
    assert!(err.contains("inode immutable flag"), "{err}");

    // Prune keeps restore points 1 and 2 (retention), with the date.
    let plan = ferry_json(&["prune", "--repo", &repo, "--keep-last", "1"], &env());
    for s in [s1, s2] {
        let d = decision(&plan, s);
        assert_eq!(d["keep"], true, "{plan}");
        assert!(
            d["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == "immutable"),
            "{plan}"
        );
        assert!(
            unix(d["locked_until"].as_str().unwrap()) >= t0 + 40,
            "{plan}"
        );
    }
    let text = ferry_ok(&["prune", "--repo", &repo, "--keep-last", "1"], &env());
    assert!(
        text.contains("kept 2 restore points under retention"),
        "{text}"
    );

    // An administrator holding the capability removes restore point 1 by hand: its own chunks
    // and index are unreferenced now, yet GC keeps them and says why.
    ferry_testkit::run_ok(
        Command::new(system_tool("chattr"))
            .arg("-i")
            .arg(&manifest1),
    );
    std::fs::remove_file(&manifest1).unwrap();
    let gc = ferry_json(&["gc", "--repo", &repo, "--grace", "0"], &env());
    assert_eq!(gc["deleted_chunks"], 0, "{gc}");
    assert_eq!(gc["kept_locked"]["count"], 3, "2 chunks + 1 index: {gc}");
    assert!(
        gc["kept_locked"]["bytes"].as_u64().unwrap() > 2 << 20,
        "{gc}"
    );
    assert!(
        unix(gc["kept_locked"]["earliest_expiry"].as_str().unwrap()) >= t0 + 40,
        "{gc}"
    );
    assert_eq!(chunk_files(&root), chunks[2]);

    // An hour later (ferry's clock), retention has passed: prune and GC delete for good.
    let plan = ferry_json(
        &["prune", "--repo", &repo, "--keep-last", "1"],
        &ahead(3600),
    );
    assert_eq!(decision(&plan, s2)["keep"], false, "{plan}");
    assert_eq!(decision(&plan, s3)["keep"], true, "{plan}");
    let gc = ferry_json(&["gc", "--repo", &repo, "--grace", "0"], &ahead(3600));
    assert_eq!(gc["deleted_chunks"], 4, "{gc}");
    assert_eq!(gc["kept_locked"]["count"], 0, "{gc}");
    assert_eq!(gc["kept_locked"]["refused_by_store"], 0, "{gc}");
    // What is left is exactly restore point 3 (+ config, key slot, catalog), still flagged.
    let left = flags(&root);
    let keys: BTreeSet<&str> = left.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(chunk_files(&root).len(), 4, "{keys:?}");
    for (key, immutable) in &left {
        assert!(
            !key.contains(s1.as_str()) && !key.contains(s2.as_str()),
            "a deleted restore point's object is left: {key}"
        );
        assert!(
            !key.starts_with("retention/"),
            "expired ledger segment left: {key}"
        );
        assert_eq!(*immutable, !key.starts_with("catalog/"), "{key}");
    }
    assert!(keys.contains(format!("snapshots/{s3}/manifest").as_str()));

    // Restore point 3 still restores to the same bytes (qemu-img compares).
    let out = dir.path().join("restored.raw");
    ferry_ok(
        &[
            "restore",
            "--repo",
            &repo,
            s3,
            "--disk",
            "disk0",
            "--to",
            out.to_str().unwrap(),
        ],
        &env(),
    );
    ferry_testkit::qemu_img_compare(&disk, "raw", &out, "raw");
}

#[test]
fn init_refuses_where_the_flag_cannot_be_set() {
    let dir = ferry_testkit::scratch_dir();
    let _unflag = Unflag(dir.path().to_path_buf());
    let ferry_bin = env!("CARGO_BIN_EXE_ferry");
    let init = |repo: &Path| {
        vec![
            "repo".to_string(),
            "init".into(),
            "--repo".into(),
            repo.to_string_lossy().into_owned(),
            "--immutable-days".into(),
            "7".into(),
        ]
    };
    let check_refused = |out: Output, needle: &str, repo: &Path| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "init succeeded: {err}");
        assert!(err.contains(needle), "`{needle}` not in: {err}");
        // Nothing written: no config, no probe file.
        let left: Vec<_> = std::fs::read_dir(repo)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left behind: {left:?}");
    };

    // A file system without inode flags: ramfs, mounted in a private mount namespace.
    let ram = dir.path().join("ramfs");
    std::fs::create_dir(&ram).unwrap();
    let script = format!(
        "mount -t ramfs none '{}' && exec \"$0\" \"$@\"",
        ram.display()
    );
    let out = Command::new(system_tool("unshare"))
        .args(["--mount", "sh", "-c", &script, ferry_bin])
        .args(init(&ram.join("r")))
        .env("FERRY_PASSWORD", PW)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "init on ramfs succeeded: {err}");
    assert!(
        err.contains("does not support the inode immutable flag"),
        "{err}"
    );

    // S3's lock modes mean nothing to the flag.
    let modes = dir.path().join("modes");
    let mut args = init(&modes);
    args.extend(["--lock-mode".to_string(), "governance".into()]);
    let out = ferry(&args.iter().map(String::as_str).collect::<Vec<_>>(), &env());
    check_refused(out, "--lock-mode applies to S3 Object Lock only", &modes);

    // A process without CAP_LINUX_IMMUTABLE (root minus that one capability).
    let nocap = dir.path().join("nocap");
    let out = Command::new(system_tool("setpriv"))
        .args([
            "--inh-caps=-linux_immutable",
            "--bounding-set=-linux_immutable",
            ferry_bin,
        ])
        .args(init(&nocap))
        .env("FERRY_PASSWORD", PW)
        .output()
        .unwrap();
    check_refused(out, "CAP_LINUX_IMMUTABLE", &nocap);

    // tmpfs: the probe asks the kernel. Since Linux 6.0 tmpfs keeps the flag, so init there
    // succeeds exactly when `chattr +i` does.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let tmp = tempfile::Builder::new()
            .prefix("ferry-hardened-")
            .tempdir_in(shm)
            .unwrap();
        let _unflag_shm = Unflag(tmp.path().to_path_buf());
        let probe = tmp.path().join("probe");
        std::fs::write(&probe, b"x").unwrap();
        let chattr_ok = Command::new(system_tool("chattr"))
            .arg("+i")
            .arg(&probe)
            .output()
            .unwrap()
            .status
            .success();
        let _ = Command::new(system_tool("chattr"))
            .arg("-i")
            .arg(&probe)
            .status();
        let r = tmp.path().join("r");
        let out = ferry(
            &init(&r).iter().map(String::as_str).collect::<Vec<_>>(),
            &env(),
        );
        if chattr_ok {
            assert!(
                out.status.success(),
                "chattr +i works on tmpfs but init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            check_refused(out, "does not support the inode immutable flag", &r);
        }
    }
}
