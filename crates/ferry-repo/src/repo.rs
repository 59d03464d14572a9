//! The repository handle: init/open, key slots, the backup writer, and the read side.

use crate::codec::{
    ChunkCodec, ChunkId, DiskIndex, EncodedChunk, Keys, hex, is_all_zero, open_catalog,
    random_bytes, seal_catalog,
};
use crate::config::{CONFIG_KEY, Encryption, KdfParams, KeySlot, RepoConfig};
use crate::error::{RepoError, Result};
use crate::locks::{self, LeaseGuard};
use crate::manifest::{MANIFEST_VERSION, Manifest, ManifestDisk, SnapshotMeta};
use crate::store::{Created, Store};
use crate::time::{now_rfc3339, now_unix};
use async_trait::async_trait;
use bytes::Bytes;
use ferry_core::{BlockError, BlockSource, ExtentMap, Secret};
use futures::{StreamExt, TryStreamExt};
use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Default chunk size (see docs/adr/0011-chunk-size.md).
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

/// Default zstd level, for repositories that choose zstd: -1 ("fast 1") compresses OS-like
/// data ~35 % faster than level 1 for ~3 % less reduction (ADR 0016).
pub const DEFAULT_COMPRESSION_LEVEL: i32 = -1;
/// New chunk ids are published to the catalog in segments of this many, so an interrupted
/// backup's uploads are found by the next run.
const CATALOG_FLUSH: usize = 64;

/// Settings for a new repository.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Chunk size in bytes (64 KiB ..= 16 MiB, a power of two).
    pub chunk_size: u32,
    /// Chunk compression (LZ4 by default: ADR 0055).
    pub compression: crate::config::CompressionMethod,
    /// zstd level for chunks, when `compression` is zstd.
    pub compression_level: i32,
    /// Encrypt (AES-256-GCM). `false` needs an explicit opt-in from the user.
    pub encrypted: bool,
    /// Argon2id parameters for the first password slot.
    pub kdf: KdfParams,
    /// Lock every data object (S3 Object Lock; ADR 0075). Refused unless the bucket has
    /// Object Lock enabled.
    pub immutability: Option<crate::immutable::Immutability>,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression: crate::config::CompressionMethod::Lz4,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            encrypted: true,
            kdf: KdfParams::default(),
            immutability: None,
        }
    }
}

/// Timing knobs (tests shorten them).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Lease time-to-live; refreshed every third of it.
    pub lease_ttl: Duration,
    /// How long a backup waits for a running GC before giving up.
    pub backup_wait: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(600),
            backup_wait: Duration::from_secs(3600),
        }
    }
}

/// An open repository. Cheap to clone.
#[derive(Clone)]
pub struct Repository {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Store,
    pub(crate) config: RepoConfig,
    pub(crate) keys: Arc<Keys>,
    pub(crate) codec: ChunkCodec,
    pub(crate) timing: Timing,
}

impl fmt::Debug for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.inner.store.location())
            .field("chunk_size", &self.inner.config.chunk_size)
            .field("encryption", &self.inner.config.encryption)
            .finish()
    }
}

/// A new random restore point id that sorts by time (millisecond resolution).(millisecond resolution).
fn new_snapshot_id() -> String {
    let r: [u8; 4] = random_bytes();
    format!(
        "{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
        hex(&r)
    )
}

impl Repository {
    /// Creates a repository at `store`. Encrypted repositories need a password.
    pub async fn init(store: Store, password: Option<&Secret>, opts: InitOptions) -> Result<Self> {
        Self::init_with(store, password, None, opts).await
    }

    /// Creates an encrypted repository whose master key is wrapped by the AWS KMS key `kms`
    /// (ADR 0182), and by `password` too when given.
    pub async fn init_kms(
        store: Store,
        password: Option<&Secret>,
        kms: &crate::KmsKey,
        opts: InitOptions,
    ) -> Result<Self> {
        if !opts.encrypted {
            return Err(RepoError::Usage(
                "a KMS key wraps the key of an encrypted repository; it does not apply with --insecure-no-encryption".into(),
            ));
        }
        Self::init_with(store, password.filter(|p| !p.is_empty()), Some(kms), opts).await
    }

