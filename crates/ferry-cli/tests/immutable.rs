//! Immutable repositories end to end through the `ferry` binary on moto with S3 Object Lock
//! (ADR 0075): init refused without Object Lock; every object locked when written; deleting a
//! locked version fails at the store; prune and GC keep what is under retention and report
//! it; after expiry they delete it for good; retention of reused chunks is extended once per
//! generation, not once per restore point. AWS's own SDK (`tests/s3_lock_probe.py`, boto3)
//! checks the store independently of ferry.

#[path = "common/immutability.rs"]
mod immutability;

use ferry_core::Secret;
use ferry_repo::{Repository, Store};
use immutability::{ferry, ferry_json, ferry_ok, make_disk, now, unix};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const PW: &str = "immutable test password";
const BUCKET: &str = "locked";

fn env_with(moto: &ferry_testkit::Moto, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = moto.env();
    env.push(("FERRY_PASSWORD".into(), PW.into()));
    for (k, v) in extra {
        env.push((k.to_string(), v.to_string()));
    }
    env
}

/// Runs the boto3 probe and returns its JSON answer.
fn probe(
    moto: &ferry_testkit::Moto,
    bucket: &str,
    cmd: &str,
    key: Option<&str>,
) -> serde_json::Value {
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "peer `python` (venv with boto3 from moto) not found: run tests/peers/install.sh"
    );
    let mut c = Command::new(python);
    c.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/s3_lock_probe.py"
    ))
    .args([bucket, cmd])
    .args(key)
    .envs(moto.env());
    let out = ferry_testkit::run_ok(&mut c);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("probe {cmd}: {e}: {out}"))
}

/// Number of `PutObjectRetention` requests moto has answered so far (from its request log).
fn retention_calls(moto: &ferry_testkit::Moto) -> usize {
    moto.log()
        .lines()
        .filter(|l| l.contains("\"PUT /") && l.contains("?retention"))
        .count()
}

fn backup(repo: &str, disk: &Path, env: &[(String, String)]) -> String {
    ferry_ok(
        &[
            "backup",
            "--repo",
            repo,
            "--vm",
            "vm-1",
            "--disk",
            disk.to_str().unwrap(),
        ],
        env,
    )
    .trim()
    .to_string()
}

/// The chunk keys a restore point references, read with the library.
fn chunk_keys(moto: &ferry_testkit::Moto, repo: &str, id: &str) -> BTreeSet<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open_with(repo, false, &moto.env()).unwrap();
        let r = Repository::open(store, Some(&Secret::new(PW)))
            .await
            .unwrap();
        let m = r.load_manifest(id).await.unwrap();
        let mut out = BTreeSet::new();
        for d in &m.disks {
            let idx = r.load_index(&m, &d.name).await.unwrap();
            out.extend(
                idx.chunks
                    .iter()
                    .filter(|c| !c.is_zero())
                    .map(|c| c.object_key()),
            );
        }
        out
    })
}

