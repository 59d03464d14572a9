//! Two writers and a garbage collection at the same time: both backups succeed, GC never
//! deletes a chunk either of them references, and afterwards everything verifies and restores.

mod common;

use common::*;
use ferry_core::Secret;
use ferry_core::block::read_all;
use ferry_repo::{GcOptions, Repository, Retention, Store, Timing, VerifyOptions};
use std::time::Duration;

async fn slow_backup(repo: Repository, vm: &'static str, data: Vec<u8>) -> ferry_repo::Manifest {
    let w = repo.begin_backup(meta(vm)).await.unwrap();
    let d = w.add_disk("disk0", data.len() as u64, None).unwrap();
    for i in 0..d.chunk_count() {
        let r = d.chunk_range(i);
        d.put_chunk(i, data[r.start as usize..r.end as usize].to_vec().into())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    w.commit(vec![d]).await.unwrap()
}

async fn run(store: Store) {
    let pw = Secret::new("pw");
    let timing = Timing {
        lease_ttl: Duration::from_secs(5),
        backup_wait: Duration::from_secs(60),
    };
    let repo = Repository::init(store, Some(&pw), init_opts())
        .await
        .unwrap()
        .with_timing(timing);
    // Old restore points: after pruning the first, its 16 chunks are unreferenced but still in
    // the catalog, so a new backup may reuse them while GC wants to collect them.
    let old = disk_data(100, 16 * CHUNK);
    backup(&repo, "vm-old", &[("disk0", &old)], None).await;
    backup(
        &repo,
        "vm-old",
        &[("disk0", &disk_data(101, 4 * CHUNK))],
        None,
    )
    .await;
    repo.prune(
        Retention {
            last: 1,
            ..Default::default()
        },
        false,
    )
    .await
    .unwrap();

    // Writer 1 reuses the first half of the orphaned chunks; writer 2 writes new data.
    let reuse = old[..8 * CHUNK as usize].to_vec();
    let fresh = disk_data(200, 12 * CHUNK);
    let w1 = tokio::spawn(slow_backup(repo.clone(), "vm-1", reuse.clone()));
    let w2 = tokio::spawn(slow_backup(repo.clone(), "vm-2", fresh.clone()));
    tokio::time::sleep(Duration::from_millis(40)).await;
    let gc = {
        let repo = repo.clone();
        tokio::spawn(async move {
            repo.gc(GcOptions {
                grace: Duration::ZERO,
                wait_for_backups: Duration::from_secs(60),
                dry_run: false,
            })
            .await
        })
    };
    let (m1, m2) = (w1.await.unwrap(), w2.await.unwrap());
    let report = gc.await.unwrap().unwrap();
    // GC ran after both backups: it kept the reused half and collected the other half.
    assert_eq!(report.deleted_chunks, 8, "{report:?}");

    // A backup started while GC holds its lock waits for it instead of failing.
    let gc2 = {
        let repo = repo.clone();
        tokio::spawn(async move {
            repo.gc(GcOptions {
                grace: Duration::ZERO,
                wait_for_backups: Duration::from_secs(60),
                dry_run: false,
            })
            .await
        })
    };
    let m3 = slow_backup(repo.clone(), "vm-3", old.clone()).await;
    gc2.await.unwrap().unwrap();

    let v = repo
        .verify(&VerifyOptions {
            snapshot: None,
            sample_percent: 100.0,
        })
        .await
        .unwrap();
    assert!(v.ok(), "{v:?}");
    for (m, data) in [(&m1, &reuse), (&m2, &fresh), (&m3, &old)] {
        let got = read_all(repo.open_disk(&m.id, "disk0").await.unwrap().as_ref())
            .await
            .unwrap();
        assert!(got == *data, "restore point {} differs", m.id);
    }
    assert!(
        repo.store().list("locks").await.unwrap().is_empty(),
        "every lease released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_and_gc_local_fs() {
    let dir = tempfile::tempdir().unwrap();
    run(Store::open(dir.path().to_str().unwrap(), true).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_and_gc_s3() {
    let moto = ferry_testkit::Moto::start();
    run(Store::open_with(&format!("{}/conc", moto.url()), false, &moto.env()).unwrap()).await;
}