    async fn init_with(
        store: Store,
        password: Option<&Secret>,
        kms: Option<&crate::KmsKey>,
        opts: InitOptions,
    ) -> Result<Self> {
        let cs = opts.chunk_size;
        if !cs.is_power_of_two()
            || !(crate::codec::MIN_CHUNK_SIZE..=crate::codec::MAX_CHUNK_SIZE).contains(&cs)
        {
            return Err(RepoError::Usage(format!(
                "chunk size {cs} must be a power of two between 64 KiB and 16 MiB"
            )));
        }
        if !(-7..=22).contains(&opts.compression_level) {
            return Err(RepoError::Usage(format!(
                "zstd level {} out of range -7..=22",
                opts.compression_level
            )));
        }
        if store.head(CONFIG_KEY).await?.is_some() {
            return Err(RepoError::AlreadyInitialized {
                location: store.location().into(),
            });
        }
        let store = match opts.immutability {
            Some(p) => {
                p.validate()?;
                let store = store.with_immutability(p)?;
                if let Some(lock) = store.object_lock() {
                    if !lock.bucket_lock_enabled().await? {
                        return Err(RepoError::Immutability {
                            location: store.location().into(),
                            reason: "the bucket does not have S3 Object Lock enabled; create a bucket with Object Lock (`aws s3api create-bucket --object-lock-enabled-for-bucket`) or enable it on this one (`put-object-lock-configuration`, which needs versioning)".into(),
                        });
                    }
                } else if let Some(local) = store.local_lock() {
                    // The flag must work here, for this process, before anything is written.
                    let (l, loc) = (local.clone(), store.location().to_string());
                    tokio::task::spawn_blocking(move || l.probe(&loc))
                        .await
                        .map_err(|e| RepoError::Usage(format!("probe task failed: {e}")))??;
                }
                store
            }
            None => store,
        };
        let master: [u8; 32] = random_bytes();
        let id = hex(&random_bytes::<16>());
        let config = RepoConfig {
            id: id.clone(),
            created: now_rfc3339(),
            chunk_size: cs,
            compression: opts.compression,
            compression_level: opts.compression_level,
            encryption: if opts.encrypted {
                Encryption::Aes256Gcm
            } else {
                Encryption::None
            },
            chunk_id: "blake3-keyed".into(),
            master_key: (!opts.encrypted).then(|| hex(&master)),
            immutability: opts.immutability,
        };
        let keys = Keys::from_master(master, opts.encrypted);
        let mut slots: Vec<(String, Vec<u8>)> = Vec::new();
        if opts.encrypted {
            // KMS first: it can fail (unreachable, denied) before anything is written.
            if let Some(kms) = kms {
                slots.push(crate::keyslots::kms_slot(&id, &master, kms).await?);
            }
            match password.filter(|p| !p.is_empty()) {
                Some(password) => {
                    let slot = KeySlot::create(&id, &master, password, opts.kdf)?;
                    slots.push((format!("keys/{}", hex(&random_bytes::<8>())), slot.encode()));
                }
                None if kms.is_none() => {
                    return Err(RepoError::Usage(
                        "an encrypted repository needs a password or a KMS key (or choose --insecure-no-encryption)"
                            .into(),
                    ));
                }
                None => {}
            }
        }
        let mut written = Vec::new();
        for (key, data) in slots {
            if let Err(e) = store.create(&key, data).await {
                crate::keyslots::delete_all(&store, &written).await;
                return Err(e);
            }
            written.push(key);
        }
        // The config goes last and only if absent: two racing inits cannot both win.
        let created = match store.create(CONFIG_KEY, config.encode(&keys)).await {
            Ok(c) => c,
            Err(e) => {
                crate::keyslots::delete_all(&store, &written).await;
                return Err(e);
            }
        };
        if created == Created::AlreadyExists {
            crate::keyslots::delete_all(&store, &written).await;
            return Err(RepoError::AlreadyInitialized {
                location: store.location().into(),
            });
        }
        tracing::info!(location = %store.location(), chunk_size = cs, encrypted = opts.encrypted, "repository initialized");
        Ok(Self::assemble(store, config, keys))
    }

    /// Opens the repository at `store`, unlocking it with `password` (ignored when unencrypted);
    /// without a password, with its KMS key slots.
    pub async fn open(store: Store, password: Option<&Secret>) -> Result<Self> {
        let unlock = crate::keyslots::Unlock {
            password: password.cloned(),
            ..Default::default()
        };
        Self::open_with(store, &unlock).await
    }

    /// Opens the repository at `store`, unlocking it as `unlock` says: with the password if
    /// one is given (and KMS is not forced), else with a KMS key slot.
    pub async fn open_with(store: Store, unlock: &crate::keyslots::Unlock) -> Result<Self> {
        let data = match store.get(CONFIG_KEY).await {
            Ok(d) => d,
            Err(RepoError::Missing { .. }) => {
                return Err(RepoError::NotARepository {
                    location: store.location().into(),
                });
            }
            Err(e) => return Err(e),
        };
        let (config, body, mac) = RepoConfig::decode_unauthenticated(&data)?;
        let keys = match config.encryption {
            Encryption::None => Keys::from_master(config.plain_master()?, false),
            Encryption::Aes256Gcm => {
                let master = match unlock.password.as_ref() {
                    Some(password) if !unlock.kms.force => {
                        Self::unlock(&store, &config.id, password).await?
                    }
                    _ => {
                        crate::keyslots::unlock_kms(&store, &config.id, unlock, |m| {
                            RepoConfig::authenticate(&body, &mac, &Keys::from_master(*m, true))
                                .is_ok()
                        })
                        .await?
                    }
                };
                Keys::from_master(master, true)
            }
        };
        RepoConfig::authenticate(&body, &mac, &keys)?;
        let store = match config.immutability {
            Some(p) => {
                p.validate()?;
                store.with_immutability(p)?
            }
            None => store,
        };
        Ok(Self::assemble(store, config, keys))
    }

