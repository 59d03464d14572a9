//! Crash test: a real writer process is SIGKILLed mid-backup. The repository stays valid (no
//! visible restore point, verify passes) and the re-run uploads only the chunks that are missing.

mod common;

use common::*;
use ferry_core::Secret;
use ferry_core::block::read_all;
use ferry_repo::{Repository, Store, VerifyOptions, testdata};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const WRITER: &str = env!("CARGO_BIN_EXE_ferry-repo-writer");

fn stored_chunks(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for sub in std::fs::read_dir(dir.join("chunks")).unwrap() {
        for f in std::fs::read_dir(sub.unwrap().path()).unwrap() {
            // Ignore the local store's staging files of an interrupted write.
            if !f.unwrap().file_name().to_string_lossy().contains('#') {
                n += 1;
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_backup_then_resume() {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().display().to_string();
    let pw = Secret::new("crash-pw");
    Repository::init(Store::open(&loc, true).unwrap(), Some(&pw), init_opts())
        .await
        .unwrap();

    let chunks = 200u64;
    let size = chunks * CHUNK;
    let seed = 4242;
    let mut child = Command::new(WRITER)
        .args([&loc, "vm-crash", &size.to_string(), &seed.to_string(), "20"])
        .env("FERRY_PASSWORD", pw.expose())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut lines = stderr.lines();
    loop {
        let line = lines.next().expect("writer exited early").unwrap();
        if line == "progress 90" {
            break;
        }
        assert!(line.starts_with("progress"), "writer said: {line}");
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success());

    let repo = Repository::open(Store::open(&loc, false).unwrap(), Some(&pw))
        .await
        .unwrap();
    assert!(
        repo.snapshot_ids().await.unwrap().is_empty(),
        "no restore point is visible"
    );
    let v = repo
        .verify(&VerifyOptions {
            snapshot: None,
            sample_percent: 100.0,
        })
        .await
        .unwrap();
    assert!(v.ok(), "{v:?}");
    let before = stored_chunks(dir.path());
    assert!(
        before >= 60,
        "about 90 chunks were written before the kill, found {before}"
    );

    let expected: Vec<u8> = (0..chunks)
        .flat_map(|i| testdata::disk_chunk(seed, i, CHUNK as usize))
        .collect();
    let nonzero = (0..chunks)
        .filter(|i| {
            !testdata::disk_chunk(seed, *i, CHUNK as usize)
                .iter()
                .all(|b| *b == 0)
        })
        .count();
    let out = Command::new(WRITER)
        .args([&loc, "vm-crash", &size.to_string(), &seed.to_string()])
        .env("FERRY_PASSWORD", pw.expose())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let uploaded = json["stats"]["uploaded"].as_u64().unwrap() as usize;
    assert_eq!(
        uploaded,
        nonzero - before,
        "re-run uploads exactly the missing chunks: {json}"
    );
    assert_eq!(stored_chunks(dir.path()), nonzero);

    let v = repo
        .verify(&VerifyOptions {
            snapshot: None,
            sample_percent: 100.0,
        })
        .await
        .unwrap();
    assert!(v.ok() && v.snapshots == 1, "{v:?}");
    let id = json["snapshot"].as_str().unwrap();
    let got = read_all(repo.open_disk(id, "disk0").await.unwrap().as_ref())
        .await
        .unwrap();
    assert!(got == expected, "restored disk differs");
}