#[test]
fn init_is_refused_without_object_lock() {
    let moto = ferry_testkit::Moto::start();
    let env = env_with(&moto, &[]);
    // moto's default bucket has no Object Lock.
    let out = ferry(
        &[
            "repo",
            "init",
            "--repo",
            &moto.url(),
            "--immutable-days",
            "30",
        ],
        &env,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Object Lock"), "{err}");
    assert!(err.contains(moto.bucket()), "error names the bucket: {err}");
    // Nothing was written: a plain repository can still be made there.
    ferry_ok(&["repo", "init", "--repo", &moto.url()], &env);

    // (A local directory can be hardened with the inode flag instead: tests/hardened.rs.)

    // Azure immutability is not implemented (Azurite cannot emulate it): refused, and says so.
    let az = ferry_testkit::Azurite::start();
    let mut az_env = az.env();
    az_env.push(("FERRY_PASSWORD".into(), PW.into()));
    let out = ferry(
        &["repo", "init", "--repo", &az.url(), "--immutable-days", "7"],
        &az_env,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Azure immutability policies are not implemented"),
        "{err}"
    );
    let out = ferry(&["repo", "info", "--repo", &az.url()], &az_env);
    assert!(!out.status.success(), "nothing was created on Azure");
}

#[test]
fn locked_objects_survive_prune_and_gc_until_they_expire() {
    let moto = ferry_testkit::Moto::start();
    probe(&moto, BUCKET, "create-lock-bucket", None);
    let repo = format!("s3://{BUCKET}");
    let env = env_with(&moto, &[]);
    // 40 s retention, 10 s generations: objects are locked 50–60 s, time enough for the checks
    // below on a loaded box.
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
            "--lock-mode",
            "governance",
        ],
        &env,
    );
    let info = ferry_json(&["repo", "info", "--repo", &repo], &env);
    assert_eq!(info["immutability"]["mode"], "governance");
    assert_eq!(info["immutability"]["retention-secs"], 40);

    let dir = ferry_testkit::scratch_dir();
    let disk = dir.path().join("disk0.raw");
    let t0 = now();
    let mut snaps = Vec::new();
    for seed in 1..=3 {
        make_disk(&disk, seed);
        snaps.push(backup(&repo, &disk, &env));
    }
    let (s1, s2, s3) = (&snaps[0], &snaps[1], &snaps[2]);
    let c1 = chunk_keys(&moto, &repo, s1);
    let c2 = chunk_keys(&moto, &repo, s2);
    let c3 = chunk_keys(&moto, &repo, s3);
    let only_s1: BTreeSet<String> = c1
        .difference(&c2)
        .filter(|k| !c3.contains(*k))
        .cloned()
        .collect();
    let only_s2: BTreeSet<String> = c2
        .difference(&c1)
        .filter(|k| !c3.contains(*k))
        .cloned()
        .collect();
    assert_eq!((only_s1.len(), only_s2.len(), c3.len()), (2, 2, 4));

    // Every data object is locked in governance mode for at least the retention.
    let manifest1 = format!("snapshots/{s1}/manifest");
    for key in [
        manifest1.as_str(),
        "config",
        only_s1.first().unwrap().as_str(),
    ] {
        let l = probe(&moto, BUCKET, "lock", Some(key));
        assert_eq!(l["mode"], "GOVERNANCE", "{key}: {l}");
        assert!(l["until"].as_i64().unwrap() >= t0 + 40, "{key}: {l}");
    }
    // The store itself refuses to delete a locked version (chunk, manifest, config).
    for key in [
        only_s1.first().unwrap().as_str(),
        manifest1.as_str(),
        "config",
    ] {
        let r = probe(&moto, BUCKET, "delete-version", Some(key));
        assert_eq!(r["result"], "denied", "{key}: {r}");
    }

    // An administrator removes restore point 1 early (governance bypass): its own chunks
    // become unreferenced but stay locked.
    assert_eq!(
        probe(&moto, BUCKET, "bypass-delete", Some(&manifest1))["result"],
        "deleted"
    );

    // Prune keeps restore point 2 (retention), GC keeps restore point 1's chunks.
    let plan = ferry_json(&["prune", "--repo", &repo, "--keep-last", "1"], &env);
    let d2 = plan
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == s2.as_str())
        .unwrap();
    assert_eq!(d2["keep"], true, "{plan}");
    assert!(
        d2["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "immutable"),
        "{plan}"
    );
    let s2_until = unix(d2["locked_until"].as_str().unwrap());
    let gc = ferry_json(&["gc", "--repo", &repo, "--grace", "0"], &env);
    assert_eq!(gc["deleted_chunks"], 0, "{gc}");
    // Two chunks and the orphaned index of restore point 1.
    assert_eq!(gc["kept_locked"]["count"], 3, "{gc}");
    assert!(
        gc["kept_locked"]["bytes"].as_u64().unwrap() > 2 << 20,
        "{gc}"
    );
    let earliest = unix(gc["kept_locked"]["earliest_expiry"].as_str().unwrap());
    assert!(earliest >= t0 + 40, "{gc}");
    for k in &only_s1 {
        assert_eq!(
            probe(&moto, BUCKET, "versions", Some(k))["versions"],
            1,
            "{k}"
        );
    }

    // A proxy whose clock runs an hour ahead thinks everything expired: the store refuses.
    assert!(
        now() + 5 < earliest,
        "this machine is too slow for the test: the locks expire before the next step"
    );
    let ahead = env_with(&moto, &[("FERRY_CLOCK_OFFSET_SECS", "3600")]);
    let gc = ferry_json(&["gc", "--repo", &repo, "--grace", "0"], &ahead);
    assert_eq!(gc["deleted_chunks"], 0, "{gc}");
    assert!(
        gc["kept_locked"]["refused_by_store"].as_u64().unwrap() >= 2,
        "{gc}"
    );
    let plan = ferry_json(&["prune", "--repo", &repo, "--keep-last", "1"], &ahead);
    let d2 = plan
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == s2.as_str())
        .unwrap();
    assert_eq!(d2["keep"], true, "{plan}");
    let listed = ferry_json(&["snapshots", "--repo", &repo], &env);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");

    // After expiry, prune and GC delete for good (no version left behind).
    let wait = s2_until.max(earliest + 10) + 1 - now();
    if wait > 0 {
        std::thread::sleep(std::time::Duration::from_secs(wait as u64));
    }
    let plan = ferry_json(&["prune", "--repo", &repo, "--keep-last", "1"], &env);
    let d2 = plan
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == s2.as_str())
        .unwrap();
    assert_eq!(d2["keep"], false, "{plan}");
    let gc = ferry_json(&["gc", "--repo", &repo, "--grace", "0"], &env);
    assert_eq!(gc["deleted_chunks"], 4, "{gc}");
    assert_eq!(gc["kept_locked"]["count"], 0, "{gc}");
    for k in only_s1.iter().chain(&only_s2) {
        assert_eq!(
            probe(&moto, BUCKET, "versions", Some(k))["versions"],
            0,
            "{k}"
        );
    }
    // The newest restore point is intact.
    let out = dir.path().join("restored.raw");
    make_disk(&disk, 3);
    ferry_ok(
        &[
            "restore",
            "--repo",
            &repo,
            s3,
            "--to",
            out.to_str().unwrap(),
        ],
        &env,
    );
    ferry_testkit::qemu_img_compare(&disk, "raw", &out, "raw");
    ferry_ok(&["verify", "--repo", &repo], &env);
}