    async fn unlock(store: &Store, repo_id: &str, password: &Secret) -> Result<[u8; 32]> {
        let slots = store.list("keys").await?;
        let mut last_err = None;
        for meta in slots {
            let key = meta.location.to_string();
            let data = store.get(&key).await?;
            if data.starts_with(&crate::kms::MAGIC_KMS_SLOT) {
                continue; // a KMS slot: no password opens it
            }
            let slot = match KeySlot::decode(&key, &data) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(slot = %key, error = %e, "skipping unreadable key slot");
                    last_err = Some(e);
                    continue;
                }
            };
            let (k, id, pw, slot) = (key.clone(), repo_id.to_string(), password.clone(), slot);
            // Argon2id is deliberately slow: keep it off the async executor.
            let res = tokio::task::spawn_blocking(move || slot.unwrap_master(&k, &id, &pw))
                .await
                .map_err(|e| RepoError::Usage(format!("key derivation task failed: {e}")))?;
            match res {
                Ok(Some(master)) => return Ok(master),
                Ok(None) => {}
                Err(e) => last_err = Some(e),
            }
        }
        if let Some(e @ RepoError::UnsupportedVersion { .. }) = last_err {
            return Err(e);
        }
        Err(RepoError::WrongPassword {
            location: store.location().into(),
        })
    }

    fn assemble(store: Store, config: RepoConfig, keys: Keys) -> Self {
        let keys = Arc::new(keys);
        let codec = ChunkCodec::new(keys.clone(), config.chunk_compression(), config.chunk_size);
        Self {
            inner: Arc::new(Inner {
                store,
                config,
                keys,
                codec,
                timing: Timing::default(),
            }),
        }
    }

    /// Replaces the timing knobs (call right after open/init).
    pub fn with_timing(self, timing: Timing) -> Self {
        let i = &self.inner;
        Self {
            inner: Arc::new(Inner {
                store: i.store.clone(),
                config: i.config.clone(),
                keys: i.keys.clone(),
                codec: i.codec.clone(),
                timing,
            }),
        }
    }

    /// Adds a password slot; returns its object key.
    pub async fn add_password(&self, password: &Secret, kdf: KdfParams) -> Result<String> {
        if self.inner.config.encryption == Encryption::None {
            return Err(RepoError::Usage(
                "the repository is not encrypted; passwords do not apply".into(),
            ));
        }
        if password.is_empty() {
            return Err(RepoError::Usage("the new password is empty".into()));
        }
        let slot = KeySlot::create(
            &self.inner.config.id,
            self.inner.keys.master(),
            password,
            kdf,
        )?;
        let key = format!("keys/{}", hex(&random_bytes::<8>()));
        self.inner.store.create(&key, slot.encode()).await?;
        Ok(key)
    }

    /// The repository's settings.
    pub fn config(&self) -> &RepoConfig {
        &self.inner.config
    }

    /// The object store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The chunk codec (hash → compress → encrypt), to run on worker threads.
    pub fn codec(&self) -> &ChunkCodec {
        &self.inner.codec
    }

    /// Ids of all visible restore points (those whose manifest exists), oldest first.
    pub async fn snapshot_ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self
            .inner
            .store
            .list("snapshots")
            .await?
            .into_iter()
            .filter_map(|m| {
                let k = m.location.to_string();
                k.strip_prefix("snapshots/")
                    .and_then(|r| r.strip_suffix("/manifest"))
                    .map(str::to_string)
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Loads and authenticates the manifest of restore point `id`.
    pub async fn load_manifest(&self, id: &str) -> Result<Manifest> {
        let key = Manifest::key_for(id);
        let data = match self.inner.store.get(&key).await {
            Err(RepoError::Missing { .. }) => {
                return Err(RepoError::SnapshotNotFound { id: id.into() });
            }
            other => other?,
        };
        Manifest::open(&self.inner.keys, &key, &data)
    }

    /// All restore points, oldest first. Fails on the first unreadable manifest (naming it);
    /// `verify` reports them one by one instead.
    pub async fn snapshots(&self) -> Result<Vec<Manifest>> {
        let ids = self.snapshot_ids().await?;
        let mut out: Vec<Manifest> = futures::stream::iter(ids)
            .map(|id| {
                let repo = self.clone();
                async move { repo.load_manifest(&id).await }
            })
            .buffered(16)
            .try_collect()
            .await?;
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Loads the index of `disk` in `manifest`, checking it against the manifest's digest.
    pub async fn load_index(&self, manifest: &Manifest, disk: &str) -> Result<DiskIndex> {
        let d = manifest
            .disks
            .iter()
            .find(|d| d.name == disk)
            .ok_or_else(|| RepoError::DiskNotFound {
                snapshot: manifest.id.clone(),
                disk: disk.into(),
            })?;
        self.load_index_of(d).await
    }

    pub(crate) async fn load_index_of(&self, d: &ManifestDisk) -> Result<DiskIndex> {
        let data = self.inner.store.get(&d.index_key).await?;
        if self.inner.keys.digest(&data) != d.index_digest {
            return Err(RepoError::corrupt(
                &d.index_key,
                "digest does not match the manifest",
            ));
        }
        let idx = DiskIndex::open(&self.inner.keys, &d.index_key, &data)?;
        if idx.disk_size != d.size || idx.chunk_size != d.chunk_size {
            return Err(RepoError::corrupt(
                &d.index_key,
                "disk or chunk size differs from the manifest",
            ));
        }
        Ok(idx)
    }

    /// Reads chunk `id`, returning its authenticated plaintext. The error names the object key.
    pub async fn read_chunk(&self, id: ChunkId) -> Result<Vec<u8>> {
        let data = self.inner.store.get(&id.object_key()).await?;
        let codec = self.inner.codec.clone();
        tokio::task::spawn_blocking(move || codec.decode(&id, &data))
            .await
            .map_err(|e| RepoError::Usage(format!("decode task failed: {e}")))?
    }

    /// A restore point's disk as a [`BlockSource`] (for restore, or to serve it over NBD).
    pub async fn open_disk(&self, snapshot: &str, disk: &str) -> Result<Arc<dyn BlockSource>> {
        let m = self.load_manifest(snapshot).await?;
        let index = self.load_index(&m, disk).await?;
        Ok(Arc::new(SnapshotDisk {
            repo: self.clone(),
            name: format!("{snapshot}/{disk}"),
            index: Arc::new(index),
            cache: Mutex::new(None),
        }))
    }

    /// Every chunk id the catalog lists.
    pub async fn load_catalog(&self) -> Result<HashSet<ChunkId>> {
        let keys: Vec<String> = self
            .inner
            .store
            .list("catalog")
            .await?
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        let segs: Vec<Vec<ChunkId>> = futures::stream::iter(keys)
            .map(|k| {
                let repo = self.clone();
                async move {
                    let data = repo.inner.store.get(&k).await?;
                    open_catalog(&repo.inner.keys, &k, &data)
                }
            })
            .buffer_unordered(16)
            .try_collect()
            .await?;
        Ok(segs.into_iter().flatten().collect())
    }

    /// Starts a restore point for `meta.vm`. Takes a backup lease (waiting for a running GC),
    /// loads the catalog, and finds the previous restore point of the same VM.
    pub async fn begin_backup(&self, meta: SnapshotMeta) -> Result<BackupWriter> {
        let id = new_snapshot_id();
        let writer = self
            .begin(id.clone(), id.clone(), id, meta, Previous::SameVm, None)
            .await?;
        tracing::info!(snapshot = %writer.shared.id, vm = %writer.meta.vm.id, known_chunks = writer.shared.known.read().expect("known set lock").len(), previous = %writer.previous.as_ref().map_or("none", |m| m.id.as_str()), "backup started");
        Ok(writer)
    }

    /// Starts writing a copy of restore point `source` (read from another repository) under the
    /// same id, keeping its times, VM, labels and per-disk counters (ADR 0061). `previous` names
    /// a restore point of this repository whose indexes the copy may reuse chunk ids from; it
    /// is loaded once the lease is held (if it was pruned meanwhile, there is none).
    ///
    /// Unlike a backup, every chunk the copy stores is read back and authenticated before it
    /// is published to the catalog, and the lease and catalog segments carry a random suffix,
    /// so a re-run after a kill neither collides with the dead run's objects nor waits for its
    /// lease to expire. Add the disks in the order of `source.disks` (index keys follow it).
    pub async fn begin_copy(
        &self,
        source: &Manifest,
        previous: Option<&str>,
    ) -> Result<BackupWriter> {
        let run = hex(&random_bytes::<4>());
        let writer = self
            .begin(
                source.id.clone(),
                format!("copy-{}-{run}", source.id),
                format!("{}-copy-{run}", source.id),
                source.meta.clone(),
                previous.map_or(Previous::None, |p| Previous::Id(p.to_string())),
                Some(source.clone()),
            )
            .await?;
        tracing::info!(snapshot = %source.id, known_chunks = writer.shared.known.read().expect("known set lock").len(), previous = %writer.previous.as_ref().map_or("none", |m| m.id.as_str()), "copy started");
        Ok(writer)
    }

    /// Takes the lease, *then* reads the catalog and the previous restore point: whatever they
    /// reference cannot be swept by a GC from now on (ADR 0013).
    async fn begin(
        &self,
        id: String,
        lease_name: String,
        catalog_tag: String,
        meta: SnapshotMeta,
        previous: Previous,
        copy_of: Option<Manifest>,
    ) -> Result<BackupWriter> {
        let t = self.inner.timing;
        let lease =
            locks::acquire_backup(&self.inner.store, &lease_name, t.lease_ttl, t.backup_wait)
                .await?;
        let known = self.load_catalog().await?;
        let previous = match previous {
            Previous::None => None,
            Previous::Id(pid) => match self.load_manifest(&pid).await {
                Ok(m) => Some(m),
                Err(RepoError::SnapshotNotFound { .. }) => None,
                Err(e) => return Err(e),
            },
            Previous::SameVm => {
                let mut found = None;
                for pid in self.snapshot_ids().await?.into_iter().rev() {
                    match self.load_manifest(&pid).await {
                        Ok(m) if m.meta.vm.id == meta.vm.id => {
                            found = Some(m);
                            break;
                        }
                        Ok(_) | Err(RepoError::SnapshotNotFound { .. }) => {}
                        Err(e) => {
                            tracing::warn!(snapshot = %pid, error = %e, "skipping unreadable manifest")
                        }
                    }
                }
                found
            }
        };
        Ok(BackupWriter {
            shared: Arc::new(Shared {
                repo: self.clone(),
                verify_writes: copy_of.is_some(),
                id,
                catalog_tag,
                known: RwLock::new(known),
                pending: Mutex::new(Vec::new()),
                segment: AtomicU64::new(0),
                stats: Stats::default(),
                locked: Mutex::new(Vec::new()),
            }),
            lease: Some(lease),
            meta,
            started: now_rfc3339(),
            time: now_unix(),
            previous,
            copy_of,
            disk_names: Mutex::new(Vec::new()),
        })
    }
}

/// Which restore point a new writer reuses chunk ids from.
enum Previous {
    /// None.
    None,
    /// The newest one of the same VM (backups).
    SameVm,
    /// This one, if it still exists (copies).
    Id(String),
}

/// Counters of one backup.
#[derive(Debug, Default)]
pub struct Stats {
    /// Chunks written to the store by this backup.
    pub uploaded: AtomicU64,
    /// Stored bytes of those chunks.
    pub uploaded_bytes: AtomicU64,
    /// Chunks encoded but found already stored (another writer, or an interrupted run not yet in
    /// the catalog).
    pub already_present: AtomicU64,
    /// Chunks known from the catalog or the previous index (never encoded or uploaded).
    pub reused: AtomicU64,
    /// All-zero chunks.
    pub zero: AtomicU64,
    /// Stored chunks read back and authenticated after writing (copies).
    pub verified: AtomicU64,
    /// Objects whose retention this commit extended (immutable repositories).
    pub retention_extended: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Chunks written.
    pub uploaded: u64,
    /// Stored bytes written.
    pub uploaded_bytes: u64,
    /// Chunks already stored.
    pub already_present: u64,
    /// Chunks reused without upload.
    pub reused: u64,
    /// Zero chunks.
    pub zero: u64,
    /// Chunks read back after writing.
    pub verified: u64,
    /// Objects whose retention was extended at commit (immutable repositories).
    pub retention_extended: u64,
}

struct Shared {
    repo: Repository,
    id: String,
    /// Names this writer's catalog segments (`catalog/<tag>-<seq>`).
    catalog_tag: String,
    /// Read every stored chunk back and authenticate it before publishing it (copies).
    verify_writes: bool,
    known: RwLock<HashSet<ChunkId>>,
    pending: Mutex<Vec<ChunkId>>,
    segment: AtomicU64,
    stats: Stats,
    /// Chunks this writer created with a lock (immutable repositories): they need no extension.
    locked: Mutex<Vec<ChunkId>>,
}

impl Shared {
    fn is_known(&self, id: &ChunkId) -> bool {
        self.known.read().expect("known set lock").contains(id)
    }

    async fn publish(&self, id: ChunkId) -> Result<()> {
        self.known.write().expect("known set lock").insert(id);
        let batch = {
            let mut p = self.pending.lock().expect("pending lock");
            p.push(id);
            if p.len() >= CATALOG_FLUSH {
                std::mem::take(&mut *p)
            } else {
                Vec::new()
            }
        };
        self.write_segment(batch).await
    }

    async fn flush(&self) -> Result<()> {
        let batch = std::mem::take(&mut *self.pending.lock().expect("pending lock"));
        self.write_segment(batch).await
    }

    async fn write_segment(&self, ids: Vec<ChunkId>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let n = self.segment.fetch_add(1, Ordering::Relaxed);
        let key = format!("catalog/{}-{n:06}", self.catalog_tag);
        let data = seal_catalog(&self.repo.inner.keys, &key, &ids)?;
        self.repo.inner.store.create(&key, data).await?;
        Ok(())
    }

    async fn upload(&self, enc: EncodedChunk) -> Result<()> {
        let len = enc.data.len() as u64;
        match self
            .repo
            .inner
            .store
            .create(&enc.id.object_key(), enc.data)
            .await?
        {
            Created::Written => {
                self.stats.uploaded.fetch_add(1, Ordering::Relaxed);
                self.stats.uploaded_bytes.fetch_add(len, Ordering::Relaxed);
                if self.repo.inner.store.immutability().is_some() {
                    self.locked.lock().expect("locked list").push(enc.id);
                }
            }
            Created::AlreadyExists => {
                self.stats.already_present.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.verify_writes {
            // The catalog must never list a chunk that does not read back: re-runs trust it.
            self.repo.read_chunk(enc.id).await?;
            self.stats.verified.fetch_add(1, Ordering::Relaxed);
        }
        self.publish(enc.id).await
    }
}

/// Writes one restore point. Create [`DiskWriter`]s with [`add_disk`](Self::add_disk), fill
/// them (from many tasks at once if you like), then [`commit`](Self::commit). Dropping the writer
/// without committing leaves no visible restore point; its uploaded chunks are in the catalog
/// and are reused by the next backup.
pub struct BackupWriter {
    shared: Arc<Shared>,
    lease: Option<LeaseGuard>,
    meta: SnapshotMeta,
    started: String,
    time: i64,
    previous: Option<Manifest>,
    /// The restore point this writer copies (keeps its times and counters).
    copy_of: Option<Manifest>,
    disk_names: Mutex<Vec<String>>,
}

impl fmt::Debug for BackupWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupWriter")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl BackupWriter {
    /// The restore point id this writer will commit.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The previous restore point of the same VM, if any.
    pub fn previous(&self) -> Option<&Manifest> {
        self.previous.as_ref()
    }

    /// The previous restore point's index of disk `name` (for changed-block backups: unchanged
    /// chunks are [`DiskWriter::reuse_chunk`]ed from it). Its chunk ids become known.
    pub async fn previous_index(&self, name: &str) -> Result<Option<DiskIndex>> {
        let Some(m) = &self.previous else {
            return Ok(None);
        };
        let Some(d) = m.disks.iter().find(|d| d.name == name) else {
            return Ok(None);
        };
        let idx = self.shared.repo.load_index_of(d).await?;
        let mut known = self.shared.known.write().expect("known set lock");
        known.extend(idx.chunks.iter().filter(|c| !c.is_zero()).copied());
        Ok(Some(idx))
    }

    /// True if chunk `id` is known to be stored (skip encoding and uploading it).
    pub fn is_known(&self, id: &ChunkId) -> bool {
        self.shared.is_known(id)
    }

    /// Counters so far.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.shared.stats;
        StatsSnapshot {
            uploaded: s.uploaded.load(Ordering::Relaxed),
            uploaded_bytes: s.uploaded_bytes.load(Ordering::Relaxed),
            already_present: s.already_present.load(Ordering::Relaxed),
            reused: s.reused.load(Ordering::Relaxed),
            zero: s.zero.load(Ordering::Relaxed),
            verified: s.verified.load(Ordering::Relaxed),
            retention_extended: s.retention_extended.load(Ordering::Relaxed),
        }
    }

    /// Adds a disk of `size` bytes named `name` (unique within the restore point).
    pub fn add_disk(
        &self,
        name: &str,
        size: u64,
        change_token: Option<String>,
    ) -> Result<DiskWriter> {
        let mut names = self.disk_names.lock().expect("disk names lock");
        if names.iter().any(|n| n == name) {
            return Err(RepoError::Usage(format!("disk `{name}` added twice")));
        }
        let chunk_size = self.shared.repo.inner.config.chunk_size;
        let count = usize::try_from(DiskIndex::chunk_count(size, chunk_size))
            .map_err(|_| RepoError::Usage(format!("disk `{name}` of {size} bytes is too large")))?;
        let ordinal = names.len();
        names.push(name.into());
        Ok(DiskWriter {
            shared: self.shared.clone(),
            name: name.into(),
            ordinal,
            size,
            chunk_size,
            change_token,
            slots: Mutex::new(Slots {
                ids: vec![ChunkId::ZERO; count],
                filled: vec![0; count.div_ceil(64)],
            }),
            new_chunks: AtomicU64::new(0),
            reused_chunks: AtomicU64::new(0),
        })
    }

    /// The digest of index object `key` left by an earlier run of this copy, if it lists
    /// exactly the chunks of `index`.
    async fn existing_index(&self, key: &str, index: &DiskIndex) -> Result<String> {
        let repo = &self.shared.repo;
        let data = repo.inner.store.get(key).await?;
        let old = DiskIndex::open(&repo.inner.keys, key, &data)?;
        if old.disk_size != index.disk_size
            || old.chunk_size != index.chunk_size
            || old.chunks != index.chunks
        {
            return Err(RepoError::Usage(format!(
                "index `{key}` already exists and lists other chunks; `ferry gc` removes such orphan indexes"
            )));
        }
        Ok(repo.inner.keys.digest(&data))
    }

    /// Writes the disk indexes, then the manifest (last: only then is the restore point
    /// visible), and releases the lease.
    pub async fn commit(mut self, disks: Vec<DiskWriter>) -> Result<Manifest> {
        let repo = self.shared.repo.clone();
        let keys = repo.inner.keys.clone();
        let mut mdisks = Vec::with_capacity(disks.len());
        let mut idx_data = Vec::with_capacity(disks.len());
        for d in &disks {
            // Moved out, not copied: a 2 TiB disk has 2 M chunk ids (64 MiB).
            let slots = std::mem::take(&mut *d.slots.lock().expect("slots lock"));
            if let Some(i) = slots.first_unfilled() {
                return Err(RepoError::Usage(format!(
                    "disk `{}`: chunk {i} (offset {}) was never written",
                    d.name,
                    i as u64 * u64::from(d.chunk_size)
                )));
            }
            let chunks = slots.ids;
            let index = DiskIndex {
                disk_size: d.size,
                chunk_size: d.chunk_size,
                chunks,
            };
            let key = format!("indexes/{}/{}", self.shared.id, d.ordinal);
            let sealed = index.seal(&keys, &key)?;
            mdisks.push(ManifestDisk {
                name: d.name.clone(),
                size: d.size,
                chunk_size: d.chunk_size,
                index_key: key.clone(),
                index_digest: keys.digest(&sealed),
                change_token: d.change_token.clone(),
                zero_chunks: index.chunks.iter().filter(|c| c.is_zero()).count() as u64,
                new_chunks: d.new_chunks.load(Ordering::Relaxed),
                reused_chunks: d.reused_chunks.load(Ordering::Relaxed),
            });
            idx_data.push((key, sealed, index));
        }
        self.shared.flush().await?;
        if repo.inner.store.immutability().is_some() {
            let mut referenced: Vec<ChunkId> = idx_data
                .iter()
                .flat_map(|(_, _, index)| index.chunks.iter())
                .filter(|c| !c.is_zero())
                .copied()
                .collect();
            referenced.sort_unstable();
            referenced.dedup();
            let locked = std::mem::take(&mut *self.shared.locked.lock().expect("locked list"));
            let n = crate::immutable::secure_commit(
                &repo,
                &self.shared.id,
                self.time,
                referenced,
                locked,
            )
            .await?;
            self.shared
                .stats
                .retention_extended
                .store(n, Ordering::Relaxed);
        }
        for ((key, data, index), md) in idx_data.into_iter().zip(&mut mdisks) {
            if repo.inner.store.create(&key, data).await? == Created::AlreadyExists {
                if self.copy_of.is_none() {
                    return Err(RepoError::Usage(format!("index `{key}` already exists")));
                }
                // A copy killed between its indexes and its manifest left this one behind
                // (same restore point id); take it if it lists the same chunks.
                md.index_digest = self.existing_index(&key, &index).await?;
            }
        }
        let mut manifest = Manifest {
            version: MANIFEST_VERSION,
            id: self.shared.id.clone(),
            started: self.started.clone(),
            finished: now_rfc3339(),
            time: self.time,
            writer: format!("ferry-repo {}", env!("CARGO_PKG_VERSION")),
            meta: self.meta.clone(),
            disks: mdisks,
        };
        if let Some(src) = &self.copy_of {
            manifest.started.clone_from(&src.started);
            manifest.finished.clone_from(&src.finished);
            manifest.time = src.time;
            manifest.writer.clone_from(&src.writer);
            for md in &mut manifest.disks {
                if let Some(sd) = src.disks.iter().find(|s| s.name == md.name) {
                    md.new_chunks = sd.new_chunks;
                    md.reused_chunks = sd.reused_chunks;
                }
            }
        }
        let key = Manifest::key_for(&manifest.id);
        if repo.inner.store.create(&key, manifest.seal(&keys)?).await? == Created::AlreadyExists {
            if self.copy_of.is_none() {
                return Err(RepoError::Usage(format!("manifest `{key}` already exists")));
            }
            // Another copy of the same restore point finished first: it is complete.
            tracing::info!(snapshot = %manifest.id, "restore point already copied by another run");
            let existing = repo.load_manifest(&manifest.id).await?;
            if let Some(lease) = self.lease.take() {
                lease.release().await?;
            }
            return Ok(existing);
        }
        if let Some(lease) = self.lease.take() {
            lease.release().await?;
        }
        let stats = self.stats();
        tracing::info!(snapshot = %manifest.id, uploaded_chunks = stats.uploaded, uploaded_bytes = stats.uploaded_bytes,
            already_stored = stats.already_present, reused = stats.reused, zero = stats.zero, "restore point committed");
        Ok(manifest)
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        if self.lease.is_none() {
            return; // committed
        }
        // Abandoned (error or cancellation): publish what was stored so the next run reuses it
        // instead of re-encoding it. Best effort; a crash loses at most the last 63 chunks.
        let shared = self.shared.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(err) = shared.flush().await {
                    tracing::warn!(snapshot = %shared.id, error = %err, "cannot publish the catalog of an abandoned backup");
                }
            });
        }
    }
}

