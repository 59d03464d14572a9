//! Helpers shared by the integration tests.
#![allow(dead_code)]

use ferry_core::vm::{ConsistencyLevel, HypervisorKind, VmConfig};
use ferry_repo::{
    InitOptions, KdfParams, Manifest, Repository, SnapshotMeta, StatsSnapshot, VmIdentity, testdata,
};

/// Chunk size of test repositories (small, so tests stay quick).
pub const CHUNK: u64 = 64 << 10;

pub fn init_opts() -> InitOptions {
    InitOptions {
        chunk_size: CHUNK as u32,
        kdf: KdfParams::insecure_fast(),
        ..Default::default()
    }
}

pub fn meta(vm: &str) -> SnapshotMeta {
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

/// Compressible, distinct per seed.
pub fn disk_data(seed: u64, size: u64) -> Vec<u8> {
    testdata::compressible(seed, size as usize)
}

/// Backs up `disks`. With `changed`, only those chunks are read and the rest reuse the previous
/// index (a changed-block backup); otherwise every chunk is put.
pub async fn backup_with_stats(
    repo: &Repository,
    vm: &str,
    disks: &[(&str, &[u8])],
    changed: Option<&[u64]>,
) -> (Manifest, StatsSnapshot) {
    let w = repo.begin_backup(meta(vm)).await.unwrap();
    let mut writers = Vec::new();
    for (name, data) in disks {
        let d = w
            .add_disk(name, data.len() as u64, Some(format!("token-{name}")))
            .unwrap();
        let prev = w.previous_index(name).await.unwrap();
        for i in 0..d.chunk_count() {
            let r = d.chunk_range(i);
            match (changed, &prev) {
                (Some(ch), Some(p)) if !ch.contains(&i) => {
                    d.reuse_chunk(i, p.chunks[i as usize]).unwrap()
                }
                _ => {
                    let bytes = data[r.start as usize..r.end as usize].to_vec();
                    d.put_chunk(i, bytes.into()).await.unwrap();
                }
            }
        }
        writers.push(d);
    }
    let stats = w.stats();
    (w.commit(writers).await.unwrap(), stats)
}

pub async fn backup(
    repo: &Repository,
    vm: &str,
    disks: &[(&str, &[u8])],
    changed: Option<&[u64]>,
) -> Manifest {
    backup_with_stats(repo, vm, disks, changed).await.0
}
