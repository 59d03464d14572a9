//! End-to-end tests of `ferry repo`, `snapshots`, `verify`, `prune` and `gc` on a local
//! repository and on S3 (moto).

use ferry_core::Secret;
use ferry_core::vm::{ConsistencyLevel, HypervisorKind, VmConfig};
use ferry_repo::{Repository, SnapshotMeta, Store, VmIdentity, testdata};
use std::process::{Command, Output};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const PW: &str = "cli test password";

fn ferry(repo: &str, password: Option<&str>, env: &[(String, String)], args: &[&str]) -> Output {
    let mut c = Command::new(FERRY);
    c.args(args)
        .env("FERRY_REPO", repo)
        .env_remove("FERRY_PASSWORD")
        .envs(env.iter().cloned());
    if let Some(p) = password {
        c.env("FERRY_PASSWORD", p);
    }
    c.output().expect("run ferry")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "ferry failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Writes a restore point of generated data through the library (no backup command yet).
fn write_snapshot(repo: &str, env: &[(String, String)], vm: &str, seed: u64) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open_with(repo, false, env).unwrap();
        let repo = Repository::open(store, Some(&Secret::new(PW)))
            .await
            .unwrap();
        let w = repo
            .begin_backup(SnapshotMeta {
                vm: VmIdentity {
                    id: vm.into(),
                    name: vm.into(),
                },
                source: "cli-test".into(),
                hypervisor: HypervisorKind::Xen,
                consistency: ConsistencyLevel::Application,
                config: VmConfig::default(),
                native_config: None,
                transport: None,
                labels: Default::default(),
            })
            .await
            .unwrap();
        let d = w.add_disk("disk0", 5 * (64 << 10) + 17, None).unwrap();
        for i in 0..d.chunk_count() {
            let r = d.chunk_range(i);
            d.put_chunk(
                i,
                testdata::disk_chunk(seed, i, (r.end - r.start) as usize).into(),
            )
            .await
            .unwrap();
        }
        w.commit(vec![d]).await.unwrap().id
    })
}