/// Outcome of [`DiskWriter::put_chunk`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    /// All zeros: nothing stored.
    Zero,
    /// Already stored: nothing uploaded.
    Known,
    /// Encoded and written (or found present by the conditional write).
    Stored,
}

/// A disk's chunk ids by index, plus which of them were set (32 bytes and one bit per chunk,
/// instead of 33 bytes for an `Option` each).
#[derive(Default)]
struct Slots {
    ids: Vec<ChunkId>,
    filled: Vec<u64>,
}

impl Slots {
    fn first_unfilled(&self) -> Option<usize> {
        // Bits past the last chunk are never set, so a full last word is not required.
        self.filled
            .iter()
            .enumerate()
            .find(|(_, bits)| **bits != u64::MAX)
            .map(|(w, bits)| w * 64 + (!bits).trailing_zeros() as usize)
            .filter(|&i| i < self.ids.len())
    }
}

/// Accepts the chunks of one disk, by chunk index, in any order and from many tasks.
pub struct DiskWriter {
    shared: Arc<Shared>,
    name: String,
    ordinal: usize,
    size: u64,
    chunk_size: u32,
    change_token: Option<String>,
    slots: Mutex<Slots>,
    new_chunks: AtomicU64,
    reused_chunks: AtomicU64,
}

impl fmt::Debug for DiskWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskWriter")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish()
    }
}

