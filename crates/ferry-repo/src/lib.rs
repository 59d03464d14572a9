//! Ferry's repository: deduplicated, encrypted, immutable-friendly restore points on object
//! storage (local filesystem, S3, Azure Blob, or memory for tests).
//!
//! # Design
//!
//! * **Chunks**: every disk is cut into fixed-size chunks aligned to disk offsets (size chosen at
//!   init, 1 MiB by default — see `docs/adr/0011-chunk-size.md`). A chunk's id is the keyed
//!   BLAKE3 hash of its plaintext (the key is derived from the secret master key, so an encrypted
//!   repository leaks no content hashes); its object is compressed (LZ4 by default, or zstd) when
//!   that helps and sealed
//!   with AES-256-GCM. All-zero chunks are never stored: the index holds a zero sentinel.
//! * **Restore points** are synthetic fulls: a manifest (VM identity, source, hypervisor,
//!   consistency, normalized and native VM config, per-disk change tokens) and per disk a fixed
//!   index of chunk ids. The manifest is written last, so a restore point is visible only when it
//!   is complete. No object is ever overwritten or renamed (leases under `locks/` excepted).
//! * **Dedup without a HEAD per chunk**: a backup knows which chunks exist from the catalog
//!   (segments under `catalog/`, each listing chunk ids stored by one backup, published every 64
//!   new chunks so an interrupted backup's uploads are reused) and from the previous index of
//!   the same disk.
//! * **Concurrency**: writers hold shared leases (`locks/backup-<id>`); GC holds the exclusive
//!   `locks/gc`. A writer registers its lease *then* checks for the GC lock; GC takes its lock
//!   *then* waits until no writer lease is live. Either order, one of them sees the other, so GC
//!   never sweeps while a backup might reference a chunk it considers unreferenced.
//! * **Copies** ([`Repository::begin_copy`]): a restore point of another repository is written
//!   under its own id and times; every chunk the copy stores is read back and authenticated
//!   before the catalog lists it (ADR 0061).
//!
//! The object formats and the protocol are specified in `docs/repository-format.md`.
//!
//! # Example (memory backend)
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use ferry_repo::{InitOptions, KdfParams, Repository, Store, SnapshotMeta, VmIdentity};
//! use ferry_core::{Secret, block::read_all, vm::*};
//! use std::sync::Arc;
//!
//! let store = Store::new(Arc::new(object_store::memory::InMemory::new()), "memory");
//! let pw = Secret::new("correct horse battery staple");
//! let opts = InitOptions { chunk_size: 64 << 10, kdf: KdfParams::insecure_fast(), ..Default::default() };
//! let repo = Repository::init(store.clone(), Some(&pw), opts).await?;
//!
//! let meta = SnapshotMeta {
//!     vm: VmIdentity { id: "vm-1".into(), name: "web".into() },
//!     source: "file".into(),
//!     hypervisor: HypervisorKind::Generic,
//!     consistency: ConsistencyLevel::Crash,
//!     config: VmConfig::default(),
//!     native_config: None,
//!     transport: Some("file".into()),
//!     labels: Default::default(),
//! };
//! let backup = repo.begin_backup(meta).await?;
//! let disk = backup.add_disk("disk0", 100_000, None)?;
//! disk.put_chunk(0, vec![7u8; 65536].into()).await?;   // stored
//! disk.zero_chunk(1)?;                                 // never stored
//! let manifest = backup.commit(vec![disk]).await?;
//!
//! let repo = Repository::open(store, Some(&pw)).await?;
//! let src = repo.open_disk(&manifest.id, "disk0").await?;
//! let data = read_all(src.as_ref()).await.unwrap();
//! assert_eq!(&data[..65536], &[7u8; 65536][..]);
//! assert!(data[65536..].iter().all(|b| *b == 0));
//! assert!(repo.verify(&Default::default()).await?.ok());
//! # Ok::<(), ferry_repo::RepoError>(()) }).unwrap();
//! ```

pub mod codec;
pub mod config;
mod direct;
mod error;
pub mod fuzz;
pub mod immutable;
pub mod immutable_local;
mod keyslots;
pub mod kms;
pub mod locks;
mod maintenance;
pub mod manifest;
mod repo;
mod sigv4;
pub mod store;
pub mod testdata;
pub mod time;
pub mod verification;
pub mod work;

pub use codec::{ChunkCodec, ChunkId, Compression, DiskIndex, EncodedChunk, Keys};
pub use config::{CompressionMethod, Encryption, KdfParams, RepoConfig};
pub use error::{RepoError, Result};
pub use immutable::{Immutability, KeptLocked, LockMode};
pub use keyslots::{KmsUnlock, SlotInfo, Unlock};
pub use kms::KmsKey;
pub use maintenance::{
    BadObject, GcOptions, GcReport, PruneDecision, Retention, VerifyOptions, VerifyReport,
    plan_retention,
};
pub use manifest::{Manifest, ManifestDisk, SnapshotMeta, VmIdentity};
pub use repo::{
    BackupWriter, DEFAULT_CHUNK_SIZE, DEFAULT_COMPRESSION_LEVEL, DiskWriter, InitOptions,
    PutOutcome, Repository, SnapshotDisk, Stats, StatsSnapshot, Timing,
};
pub use store::{Created, Store};
pub use verification::{BootResult, BootVerification};
