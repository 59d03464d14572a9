//! The pipeline against an in-memory repository and in-memory or failing sources: what is
//! read, skipped, reused and uploaded; changed-block incrementals; trust-but-verify; restore
//! to raw files byte for byte; cancellation; bad input.

use async_trait::async_trait;
use ferry_core::vm::{ConsistencyLevel, HypervisorKind, VmConfig};
use ferry_core::{BlockError, BlockSource, ExtentMap, MemSource, Secret};
use ferry_engine::{
    BackupDisk, BackupMode, BackupOptions, EngineError, RestoreOptions, RestoreTo, UNTRUSTED_TOKEN,
    backup, restore_disk,
};
use ferry_image::OutputFormat;
use ferry_repo::{InitOptions, KdfParams, Repository, SnapshotMeta, Store, VmIdentity};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const CS: u64 = 64 << 10;

async fn repo() -> Repository {
    let store = Store::new(Arc::new(object_store::memory::InMemory::new()), "memory");
    let opts = InitOptions {
        chunk_size: CS as u32,
        kdf: KdfParams::insecure_fast(),
        ..Default::default()
    };
    Repository::init(store, Some(&Secret::new("pw")), opts)
        .await
        .unwrap()
}

fn meta(vm: &str) -> SnapshotMeta {
    SnapshotMeta {
        vm: VmIdentity {
            id: vm.into(),
            name: vm.into(),
        },
        source: "test".into(),
        hypervisor: HypervisorKind::Generic,
        consistency: ConsistencyLevel::Crash,
        config: VmConfig::default(),
        native_config: None,
        transport: None,
        labels: Default::default(),
    }
}

/// 40 chunks: data in 0..6, zeros (allocated) in 10..12, data in 20..22 + half of 30, holes
/// elsewhere; allocation reported at 4 KiB grain.
fn disk_v1() -> Vec<u8> {
    let mut d = vec![0u8; (40 * CS) as usize];
    d[..(6 * CS) as usize].copy_from_slice(&ferry_testkit::noise((6 * CS) as usize, 1));
    d[(20 * CS) as usize..(22 * CS) as usize]
        .copy_from_slice(&ferry_testkit::noise((2 * CS) as usize, 2));
    let h = (30 * CS) as usize;
    d[h..h + (CS / 2) as usize].copy_from_slice(&ferry_testkit::noise((CS / 2) as usize, 3));
    d
}

fn src(data: &[u8]) -> Arc<dyn BlockSource> {
    Arc::new(MemSource::new("mem", data.to_vec(), 4096))
}

/// A source that reports the zero range 10..12 as allocated too.
fn src_with_zero_alloc(data: &[u8]) -> Arc<dyn BlockSource> {
    let mut alloc = ExtentMap::new();
    for (i, cell) in data.chunks(4096).enumerate() {
        if cell.iter().any(|b| *b != 0) {
            alloc.insert(i as u64 * 4096..(i as u64 + 1) * 4096);
        }
    }
    alloc.insert(10 * CS..12 * CS);
    Arc::new(MemSource::with_allocation("mem", data.to_vec(), alloc))
}

fn disk(name: &str, s: Arc<dyn BlockSource>, changed: Option<ExtentMap>) -> BackupDisk {
    BackupDisk {
        name: name.into(),
        source: s,
        changed,
        change_token: Some("test-token".into()),
    }
}

fn opts() -> BackupOptions {
    BackupOptions {
        seed: Some(7),
        ..BackupOptions::default()
    }
}