fn lifecycle(repo: &str, env: &[(String, String)]) {
    // Encryption needs a password unless explicitly declined.
    let out = ferry(repo, None, env, &["repo", "init", "--chunk-size", "64K"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("password is required"));
    ok(&ferry(
        repo,
        Some(PW),
        env,
        &["repo", "init", "--chunk-size", "64K"],
    ));

    let info: serde_json::Value = serde_json::from_str(&ok(&ferry(
        repo,
        Some(PW),
        env,
        &["repo", "info", "--json"],
    )))
    .unwrap();
    assert_eq!(info["chunk_size"], 65536);
    assert_eq!(info["encryption"], "aes-256-gcm");
    assert_eq!(info["snapshots"], 0);

    // Wrong password: one clear line on stderr, non-zero exit, nothing on stdout.
    let out = ferry(repo, Some("not it"), env, &["snapshots"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong password for repository"), "{err}");
    assert!(!err.contains(PW) && out.stdout.is_empty());

    let s1 = write_snapshot(repo, env, "vm-1", 1);
    let s2 = write_snapshot(repo, env, "vm-1", 2);
    let text = ok(&ferry(repo, Some(PW), env, &["snapshots"]));
    assert!(
        text.contains(&s1) && text.contains(&s2) && text.contains("application"),
        "{text}"
    );
    let list: serde_json::Value =
        serde_json::from_str(&ok(&ferry(repo, Some(PW), env, &["snapshots", "--json"]))).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["id"], s1.as_str());
    assert_eq!(list[0]["hypervisor"], "xen");

    let text = ok(&ferry(repo, Some(PW), env, &["verify"]));
    assert!(text.starts_with("OK: 2 restore points"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&ok(&ferry(
        repo,
        Some(PW),
        env,
        &["verify", "--sample", "50", "--json", &s1],
    )))
    .unwrap();
    assert_eq!(v["snapshots"], 1);

    let plan: serde_json::Value = serde_json::from_str(&ok(&ferry(
        repo,
        Some(PW),
        env,
        &["prune", "--keep-last", "1", "--dry-run", "--json"],
    )))
    .unwrap();
    let removed: Vec<&str> = plan
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == false)
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(removed, vec![s1.as_str()]);
    let out = ferry(repo, Some(PW), env, &["prune"]);
    assert!(!out.status.success(), "prune without rules must refuse");
    let text = ok(&ferry(repo, Some(PW), env, &["prune", "--keep-last", "1"]));
    assert!(text.contains(&format!("removed       {s1}")), "{text}");

    let gc: serde_json::Value = serde_json::from_str(&ok(&ferry(
        repo,
        Some(PW),
        env,
        &["gc", "--grace", "0", "--json"],
    )))
    .unwrap();
    assert!(gc["deleted_chunks"].as_u64().unwrap() > 0, "{gc}");
    assert!(gc["freed_bytes"].as_u64().unwrap() > 0, "{gc}");
    ok(&ferry(repo, Some(PW), env, &["verify"]));

    // A second password opens the repository too.
    let mut c = Command::new(FERRY);
    c.args(["repo", "add-password"])
        .env("FERRY_REPO", repo)
        .env("FERRY_PASSWORD", PW)
        .env("FERRY_NEW_PASSWORD", "other");
    ok(&c.envs(env.iter().cloned()).output().unwrap());
    ok(&ferry(repo, Some("other"), env, &["snapshots"]));
}

#[test]
fn repository_lifecycle_local() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo").display().to_string();
    lifecycle(&repo, &[]);

    // Corrupt one chunk file: verify fails naming it and the restore point.
    let chunks = dir.path().join("repo/chunks");
    // GC leaves empty fan-out directories behind: take the first chunk file found.
    let file = std::fs::read_dir(&chunks)
        .unwrap()
        .flat_map(|sub| std::fs::read_dir(sub.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .next()
        .expect("a chunk file");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[40] ^= 0x80;
    std::fs::write(&file, bytes).unwrap();
    let out = ferry(&repo, Some(PW), &[], &["verify"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let name = file.file_name().unwrap().to_string_lossy();
    assert!(
        text.contains(&format!("BAD chunks/{}/{name}", &name[..2])),
        "{text}"
    );
    assert!(text.contains("affects restore points"), "{text}");
}

#[test]
fn repository_lifecycle_s3() {
    let moto = ferry_testkit::Moto::start();
    lifecycle(&format!("{}/cli", moto.url()), &moto.env());
}

#[test]
fn unencrypted_repository_must_be_explicit() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().display().to_string();
    let out = ok(&ferry(
        &repo,
        None,
        &[],
        &[
            "repo",
            "init",
            "--insecure-no-encryption",
            "--compression-level",
            "-3",
        ],
    ));
    assert!(out.contains("NOT encrypted"), "{out}");
    let info: serde_json::Value =
        serde_json::from_str(&ok(&ferry(&repo, None, &[], &["repo", "info", "--json"]))).unwrap();
    assert_eq!(info["encryption"], "none");
    // Not the default (-1), so ignoring the flag would fail here; a level implies zstd.
    assert_eq!(info["compression_level"], -3);
    assert_eq!(info["compression"], "zstd");
}

/// New repositories compress with LZ4 unless told otherwise; the choice shows in `repo info`
/// and every method backs up and restores the same bytes.
#[test]
fn compression_methods() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let data = ferry_repo::testdata::compressible(3, 3 << 20);
    std::fs::write(&disk, &data).unwrap();
    let info_json = |repo: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&ferry(
            repo,
            Some(PW),
            &[],
            &["repo", "info", "--json"],
        )))
        .unwrap()
    };
    for (flags, method, human) in [
        (&[][..], "lz4", "compression:  lz4"),
        (
            &["--compression", "zstd"][..],
            "zstd",
            "compression:  zstd level -1",
        ),
        (&["--compression", "none"][..], "none", "compression:  none"),
    ] {
        let repo = dir.path().join(method).display().to_string();
        let mut args = vec!["repo", "init"];
        args.extend_from_slice(flags);
        ok(&ferry(&repo, Some(PW), &[], &args));
        let info = info_json(&repo);
        assert_eq!(info["compression"], method);
        assert!(ok(&ferry(&repo, Some(PW), &[], &["repo", "info"])).contains(human));
        let d = format!("disk0={}", disk.display());
        ok(&ferry(
            &repo,
            Some(PW),
            &[],
            &["backup", "--vm", "v", "--disk", &d],
        ));
        let info = info_json(&repo);
        let stored = info["chunk_bytes"].as_u64().unwrap();
        if method == "none" {
            assert!(stored > data.len() as u64, "{method}: {stored}");
        } else {
            assert!(stored < data.len() as u64 * 2 / 3, "{method}: {stored}");
        }
        let out = dir.path().join(format!("{method}.raw"));
        ok(&ferry(
            &repo,
            Some(PW),
            &[],
            &["restore", "v@latest", "--to", out.to_str().unwrap()],
        ));
        assert!(std::fs::read(&out).unwrap() == data, "{method}");
    }
    let repo = dir.path().join("bad").display().to_string();
    let out = ferry(
        &repo,
        Some(PW),
        &[],
        &[
            "repo",
            "init",
            "--compression",
            "lz4",
            "--compression-level",
            "3",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("applies to zstd only, not to --compression lz4"),
        "{out:?}"
    );
}