impl DiskWriter {
    /// Disk name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True if chunk `id` is known to be stored (the same set as [`BackupWriter::is_known`]).
    pub fn is_known(&self, id: &ChunkId) -> bool {
        self.shared.is_known(id)
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        DiskIndex::chunk_count(self.size, self.chunk_size)
    }

    /// Chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Byte range of chunk `index`.
    pub fn chunk_range(&self, index: u64) -> Range<u64> {
        let start = index * u64::from(self.chunk_size);
        start..(start + u64::from(self.chunk_size)).min(self.size)
    }

    fn check(&self, index: u64, len: Option<usize>) -> Result<usize> {
        if index >= self.chunk_count() {
            return Err(RepoError::Usage(format!(
                "disk `{}`: chunk index {index} out of range ({} chunks)",
                self.name,
                self.chunk_count()
            )));
        }
        let r = self.chunk_range(index);
        if let Some(len) = len {
            if len as u64 != r.end - r.start {
                return Err(RepoError::Usage(format!(
                    "disk `{}`: chunk {index} must be {} bytes, got {len}",
                    self.name,
                    r.end - r.start
                )));
            }
        }
        Ok(index as usize)
    }

    fn set(&self, i: usize, id: ChunkId) {
        let mut s = self.slots.lock().expect("slots lock");
        s.ids[i] = id;
        s.filled[i / 64] |= 1 << (i % 64);
    }