async fn restore_bytes(repo: &Repository, snapshot: &str, disk: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    let m = repo.load_manifest(snapshot).await.unwrap();
    let r = restore_disk(
        repo,
        &m,
        disk,
        RestoreTo::File {
            path: out.clone(),
            format: OutputFormat::Raw,
        },
        &RestoreOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        r.size,
        m.disks.iter().find(|d| d.name == disk).unwrap().size
    );
    std::fs::read(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_backup_skips_holes_and_zeros_and_restores_exactly() {
    let repo = repo().await;
    let data = disk_v1();
    let r = backup(
        &repo,
        meta("vm"),
        vec![disk("d0", src_with_zero_alloc(&data), None)],
        &opts(),
    )
    .await
    .unwrap();
    let d = &r.disks[0];
    assert_eq!(d.mode, BackupMode::Full);
    assert_eq!(d.chunks, 40);
    // Only allocated 4 KiB cells are read: 6 + 2 chunks, half a chunk, 2 zero chunks.
    assert_eq!(d.read_bytes, 8 * CS + CS / 2 + 2 * CS);
    assert_eq!(d.zero_bytes, 2 * CS);
    assert_eq!(d.new_bytes, 9 * CS);
    assert_eq!(d.zero_bytes + d.new_bytes + d.reused_bytes, 11 * CS);
    assert_eq!(d.read_bytes + d.hole_bytes + d.unchanged_bytes, 40 * CS);
    assert!(d.uploaded_bytes > 0 && d.uploaded_bytes < 10 * CS);
    assert_eq!(restore_bytes(&repo, &r.snapshot, "d0").await, data);

    // Same data again without change tracking: everything read, nothing new uploaded.
    let r2 = backup(
        &repo,
        meta("vm"),
        vec![disk("d0", src(&data), None)],
        &opts(),
    )
    .await
    .unwrap();
    assert_eq!(r2.previous.as_deref(), Some(r.snapshot.as_str()));
    assert_eq!(r2.disks[0].new_bytes, 0);
    assert_eq!(r2.disks[0].uploaded_bytes, 0);
    assert_eq!(r2.disks[0].reused_bytes, 9 * CS);
    assert_eq!(restore_bytes(&repo, &r2.snapshot, "d0").await, data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_block_incremental_reads_only_changed_chunks() {
    let repo = repo().await;
    let v1 = disk_v1();
    let r1 = backup(&repo, meta("vm"), vec![disk("d0", src(&v1), None)], &opts())
        .await
        .unwrap();
    let mut v2 = v1.clone();
    // Guest writes: 100 bytes in chunk 3, a new 4 KiB in hole chunk 25.
    v2[(3 * CS + 10) as usize..(3 * CS + 110) as usize].fill(0xee);
    v2[(25 * CS) as usize..(25 * CS + 4096) as usize].fill(0x11);
    let mut changed = ExtentMap::new();
    changed.insert(3 * CS + 10..3 * CS + 110);
    changed.insert(25 * CS..25 * CS + 4096);
    let o = BackupOptions {
        verify_fraction: 0.1,
        ..opts()
    };
    let r2 = backup(
        &repo,
        meta("vm"),
        vec![disk("d0", src(&v2), Some(changed))],
        &o,
    )
    .await
    .unwrap();
    let d = &r2.disks[0];
    assert_eq!(d.mode, BackupMode::ChangedBlocks);
    assert_eq!(d.unchanged_bytes, 38 * CS);
    let v = d.verify.as_ref().unwrap();
    assert_eq!(v.sampled, 4, "10 % of 38 unchanged chunks, rounded up");
    assert!(v.mismatched_offsets.is_empty());
    // Read: chunk 3 whole + the 4 KiB of chunk 25 (the rest of it is a hole), plus the sample.
    assert!(d.read_bytes >= CS + 4096, "{d:?}");
    assert!(d.read_bytes <= CS + 4096 + 4 * CS, "{d:?}");
    assert_eq!(d.new_bytes, 2 * CS);
    assert!(!r2.cbt_mismatch);
    assert_eq!(restore_bytes(&repo, &r2.snapshot, "d0").await, v2);
    assert_eq!(restore_bytes(&repo, &r1.snapshot, "d0").await, v1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_change_tracking_is_caught_and_distrusted_next_time() {
    let repo = repo().await;
    let v1 = disk_v1();
    backup(&repo, meta("vm"), vec![disk("d0", src(&v1), None)], &opts())
        .await
        .unwrap();
    let mut v2 = v1.clone();
    v2[CS as usize..(CS + 512) as usize].fill(0x42); // change tracking misses this
    v2[(21 * CS) as usize] ^= 0xff; // and reports this one
    let changed = ExtentMap::from_range(21 * CS..21 * CS + 1);
    let o = BackupOptions {
        verify_fraction: 1.0,
        ..opts()
    };
    let r2 = backup(
        &repo,
        meta("vm"),
        vec![disk("d0", src(&v2), Some(changed.clone()))],
        &o,
    )
    .await
    .unwrap();
    let d = &r2.disks[0];
    assert!(r2.cbt_mismatch);
    assert_eq!(d.mode, BackupMode::FullCbtDistrusted);
    assert_eq!(d.verify.as_ref().unwrap().mismatched_offsets, vec![CS]);
    // The whole disk was read, so the restore point is right despite the broken tracking.
    assert_eq!(restore_bytes(&repo, &r2.snapshot, "d0").await, v2);
    let m = repo.load_manifest(&r2.snapshot).await.unwrap();
    assert_eq!(m.disks[0].change_token.as_deref(), Some(UNTRUSTED_TOKEN));

    // The next changed-block backup does not trust the tracking either, then trusts again.
    let r3 = backup(
        &repo,
        meta("vm"),
        vec![disk("d0", src(&v2), Some(ExtentMap::new()))],
        &o,
    )
    .await
    .unwrap();
    assert_eq!(r3.disks[0].mode, BackupMode::FullCbtDistrusted);
    assert_eq!(r3.disks[0].unchanged_bytes, 0);
    let r4 = backup(
        &repo,
        meta("vm"),
        vec![disk("d0", src(&v2), Some(ExtentMap::new()))],
        &opts(),
    )
    .await
    .unwrap();
    assert_eq!(r4.disks[0].mode, BackupMode::ChangedBlocks);
    assert_eq!(r4.disks[0].unchanged_bytes, 40 * CS);
    assert_eq!(restore_bytes(&repo, &r4.snapshot, "d0").await, v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_fraction_zero_reads_nothing_unchanged() {
    let repo = repo().await;
    let v1 = disk_v1();
    backup(&repo, meta("vm"), vec![disk("d0", src(&v1), None)], &opts())
        .await
        .unwrap();
    let o = BackupOptions {
        verify_fraction: 0.0,
        ..opts()
    };
    let r = backup(
        &repo,
        meta("vm"),
        vec![disk("d0", src(&v1), Some(ExtentMap::new()))],
        &o,
    )
    .await
    .unwrap();
    assert_eq!(r.disks[0].read_bytes, 0);
    assert_eq!(r.disks[0].verify.as_ref().unwrap().sampled, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_blocks_without_previous_read_everything() {
    let repo = repo().await;
    let v1 = disk_v1();
    let r = backup(
        &repo,
        meta("vm"),
        vec![disk("d0", src(&v1), Some(ExtentMap::new()))],
        &opts(),
    )
    .await
    .unwrap();
    assert_eq!(r.disks[0].mode, BackupMode::FullCbtDistrusted);
    assert_eq!(restore_bytes(&repo, &r.snapshot, "d0").await, v1);
}

/// Fails reads that touch `bad`; counts bytes read.
#[derive(Debug)]
struct Flaky {
    inner: MemSource,
    bad: Range<u64>,
    reads: AtomicU64,
}

#[async_trait]
impl BlockSource for Flaky {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn name(&self) -> String {
        "flaky-disk".into()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.reads.fetch_add(buf.len() as u64, Ordering::Relaxed);
        if offset < self.bad.end && offset + buf.len() as u64 > self.bad.start {
            return Err(BlockError::io(
                "flaky-disk",
                format!("read of {} bytes at offset {offset}", buf.len()),
                std::io::Error::from_raw_os_error(5),
            ));
        }
        self.inner.read_at(offset, buf).await
    }
    async fn allocated(&self, r: Range<u64>) -> Result<ExtentMap, BlockError> {
        self.inner.allocated(r).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_dies_fails_the_backup_and_leaves_nothing_visible() {
    let repo = repo().await;
    let s = Arc::new(Flaky {
        inner: MemSource::new("m", disk_v1(), 4096),
        bad: 21 * CS..21 * CS + 1,
        reads: AtomicU64::new(0),
    });
    let err = backup(&repo, meta("vm"), vec![disk("d0", s, None)], &opts())
        .await
        .unwrap_err();
    let text = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(matches!(err, EngineError::Source { .. }), "{err:?}");
    assert!(text.contains("d0") && text.contains("flaky-disk"), "{text}");
    assert!(text.contains(&format!("offset {}", 21 * CS)), "{text}");
    assert!(repo.snapshot_ids().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_leaves_no_restore_point() {
    let repo = repo().await;
    let o = BackupOptions {
        limit_rate: Some(64 << 10), // ~10 s for this disk: cancelled long before
        ..opts()
    };
    let cancel = o.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        cancel.cancel();
    });
    let err = backup(
        &repo,
        meta("vm"),
        vec![disk("d0", src(&disk_v1()), None)],
        &o,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, EngineError::Cancelled), "{err:?}");
    assert!(repo.snapshot_ids().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_rate_paces_the_source() {
    let repo = repo().await;
    let data = disk_v1(); // 8.5 chunks = 544 KiB of data
    let o = BackupOptions {
        limit_rate: Some(1 << 20),
        ..opts()
    };
    let t = std::time::Instant::now();
    backup(&repo, meta("vm"), vec![disk("d0", src(&data), None)], &o)
        .await
        .unwrap();
    let e = t.elapsed().as_secs_f64();
    assert!(e > 0.4, "544 KiB at 1 MiB/s took only {e:.2} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_disks_and_bad_options() {
    let repo = repo().await;
    let a = disk_v1();
    let b = ferry_testkit::noise((3 * CS + 100) as usize, 9); // size not a multiple of the chunk size
    let r = backup(
        &repo,
        meta("vm"),
        vec![disk("a", src(&a), None), disk("b", src(&b), None)],
        &opts(),
    )
    .await
    .unwrap();
    assert_eq!(r.disks.len(), 2);
    assert_eq!(restore_bytes(&repo, &r.snapshot, "a").await, a);
    assert_eq!(restore_bytes(&repo, &r.snapshot, "b").await, b);

    let err = backup(&repo, meta("vm"), vec![], &opts())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("at least one disk"), "{err}");
    let o = BackupOptions {
        verify_fraction: 2.0,
        ..opts()
    };
    let err = backup(&repo, meta("vm"), vec![disk("a", src(&a), None)], &o)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("between 0 and 1"), "{err}");
    let err = backup(
        &repo,
        meta("vm"),
        vec![disk("a", src(&a), None), disk("a", src(&a), None)],
        &opts(),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#?}").contains("added twice"), "{err:?}");
}
