//! One conformance suite, run against every backend: memory, local filesystem, S3 (moto) and
//! Azure Blob (Azurite).

mod common;

use common::*;
use ferry_core::Secret;
use ferry_core::block::read_all;
use ferry_repo::{Created, GcOptions, RepoError, Repository, Retention, Store, VerifyOptions};
use std::sync::Arc;
use std::time::Duration;

async fn suite(make: impl Fn(&str) -> Store, expect_cas: bool) {
    let pw = Secret::new("s3cret pass");
    // init, double init, passwords
    let store = make("main");
    let repo = Repository::init(store.clone(), Some(&pw), init_opts())
        .await
        .unwrap();
    let err = Repository::init(store.clone(), Some(&pw), init_opts())
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::AlreadyInitialized { .. }), "{err}");
    let err = Repository::open(store.clone(), Some(&Secret::new("wrong")))
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::WrongPassword { .. }), "{err}");
    assert!(err.to_string().contains("wrong password"), "{err}");
    let err = Repository::open(store.clone(), None).await.unwrap_err();
    assert!(matches!(err, RepoError::PasswordRequired { .. }), "{err}");
    let second = Secret::new("second password");
    repo.add_password(&second, ferry_repo::KdfParams::insecure_fast())
        .await
        .unwrap();
    Repository::open(store.clone(), Some(&second))
        .await
        .unwrap();
    let repo = Repository::open(store.clone(), Some(&pw)).await.unwrap();

    // Conditional create is what makes objects write-once: every backend must honour it.
    assert_eq!(
        store.create("probe/x", &b"1"[..]).await.unwrap(),
        Created::Written
    );
    assert_eq!(
        store.create("probe/x", &b"2"[..]).await.unwrap(),
        Created::AlreadyExists
    );
    assert_eq!(&store.get("probe/x").await.unwrap()[..], b"1");
    store.delete("probe/x").await.unwrap();
    // Compare-and-swap on the ETag takes over an expired GC lock.
    store.create("probe/cas", &b"1"[..]).await.unwrap();
    let (_, v1) = store.get_with_meta("probe/cas").await.unwrap();
    match store.replace_if("probe/cas", &v1, &b"2"[..]).await.unwrap() {
        Some(swapped) => {
            assert!(
                expect_cas && swapped,
                "CAS with the current version must succeed"
            );
            assert_eq!(
                store.replace_if("probe/cas", &v1, &b"3"[..]).await.unwrap(),
                Some(false),
                "stale version"
            );
            assert_eq!(&store.get("probe/cas").await.unwrap()[..], b"2");
        }
        None => assert!(!expect_cas, "this store should support compare-and-swap"),
    }
    store.delete("probe/cas").await.unwrap();

    // A full backup: zero chunks, a short last chunk; restore is byte-identical.
    let cs = CHUNK as usize;
    let size = 10 * CHUNK + 1234;
    let mut disk = disk_data(1, size);
    disk[3 * cs..4 * cs].fill(0);
    let m1 = backup(&repo, "vm-a", &[("disk0", &disk)], None).await;
    assert_eq!(m1.disks[0].zero_chunks, 1);
    let src = repo.open_disk(&m1.id, "disk0").await.unwrap();
    assert_eq!(read_all(src.as_ref()).await.unwrap(), disk);
    let alloc = src.allocated(0..size).await.unwrap();
    assert!(!alloc.intersects(3 * CHUNK..4 * CHUNK));
    assert_eq!(alloc.total_len(), size - CHUNK);
    let mut buf = vec![0u8; 100];
    src.read_at(CHUNK - 50, &mut buf).await.unwrap();
    assert_eq!(&buf[..], &disk[cs - 50..cs + 50]);

    // Incremental: one chunk changed; the rest reused from the previous index.
    let mut disk2 = disk.clone();
    disk2[5 * cs + 7] ^= 0xff;
    let m2 = backup(&repo, "vm-a", &[("disk0", &disk2)], Some(&[5])).await;
    assert_eq!(m2.disks[0].new_chunks, 1, "{:?}", m2.disks[0]);
    let src = repo.open_disk(&m2.id, "disk0").await.unwrap();
    assert_eq!(read_all(src.as_ref()).await.unwrap(), disk2);

    // Another VM with the same content: everything known from the catalog, nothing uploaded.
    let (m3, stats) = backup_with_stats(&repo, "vm-b", &[("disk0", &disk2)], None).await;
    assert_eq!(stats.uploaded, 0, "{stats:?}");
    assert_eq!(m3.disks[0].new_chunks, 0);

    // An interrupted backup is invisible; its uploads are reused by the next run.
    let before = repo.snapshot_ids().await.unwrap();
    {
        let w = repo.begin_backup(meta("vm-c")).await.unwrap();
        let d = w.add_disk("disk0", 4 * CHUNK, None).unwrap();
        for i in 0..4 {
            d.put_chunk(i, disk_data(77 + i, CHUNK).into())
                .await
                .unwrap();
        }
        drop(d);
        drop(w);
    }
    assert_eq!(repo.snapshot_ids().await.unwrap(), before);
    let again: Vec<u8> = (0..4).flat_map(|i| disk_data(77 + i, CHUNK)).collect();
    let (_, stats) = backup_with_stats(&repo, "vm-c", &[("disk0", &again)], None).await;
    // Nothing is stored twice: chunks published to the catalog are skipped outright, the
    // unpublished tail is caught by the conditional create.
    assert_eq!(stats.uploaded, 0, "{stats:?}");
    assert_eq!(stats.reused + stats.already_present, 4, "{stats:?}");

    let report = repo
        .verify(&VerifyOptions {
            snapshot: None,
            sample_percent: 100.0,
        })
        .await
        .unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.snapshots, 4);

    // Corrupt one chunk and delete another: verify names both and the restore points they
    // affect; restore fails naming the object instead of returning wrong bytes.
    let idx = repo.load_index(&m1, "disk0").await.unwrap();
    let victim = idx.chunks[0];
    let gone = idx.chunks[1];
    let mut bytes = store.get(&victim.object_key()).await.unwrap().to_vec();
    let n = bytes.len();
    bytes[n / 2] ^= 0x01;
    store.overwrite(&victim.object_key(), bytes).await.unwrap();
    store.delete(&gone.object_key()).await.unwrap();
    let report = repo
        .verify(&VerifyOptions {
            snapshot: None,
            sample_percent: 100.0,
        })
        .await
        .unwrap();
    let keys: Vec<&str> = report.bad.iter().map(|b| b.key.as_str()).collect();
    assert_eq!(report.bad.len(), 2, "{report:?}");
    assert!(
        keys.contains(&victim.object_key().as_str()) && keys.contains(&gone.object_key().as_str())
    );
    for b in &report.bad {
        assert!(
            b.snapshots.contains(&m1.id)
                && b.snapshots.contains(&m2.id)
                && b.snapshots.contains(&m3.id),
            "{b:?}"
        );
    }
    let src = repo.open_disk(&m1.id, "disk0").await.unwrap();
    let mut buf = vec![0u8; cs];
    let err = src.read_at(0, &mut buf).await.unwrap_err();
    assert!(err.to_string().contains(&victim.object_key()), "{err}");
    let err = src.read_at(CHUNK, &mut buf).await.unwrap_err();
    assert!(err.to_string().contains(&gone.object_key()), "{err}");

    // Prune keeps the newest per VM; GC frees exactly the chunks nobody references any more.
    let plan = repo
        .prune(
            Retention {
                last: 1,
                ..Default::default()
            },
            true,
        )
        .await
        .unwrap();
    assert_eq!(plan.iter().filter(|d| !d.keep).count(), 1, "{plan:?}");
    assert_eq!(
        repo.snapshot_ids().await.unwrap().len(),
        4,
        "dry run deletes nothing"
    );
    repo.prune(
        Retention {
            last: 1,
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();
    let ids = repo.snapshot_ids().await.unwrap();
    assert!(
        !ids.contains(&m1.id) && ids.contains(&m2.id),
        "{ids:?} m1={} m2={}",
        m1.id,
        m2.id
    );
    let gc = repo
        .gc(GcOptions {
            grace: Duration::ZERO,
            wait_for_backups: Duration::from_secs(30),
            dry_run: false,
        })
        .await
        .unwrap();
    // Only the original version of chunk 5 became unreferenced (chunks 0 and 1 are damaged but
    // still referenced by m2 and m3).
    assert_eq!(gc.deleted_chunks, 1, "{gc:?}");
    assert!(gc.freed_bytes > 0);
    let report = repo
        .verify(&VerifyOptions {
            snapshot: Some(m2.id.clone()),
            sample_percent: 100.0,
        })
        .await
        .unwrap();
    assert_eq!(report.bad.len(), 2, "{report:?}");
    let err = repo
        .verify(&VerifyOptions {
            snapshot: Some("nope".into()),
            sample_percent: 100.0,
        })
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::SnapshotNotFound { .. }));

    // After GC the catalog lists only what exists: a new backup of m1's content uploads the
    // collected version of chunk 5 and the chunk deleted behind the repository's back.
    let (_, stats) = backup_with_stats(&repo, "vm-d", &[("disk0", &disk)], None).await;
    assert_eq!(stats.uploaded, 2, "{stats:?}");
    let report = repo
        .verify(&VerifyOptions {
            snapshot: Some(m2.id.clone()),
            sample_percent: 100.0,
        })
        .await
        .unwrap();
    assert_eq!(report.bad.len(), 1, "{report:?}");

    // Unencrypted repositories must be asked for, and work without a password.
    let plain = make("plain");
    let opts = ferry_repo::InitOptions {
        encrypted: false,
        ..init_opts()
    };
    let repo = Repository::init(plain.clone(), None, opts).await.unwrap();
    let m = backup(&repo, "vm-p", &[("d", &disk)], None).await;
    let repo = Repository::open(plain.clone(), None).await.unwrap();
    assert_eq!(
        read_all(repo.open_disk(&m.id, "d").await.unwrap().as_ref())
            .await
            .unwrap(),
        disk
    );
    let err = Repository::init(make("enc-no-pw"), None, init_opts())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs a password"), "{err}");

    // A repository from a future format version is refused clearly.
    let mut cfg = plain.get("config").await.unwrap().to_vec();
    cfg[4] = 2;
    plain.overwrite("config", cfg).await.unwrap();
    let err = Repository::open(plain, None).await.unwrap_err();
    assert!(
        matches!(err, RepoError::UnsupportedVersion { found: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade ferry"), "{err}");

    // No repository at all.
    let err = Repository::open(make("empty"), Some(&pw))
        .await
        .unwrap_err();
    assert!(matches!(err, RepoError::NotARepository { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory() {
    let stores = std::sync::Mutex::new(std::collections::HashMap::new());
    suite(
        |name| {
            stores
                .lock()
                .unwrap()
                .entry(name.to_string())
                .or_insert_with(|| {
                    Store::new(
                        Arc::new(object_store::memory::InMemory::new()),
                        format!("memory:{name}"),
                    )
                })
                .clone()
        },
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    suite(
        |name| {
            let loc = if name == "plain" {
                format!("file://{}", dir.path().join(name).display())
            } else {
                dir.path().join(name).display().to_string()
            };
            Store::open(&loc, true).unwrap()
        },
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_moto() {
    let moto = ferry_testkit::Moto::start();
    let env = moto.env();
    suite(
        |name| Store::open_with(&format!("{}/repos/{name}", moto.url()), false, &env).unwrap(),
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_azurite() {
    let az = ferry_testkit::Azurite::start();
    let env = az.env();
    suite(
        |name| Store::open_with(&format!("{}/repos/{name}", az.url()), false, &env).unwrap(),
        true,
    )
    .await;
}

#[test]
fn bad_locations_are_refused() {
    for loc in ["s3://", "az://", "", "gs://bucket/x"] {
        let err = Store::open(loc, false).unwrap_err();
        assert!(
            matches!(err, RepoError::InvalidLocation { .. }),
            "{loc}: {err}"
        );
    }
}