    /// Marks chunk `index` as all zeros.
    pub fn zero_chunk(&self, index: u64) -> Result<()> {
        let i = self.check(index, None)?;
        self.shared.stats.zero.fetch_add(1, Ordering::Relaxed);
        self.set(i, ChunkId::ZERO);
        Ok(())
    }

    /// Records chunk `index` as `id`, which must be known to be stored (from the catalog or
    /// [`BackupWriter::previous_index`]).
    pub fn reuse_chunk(&self, index: u64, id: ChunkId) -> Result<()> {
        if id.is_zero() {
            return self.zero_chunk(index);
        }
        let i = self.check(index, None)?;
        if !self.shared.is_known(&id) {
            return Err(RepoError::Usage(format!(
                "disk `{}`: chunk {index} reuses {id}, which this repository does not know",
                self.name
            )));
        }
        self.shared.stats.reused.fetch_add(1, Ordering::Relaxed);
        self.reused_chunks.fetch_add(1, Ordering::Relaxed);
        self.set(i, id);
        Ok(())
    }

    /// Stores chunk `index`: zero check, hash, and — only if not already known — compress,
    /// encrypt and upload (the CPU part on a blocking thread).
    pub async fn put_chunk(&self, index: u64, data: Bytes) -> Result<PutOutcome> {
        self.check(index, Some(data.len()))?;
        if is_all_zero(&data) {
            self.zero_chunk(index)?;
            return Ok(PutOutcome::Zero);
        }
        let codec = self.shared.repo.inner.codec.clone();
        let shared = self.shared.clone();
        let encoded = tokio::task::spawn_blocking(move || {
            let id = codec.id(&data);
            if shared.is_known(&id) {
                return Ok(Err(id));
            }
            codec.encode_with_id(id, &data).map(Ok)
        })
        .await
        .map_err(|e| RepoError::Usage(format!("encode task failed: {e}")))??;
        match encoded {
            Err(id) => {
                self.reuse_chunk(index, id)?;
                Ok(PutOutcome::Known)
            }
            Ok(enc) => self
                .put_encoded(index, enc)
                .await
                .map(|()| PutOutcome::Stored),
        }
    }