#[test]
fn retention_is_extended_once_per_generation() {
    let moto = ferry_testkit::Moto::start();
    probe(&moto, BUCKET, "create-lock-bucket", None);
    let repo = format!("s3://{BUCKET}");
    let env = env_with(&moto, &[]);
    // 60 s retention, 30 s generations.
    ferry_ok(
        &[
            "repo",
            "init",
            "--repo",
            &repo,
            "--immutable-seconds",
            "60",
            "--generation-seconds",
            "30",
        ],
        &env,
    );
    let dir = ferry_testkit::scratch_dir();
    let disk = dir.path().join("disk0.raw");
    std::fs::write(&disk, ferry_testkit::noise(4 << 20, 7)).unwrap();
    // Three restore points in one generation: chunks were locked when written, long enough.
    let mut snaps = Vec::new();
    for _ in 0..3 {
        snaps.push(backup(&repo, &disk, &env));
        assert_eq!(
            retention_calls(&moto),
            0,
            "no extension within a generation"
        );
    }
    // Two more, with the clock two generations later: one batch extends the 4 chunks plus
    // `config` and the key slot; the next restore point finds them fresh in the ledger.
    let later = env_with(&moto, &[("FERRY_CLOCK_OFFSET_SECS", "130")]);
    snaps.push(backup(&repo, &disk, &later));
    let after_first_batch = retention_calls(&moto);
    assert_eq!(after_first_batch, 4 + 2, "{}", moto.log());
    snaps.push(backup(&repo, &disk, &later));
    assert_eq!(retention_calls(&moto), after_first_batch);
    // Bounded by generations × objects, not chunks × restore points (4 × 5 = 20).
    let chunks = chunk_keys(&moto, &repo, &snaps[4]);
    assert_eq!(chunks.len(), 4);
    assert!(retention_calls(&moto) <= 2 * (chunks.len() + 2));
    // The extension really moved the lock: at least (offset + retention) from now.
    for k in &chunks {
        let l = probe(&moto, BUCKET, "lock", Some(k));
        assert_eq!(l["mode"], "COMPLIANCE", "{l}");
        assert!(
            l["until"].as_i64().unwrap() >= now() + 130 + 60 - 5,
            "{k}: {l}"
        );
    }
}

/// Azure immutability cannot be tested against Azurite (ADR 0104): this pins what Azurite
/// 3.37 does with version-level WORM, asked through the official SDK, so the day it emulates
/// any of it this test fails and says what to implement and test.
#[test]
fn azurite_does_not_emulate_version_level_worm() {
    let az = ferry_testkit::Azurite::start();
    let python = ferry_testkit::peers_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "peer `python` (venv with azure-storage-blob) not found: run tests/peers/install.sh"
    );
    let out = ferry_testkit::run_ok(
        std::process::Command::new(python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/az_worm_probe.py"
            ))
            .arg(az.connection_string()),
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let emulates = "Azurite now emulates version-level WORM: implement Azure immutability in \
                    ferry-repo's Azure backend and test it here (docs/immutability.md)";
    // Accepted and ignored: the headers on Put Blob and container creation.
    assert_eq!(
        v["create_container_with_versioning_worm"]["ok"], true,
        "{v}"
    );
    assert_eq!(v["put_with_policy"]["ok"], true, "{v}");
    assert!(
        v["container_worm_flag"]["ok"].is_null() || v["container_worm_flag"]["ok"] == false,
        "{emulates}: {v}"
    );
    let p = &v["properties"]["ok"];
    assert!(
        p["until"].is_null() && p["mode"].is_null() && p["version_id"].is_null(),
        "{emulates}: {v}"
    );
    assert!(
        p["legal_hold"].is_null() || p["legal_hold"] == false,
        "{emulates}: {v}"
    );
    // Not enforced: the "locked" blob deletes.
    assert_eq!(v["delete_locked"]["ok"], true, "{emulates}: {v}");
    // Not implemented: the calls that set retention and legal hold on an existing blob.
    for call in ["set_immutability_policy", "set_legal_hold"] {
        let e = v[call]["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{emulates}: {v}"));
        assert!(e.contains("not implemented"), "{call}: {e}");
    }
}