    /// Stores a chunk the caller encoded with [`ChunkCodec::encode`] (e.g. on its own thread
    /// pool).
    pub async fn put_encoded(&self, index: u64, enc: EncodedChunk) -> Result<()> {
        let i = self.check(index, Some(enc.plain_len))?;
        let id = enc.id;
        if self.shared.is_known(&id) {
            return self.reuse_chunk(index, id);
        }
        self.shared.upload(enc).await?;
        self.new_chunks.fetch_add(1, Ordering::Relaxed);
        self.set(i, id);
        Ok(())
    }
}

/// A restore point's disk, read chunk by chunk from the repository.
pub struct SnapshotDisk {
    repo: Repository,
    name: String,
    index: Arc<DiskIndex>,
    cache: Mutex<Option<(ChunkId, Arc<Vec<u8>>)>>,
}

impl fmt::Debug for SnapshotDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotDisk")
            .field("name", &self.name)
            .finish()
    }
}

fn to_block_error(disk: &str, e: RepoError) -> BlockError {
    match e {
        RepoError::Corrupt { .. }
        | RepoError::Missing { .. }
        | RepoError::UnsupportedVersion { .. } => BlockError::corrupt(disk, e.to_string()),
        other => BlockError::Other {
            disk: disk.into(),
            message: other.to_string(),
            retryable: other.is_retryable(),
            source: Some(Box::new(other)),
        },
    }
}

impl SnapshotDisk {
    async fn chunk(&self, id: ChunkId) -> Result<Arc<Vec<u8>>> {
        if let Some((cid, data)) = &*self.cache.lock().expect("cache lock") {
            if *cid == id {
                return Ok(data.clone());
            }
        }
        let data = Arc::new(self.repo.read_chunk(id).await?);
        *self.cache.lock().expect("cache lock") = Some((id, data.clone()));
        Ok(data)
    }
}

#[async_trait]
impl BlockSource for SnapshotDisk {
    fn size(&self) -> u64 {
        self.index.disk_size
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        BlockError::check_range(&self.name, offset, buf.len() as u64, self.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        let cs = u64::from(self.index.chunk_size);
        let first = offset / cs;
        let last = (offset + buf.len() as u64 - 1) / cs;
        // Fetch the chunks of a large read concurrently (bounded by the store's permits).
        let fetched: Vec<(u64, Option<Arc<Vec<u8>>>)> = futures::stream::iter(first..=last)
            .map(|c| async move {
                let id = self.index.chunks[c as usize];
                if id.is_zero() {
                    Ok((c, None))
                } else {
                    self.chunk(id).await.map(|d| (c, Some(d)))
                }
            })
            .buffered(8)
            .try_collect()
            .await
            .map_err(|e| to_block_error(&self.name, e))?;
        for (c, data) in fetched {
            let r = self.index.chunk_range(c as usize);
            let s = r.start.max(offset);
            let e = r.end.min(offset + buf.len() as u64);
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match data {
                None => dst.fill(0),
                Some(d) => {
                    let src = d
                        .get((s - r.start) as usize..(e - r.start) as usize)
                        .ok_or_else(|| {
                            BlockError::corrupt(
                                &self.name,
                                format!("chunk {c} is shorter than its range"),
                            )
                        })?;
                    dst.copy_from_slice(src);
                }
            }
        }
        Ok(())
    }

    async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, BlockError> {
        let mut m = ExtentMap::new();
        for (i, c) in self.index.chunks.iter().enumerate() {
            if !c.is_zero() {
                m.insert(self.index.chunk_range(i));
            }
        }
        Ok(m.clip(range.start..range.end.min(self.size())))
    }

    fn preferred_read_size(&self) -> u64 {
        u64::from(self.index.chunk_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(len: usize, set: impl IntoIterator<Item = usize>) -> Slots {
        let mut s = Slots {
            ids: vec![ChunkId::ZERO; len],
            filled: vec![0; len.div_ceil(64)],
        };
        for i in set {
            s.filled[i / 64] |= 1 << (i % 64);
        }
        s
    }

    #[test]
    fn first_unfilled_finds_the_first_gap_and_ignores_bits_past_the_end() {
        assert_eq!(slots(0, []).first_unfilled(), None);
        for len in [1, 63, 64, 65, 200] {
            assert_eq!(slots(len, 0..len).first_unfilled(), None, "len {len}");
            assert_eq!(slots(len, []).first_unfilled(), Some(0), "len {len}");
            let last = len - 1;
            assert_eq!(
                slots(len, 0..last).first_unfilled(),
                Some(last),
                "len {len}"
            );
        }
        assert_eq!(
            slots(200, (0..200).filter(|&i| i != 130)).first_unfilled(),
            Some(130)
        );
    }
}
