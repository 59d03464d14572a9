//! Backup: disks (any [`BlockSource`]) into one restore point.
//!
//! Per disk, every chunk of the repository's fixed grid takes one of these paths, cheapest
//! first:
//! 1. change tracking says it is unchanged → its id is taken from the previous index (no I/O);
//! 2. the source reports no allocated byte in it → zero sentinel (no I/O);
//! 3. read its allocated bytes (holes inside it are zero-filled, never read), then on the CPU
//!    pool: word-wise zero check → zero sentinel; keyed hash → known id (catalog or previous
//!    index) → reuse; otherwise compress + encrypt, then upload.
//!
//! Up to `reads_in_flight` chunks move through read → CPU → upload at once; CPU work runs on
//! at most `cpu_workers` blocking threads; read buffers are pooled. Memory is therefore bounded
//! by the chunks in flight, never by the disk size (the index itself is 33 bytes per chunk).
//!
//! **Trust but verify**: before a changed-block backup takes unchanged chunks from the previous
//! index, it re-reads a random sample of them (`verify_fraction`, default 1 %) and compares
//! their hashes. On a mismatch the change tracking is reported as broken, this backup reads the
//! whole disk instead, and the disk's change token is stored as [`UNTRUSTED_TOKEN`], which makes
//! the next changed-block backup of that disk read everything too.

use crate::error::{EngineError, Result};
use crate::progress::{Progress, RateLimiter, TimeSplit};
use ferry_core::{BlockSource, ExtentMap};
use ferry_repo::{
    BackupWriter, ChunkCodec, ChunkId, DiskIndex, DiskWriter, Repository, SnapshotMeta,
};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// The change token stored for a disk whose change tracking failed verification: the next
/// changed-block backup of that disk ignores its change tracking and reads everything.
pub const UNTRUSTED_TOKEN: &str = "cbt-untrusted";

/// One disk to back up.
#[derive(Debug, Clone)]
pub struct BackupDisk {
    /// Name in the restore point (unique within it).
    pub name: String,
    /// Where the data comes from.
    pub source: Arc<dyn BlockSource>,
    /// Byte extents changed since the previous restore point of this VM (from a dirty bitmap
    /// or a hypervisor's change tracking); `None` reads all allocated data.
    pub changed: Option<ExtentMap>,
    /// Stored with the disk for the next backup (e.g. `qemu-dirty-bitmap:b0`).
    pub change_token: Option<String>,
}

/// Tuning and control of a backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Chunks read, processed and uploaded concurrently per disk.
    pub reads_in_flight: usize,
    /// Threads hashing, compressing and encrypting (a fixed pool; see `cpu.rs`).
    pub cpu_workers: usize,
    /// Fraction (0..=1) of change-tracking-unchanged chunks to re-read and verify.
    pub verify_fraction: f64,
    /// Cap on bytes read from sources per second.
    pub limit_rate: Option<u64>,
    /// Cancelling stops the backup; nothing becomes visible.
    pub cancel: CancellationToken,
    /// Live counters.
    pub progress: Arc<Progress>,
    /// Seed of the verification sample (random when `None`).
    pub seed: Option<u64>,
    /// Read Linux swap and NTFS paging files as zeros instead of storing them (ADR 0071).
    pub exclude_swap: bool,
}

impl Default for BackupOptions {
    fn default() -> Self {
        Self {
            reads_in_flight: 8,
            cpu_workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            verify_fraction: 0.01,
            limit_rate: None,
            cancel: CancellationToken::new(),
            progress: Arc::new(Progress::new()),
            seed: None,
            exclude_swap: true,
        }
    }
}

/// How a disk was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupMode {
    /// All allocated data read; chunks already stored are not uploaded again.
    Full,
    /// Only chunks touched by change tracking read; the rest from the previous index.
    ChangedBlocks,
    /// Change tracking was given but not trusted (failed verification now or last time, or
    /// no usable previous index): all allocated data read.
    FullCbtDistrusted,
}

/// Outcome of the trust-but-verify sample.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyOutcome {
    /// Unchanged chunks re-read and hashed.
    pub sampled: u64,
    /// Byte offsets of sampled chunks whose content differs from the previous restore point
    /// although change tracking called them unchanged.
    pub mismatched_offsets: Vec<u64>,
}

/// What happened to one disk. Byte counts are in source (plaintext) bytes unless named
/// otherwise; `read + holes + unchanged` covers the disk, and `zero + reused + new` covers
/// the chunks that were read.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DiskReport {
    /// Disk name.
    pub name: String,
    /// The source it was read from.
    pub source: String,
    /// Virtual size.
    pub size: u64,
    /// How it was read.
    pub mode: BackupMode,
    /// Chunks in the index.
    pub chunks: u64,
    /// Bytes read from the source.
    pub read_bytes: u64,
    /// Bytes skipped without reading because the source reported them unallocated.
    pub hole_bytes: u64,
    /// Bytes of chunks read that turned out all zero (never hashed or stored).
    pub zero_bytes: u64,
    /// Bytes of chunks change tracking called unchanged (taken from the previous index).
    pub unchanged_bytes: u64,
    /// Bytes of chunks read whose content was already stored.
    pub reused_bytes: u64,
    /// Bytes of chunks stored by this backup.
    pub new_bytes: u64,
    /// Stored (compressed, encrypted) bytes uploaded.
    pub uploaded_bytes: u64,
    /// Trust-but-verify result, for changed-block backups.
    pub verify: Option<VerifyOutcome>,
    /// Allocated bytes left unread because they belong to swap or paging files (counted in
    /// `hole_bytes` too).
    pub excluded_bytes: u64,
    /// What was excluded (swap partitions and files, NTFS paging files).
    pub excluded: Vec<ferry_fs::Exclusion>,
    /// Bytes read from the source to find swap and paging files (not part of `read_bytes`).
    pub probe_bytes: u64,
}

/// What a backup did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackupReport {
    /// The new restore point.
    pub snapshot: String,
    /// The VM id.
    pub vm: String,
    /// The previous restore point of the VM, if any.
    pub previous: Option<String>,
    /// Per-disk detail.
    pub disks: Vec<DiskReport>,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Where the time went.
    pub time: TimeSplit,
    /// Whether change tracking failed verification on any disk.
    pub cbt_mismatch: bool,
}

impl BackupReport {
    /// Sums a per-disk counter.
    pub fn total(&self, f: impl Fn(&DiskReport) -> u64) -> u64 {
        self.disks.iter().map(f).sum()
    }
}

#[derive(Default)]
struct Counters {
    read: AtomicU64,
    holes: AtomicU64,
    zero: AtomicU64,
    unchanged: AtomicU64,
    reused: AtomicU64,
    new: AtomicU64,
    uploaded: AtomicU64,
}

/// Reusable chunk buffers: fresh 4 MiB allocations cost a page fault per 4 KiB.
struct BufferPool {
    size: usize,
    free: Mutex<Vec<ChunkBuf>>,
}

/// Alignment of chunk buffers: lets a local source read straight into them with `O_DIRECT`.
const BUF_ALIGN: usize = ferry_core::aligned::DIRECT_ALIGN;

/// A pooled chunk buffer that starts on a [`BUF_ALIGN`] boundary.
struct ChunkBuf {
    mem: Vec<u8>,
    at: usize,
    len: usize,
}

impl std::ops::Deref for ChunkBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.mem[self.at..self.at + self.len]
    }
}

impl std::ops::DerefMut for ChunkBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.at..self.at + self.len]
    }
}

/// A chunk's bytes: a pooled buffer the source read into, or a buffer the source already
/// held them in (an NBD reply as received), used without a copy.
enum ChunkData {
    Pooled(ChunkBuf),
    Shared(bytes::Bytes),
}

impl std::ops::Deref for ChunkData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ChunkData::Pooled(b) => b,
            ChunkData::Shared(b) => b,
        }
    }
}

impl BufferPool {
    /// A buffer of `len` (≤ the chunk size) bytes; its contents are unspecified.
    fn get(&self, len: usize) -> ChunkBuf {
        let mut b = self
            .free
            .lock()
            .expect("pool lock")
            .pop()
            .unwrap_or_else(|| {
                let mem = vec![0; self.size + BUF_ALIGN];
                let at = mem.as_ptr().align_offset(BUF_ALIGN);
                ChunkBuf { mem, at, len: 0 }
            });
        debug_assert!(len <= self.size, "chunk of {len} bytes over the pool size");
        b.len = len.min(self.size);
        b
    }
    fn put(&self, b: ChunkBuf) {
        self.free.lock().expect("pool lock").push(b);
    }
    /// Takes back a chunk's buffer if it came from the pool.
    fn recycle(&self, d: ChunkData) {
        if let ChunkData::Pooled(b) = d {
            self.put(b);
        }
    }
}

/// Shared state of one backup run.
struct Ctx {
    codec: ChunkCodec,
    cpu: crate::cpu::CpuPool,
    pool: BufferPool,
    limiter: Option<RateLimiter>,
    progress: Arc<Progress>,
    reads_in_flight: usize,
    chunk_size: u64,
}

/// What the CPU stage made of a chunk that was read.
enum Processed {
    Zero,
    Known(ChunkId),
    New(ferry_repo::EncodedChunk),
}

/// What every chunk task of one disk shares.
struct DiskJob {
    disk: BackupDisk,
    dw: DiskWriter,
    allocated: ExtentMap,
    counters: Counters,
}

/// Backs up `disks` into a new restore point of `meta.vm` and commits it. On error or
/// cancellation nothing becomes visible (uploaded chunks are kept and reused by the next run).
pub async fn backup(
    repo: &Repository,
    meta: SnapshotMeta,
    disks: Vec<BackupDisk>,
    opts: &BackupOptions,
) -> Result<BackupReport> {
    if disks.is_empty() {
        return Err(EngineError::Usage(
            "a backup needs at least one disk".into(),
        ));
    }
    if !(0.0..=1.0).contains(&opts.verify_fraction) {
        return Err(EngineError::Usage(format!(
            "verify fraction {} must be between 0 and 1",
            opts.verify_fraction
        )));
    }
    let started = Instant::now();
    let vm = meta.vm.id.clone();
    let mut meta = meta;
    let run = async {
        let mut exclusions = Vec::with_capacity(disks.len());
        let mut probe_bytes = Vec::with_capacity(disks.len());
        for d in &disks {
            let (found, probed) = if opts.exclude_swap {
                crate::exclude::detect(&d.name, &d.source).await
            } else {
                (Vec::new(), 0)
            };
            probe_bytes.push(probed);
            if !found.is_empty() {
                meta.labels.insert(
                    crate::exclude::label_key(&d.name),
                    serde_json::to_string(&found).expect("exclusions serialize"),
                );
            }
            exclusions.push(found);
        }
        if !opts.exclude_swap {
            meta.labels
                .insert(crate::exclude::LABEL_OFF.into(), "off".into());
        }
        let writer = repo
            .begin_backup(meta)
            .await
            .map_err(|e| EngineError::repo("-", e))?;
        // The progress's clock may have run before (one Progress over several VMs): the
        // report's split is what this backup added.
        let clock0 = opts.progress.clock.raw();
        let ctx = Arc::new(Ctx {
            codec: repo.codec().clone(),
            cpu: crate::cpu::CpuPool::new(opts.cpu_workers)?,
            pool: BufferPool {
                size: repo.config().chunk_size as usize,
                free: Mutex::new(Vec::new()),
            },
            limiter: opts.limit_rate.map(RateLimiter::new),
            progress: opts.progress.clone(),
            reads_in_flight: opts.reads_in_flight.max(1),
            chunk_size: u64::from(repo.config().chunk_size),
        });
        for d in &disks {
            opts.progress.add_total(d.source.size());
        }
        let mut writers = Vec::with_capacity(disks.len());
        let mut reports = Vec::with_capacity(disks.len());
        for (n, (d, excl)) in disks.iter().zip(exclusions).enumerate() {
            let seed = opts.seed.unwrap_or_else(random_seed).wrapping_add(n as u64);
            let (dw, mut report) =
                backup_disk(&writer, d, excl, opts.verify_fraction, seed, &ctx).await?;
            report.probe_bytes = probe_bytes[n];
            writers.push(dw);
            reports.push(report);
        }
        let snapshot = writer.id().to_string();
        let previous = writer.previous().map(|m| m.id.clone());
        writer
            .commit(writers)
            .await
            .map_err(|e| EngineError::repo("-", e))?;
        let cbt_mismatch = reports.iter().any(|r| {
            r.verify
                .as_ref()
                .is_some_and(|v| !v.mismatched_offsets.is_empty())
        });
        Ok(BackupReport {
            snapshot,
            vm,
            previous,
            disks: reports,
            seconds: started.elapsed().as_secs_f64(),
            time: TimeSplit::between(clock0, ctx.progress.clock.raw()),
            cbt_mismatch,
        })
    };
    tokio::select! {
        biased;
        _ = opts.cancel.cancelled() => Err(EngineError::Cancelled),
        r = run => r,
    }
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // A failing OS RNG only makes the sample predictable, which is harmless.
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

/// splitmix64: a tiny deterministic generator for the verification sample.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Picks `ceil(fraction × len)` distinct elements of `items` (at least one when the fraction
/// is non-zero), in ascending order.
pub(crate) fn sample(items: &[u64], fraction: f64, seed: u64) -> Vec<u64> {
    if fraction <= 0.0 || items.is_empty() {
        return Vec::new();
    }
    let k = ((items.len() as f64 * fraction).ceil() as usize).clamp(1, items.len());
    let mut v = items.to_vec();
    let mut st = seed;
    for i in 0..k {
        let j = i + (splitmix(&mut st) % (v.len() - i) as u64) as usize;
        v.swap(i, j);
    }
    v.truncate(k);
    v.sort_unstable();
    v
}

/// Byte range of chunk `i` of a disk of `size` bytes cut into `cs`-byte chunks.
fn chunk_range(i: u64, cs: u64, size: u64) -> Range<u64> {
    let start = i * cs;
    start..(start + cs).min(size)
}

async fn backup_disk(
    writer: &BackupWriter,
    d: &BackupDisk,
    excluded: Vec<ferry_fs::Exclusion>,
    verify_fraction: f64,
    seed: u64,
    ctx: &Arc<Ctx>,
) -> Result<(DiskWriter, DiskReport)> {
    let src = &d.source;
    let size = src.size();
    ctx.progress.set_current(&d.name);
    let repo_err = |e| EngineError::repo(&d.name, e);
    let src_err = |e| EngineError::Source {
        disk: d.name.clone(),
        source: e,
    };
    let prev_token = writer
        .previous()
        .and_then(|m| m.disks.iter().find(|x| x.name == d.name))
        .and_then(|x| x.change_token.clone());
    // Loading the previous index also makes its chunk ids known, so even a full read uploads
    // only what changed.
    let prev = writer.previous_index(&d.name).await.map_err(repo_err)?;
    let cs = ctx.chunk_size;
    let n = DiskIndex::chunk_count(size, cs as u32);
    let allocated = src.allocated(0..size).await.map_err(src_err)?;
    // Swap and paging files: not read, so stored as zeros (holes).
    let excl_map = crate::exclude::extents(&excluded).clip(0..size);
    let excluded_bytes = allocated.intersection(&excl_map).total_len();
    let allocated = allocated.difference(&excl_map);
    // Where exclusions differ from the previous restore point's, change tracking cannot tell
    // (the guest did not write there): those chunks are read again.
    let prev_excl = writer
        .previous()
        .map(|m| crate::exclude::extents(&crate::exclude::from_labels(&m.meta.labels, &d.name)))
        .unwrap_or_default()
        .clip(0..size);
    let excl_moved = excl_map
        .difference(&prev_excl)
        .union(&prev_excl.difference(&excl_map));
    let d_changed = d.changed.as_ref().map(|c| c.union(&excl_moved));
    tracing::info!(disk = %d.name, source = %src.name(), size, allocated = allocated.total_len(),
        changed = %d.changed.as_ref().map_or_else(|| "all".to_string(), |c| c.total_len().to_string()),
        "backing up disk");

    let usable_prev = prev
        .as_ref()
        .filter(|p| p.disk_size == size && u64::from(p.chunk_size) == cs);
    let mut mode = BackupMode::Full;
    let mut verify = None;
    let mut changed = None;
    let mut change_token = d.change_token.clone();
    if let Some(ch) = &d_changed {
        match usable_prev {
            Some(p) if prev_token.as_deref() != Some(UNTRUSTED_TOKEN) => {
                let unchanged: Vec<u64> = (0..n)
                    .filter(|&i| !ch.intersects(chunk_range(i, cs, size)))
                    .collect();
                let picked = sample(&unchanged, verify_fraction, seed);
                let mismatched = verify_sample(d, p, &allocated, &picked, ctx).await?;
                if mismatched.is_empty() {
                    mode = BackupMode::ChangedBlocks;
                    changed = Some(ch);
                } else {
                    tracing::error!(disk = %d.name, source = %src.name(), mismatched = mismatched.len(),
                        sampled = picked.len(), first_offset = mismatched[0],
                        "CHANGE TRACKING IS BROKEN: chunks it called unchanged differ from the previous restore point; reading the whole disk now and on the next backup");
                    mode = BackupMode::FullCbtDistrusted;
                    change_token = Some(UNTRUSTED_TOKEN.to_string());
                }
                verify = Some(VerifyOutcome {
                    sampled: picked.len() as u64,
                    mismatched_offsets: mismatched,
                });
            }
            _ => {
                let why = if usable_prev.is_none() {
                    "no previous restore point of this disk with the same size"
                } else {
                    "its change tracking failed verification last time"
                };
                tracing::warn!(disk = %d.name, reason = %why, "not trusting change tracking: reading all allocated data");
                mode = BackupMode::FullCbtDistrusted;
            }
        }
    }
    let dw = writer
        .add_disk(&d.name, size, change_token)
        .map_err(repo_err)?;
    let job = Arc::new(DiskJob {
        disk: d.clone(),
        dw,
        allocated,
        counters: Counters::default(),
    });
    run_chunks(&job, changed, usable_prev, ctx).await?;
    let job = Arc::try_unwrap(job)
        .map_err(|_| EngineError::Internal("a chunk task outlived its disk".into()))?;
    let mut report = report(d, size, n, mode, verify, &job.counters);
    report.excluded_bytes = excluded_bytes;
    report.excluded = excluded;
    Ok((job.dw, report))
}

fn report(
    d: &BackupDisk,
    size: u64,
    chunks: u64,
    mode: BackupMode,
    verify: Option<VerifyOutcome>,
    c: &Counters,
) -> DiskReport {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    DiskReport {
        name: d.name.clone(),
        source: d.source.name(),
        size,
        mode,
        chunks,
        read_bytes: l(&c.read),
        hole_bytes: l(&c.holes),
        zero_bytes: l(&c.zero),
        unchanged_bytes: l(&c.unchanged),
        reused_bytes: l(&c.reused),
        new_bytes: l(&c.new),
        uploaded_bytes: l(&c.uploaded),
        verify,
        excluded_bytes: 0,
        excluded: Vec::new(),
        probe_bytes: 0,
    }
}

/// Reads the allocated parts of `range` (holes zero-filled): a wholly allocated chunk as the
/// source's own buffer when it has one, else into a pooled buffer.
async fn read_chunk(
    d: &BackupDisk,
    range: Range<u64>,
    allocated: &ExtentMap,
    ctx: &Ctx,
) -> Result<(ChunkData, u64)> {
    let len = range.end - range.start;
    let t = Instant::now();
    let parts = allocated.clip(range.clone());
    let read = parts.total_len();
    if let Some(l) = &ctx.limiter {
        l.acquire(read).await;
    }
    let source_err = |source| EngineError::Source {
        disk: d.name.clone(),
        source,
    };
    let shared = if read == len {
        d.source
            .read_shared(range.start, len as usize)
            .await
            .map_err(source_err)?
            .filter(|b| b.len() as u64 == len)
    } else {
        None
    };
    let data = match shared {
        Some(b) => ChunkData::Shared(b),
        None => {
            let mut buf = ctx.pool.get(len as usize);
            let mut pos = range.start;
            for e in parts.iter() {
                buf[(pos - range.start) as usize..(e.offset - range.start) as usize].fill(0);
                let dst =
                    &mut buf[(e.offset - range.start) as usize..(e.end() - range.start) as usize];
                if let Err(err) = d.source.read_at(e.offset, dst).await {
                    ctx.pool.put(buf);
                    return Err(source_err(err));
                }
                pos = e.end();
            }
            buf[(pos - range.start) as usize..].fill(0);
            ChunkData::Pooled(buf)
        }
    };
    ctx.progress.clock.source(t);
    ctx.progress.add_read(read);
    Ok((data, read))
}

/// Runs `f` on the CPU pool, timing it.
async fn on_cpu<T: Send + 'static>(ctx: &Ctx, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let (r, took) = ctx.cpu.run(f).await?;
    ctx.progress.clock.cpu(took);
    Ok(r)
}

/// Re-reads the `picked` chunks and returns the offsets of those whose id differs from `prev`.
async fn verify_sample(
    d: &BackupDisk,
    prev: &DiskIndex,
    allocated: &ExtentMap,
    picked: &[u64],
    ctx: &Ctx,
) -> Result<Vec<u64>> {
    let mut bad: Vec<u64> = futures::stream::iter(picked.iter().copied())
        .map(|i| async move {
            let range = chunk_range(i, ctx.chunk_size, d.source.size());
            let (buf, _) = read_chunk(d, range.clone(), allocated, ctx).await?;
            let codec = ctx.codec.clone();
            let (id, buf) = on_cpu(ctx, move || {
                let id = if ferry_repo::codec::is_all_zero(&buf) {
                    ChunkId::ZERO
                } else {
                    codec.id(&buf)
                };
                (id, buf)
            })
            .await?;
            ctx.pool.recycle(buf);
            let expected = prev.chunks.get(i as usize).copied();
            Ok::<_, EngineError>((expected != Some(id)).then_some(range.start))
        })
        .buffer_unordered(ctx.reads_in_flight)
        .try_filter_map(|x| async move { Ok(x) })
        .try_collect()
        .await?;
    bad.sort_unstable();
    Ok(bad)
}

/// Fills every chunk of the disk. Chunks that need no I/O are settled inline; every other
/// chunk runs as its own task (at most `reads_in_flight` at once), so a read blocking one
/// worker thread never stalls the other chunks' CPU work or uploads.
async fn run_chunks(
    job: &Arc<DiskJob>,
    changed: Option<&ExtentMap>,
    prev: Option<&DiskIndex>,
    ctx: &Arc<Ctx>,
) -> Result<()> {
    let repo_err = |e| EngineError::repo(&job.disk.name, e);
    let mut tasks = crate::tasks::ChunkTasks::new(ctx.reads_in_flight);
    for i in 0..job.dw.chunk_count() {
        let range = job.dw.chunk_range(i);
        let len = range.end - range.start;
        if let (Some(ch), Some(p)) = (changed, prev) {
            if !ch.intersects(range.clone()) {
                job.dw
                    .reuse_chunk(i, p.chunks[i as usize])
                    .map_err(repo_err)?;
                job.counters.unchanged.fetch_add(len, Ordering::Relaxed);
                ctx.progress.add_done(len);
                continue;
            }
        }
        if !job.allocated.intersects(range.clone()) {
            job.dw.zero_chunk(i).map_err(repo_err)?;
            job.counters.holes.fetch_add(len, Ordering::Relaxed);
            ctx.progress.add_done(len);
            continue;
        }
        let (job, ctx) = (job.clone(), ctx.clone());
        tasks
            .spawn(async move { chunk_task(job, i, range, &ctx).await })
            .await?;
    }
    tasks.finish().await
}

/// Read → zero check → hash → (unknown only) compress + encrypt → upload, for chunk `i`.
async fn chunk_task(job: Arc<DiskJob>, i: u64, range: Range<u64>, ctx: &Ctx) -> Result<()> {
    let len = range.end - range.start;
    let c = &job.counters;
    let (buf, read) = read_chunk(&job.disk, range, &job.allocated, ctx).await?;
    c.read.fetch_add(read, Ordering::Relaxed);
    c.holes.fetch_add(len - read, Ordering::Relaxed);
    let codec = ctx.codec.clone();
    let j = job.clone();
    let (res, buf) = on_cpu(ctx, move || {
        let r = if ferry_repo::codec::is_all_zero(&buf) {
            Ok(Processed::Zero)
        } else {
            let id = codec.id(&buf);
            // Hash first: a known chunk is never compressed or encrypted. The known set only
            // grows during a backup, so a hit stays valid.
            if j.dw.is_known(&id) {
                Ok(Processed::Known(id))
            } else {
                codec.encode_with_id(id, &buf).map(Processed::New)
            }
        };
        (r, buf)
    })
    .await?;
    ctx.pool.recycle(buf);
    let repo_err = |e| EngineError::repo(&job.disk.name, e);
    match res.map_err(repo_err)? {
        Processed::Zero => {
            job.dw.zero_chunk(i).map_err(repo_err)?;
            c.zero.fetch_add(len, Ordering::Relaxed);
        }
        Processed::Known(id) => {
            job.dw.reuse_chunk(i, id).map_err(repo_err)?;
            c.reused.fetch_add(len, Ordering::Relaxed);
        }
        Processed::New(enc) => return finish_new(&job.dw, i, len, enc, c, ctx).await,
    }
    ctx.progress.add_done(len);
    Ok(())
}

async fn finish_new(
    dw: &DiskWriter,
    i: u64,
    len: u64,
    enc: ferry_repo::EncodedChunk,
    c: &Counters,
    ctx: &Ctx,
) -> Result<()> {
    let stored = enc.data.len() as u64;
    let t = Instant::now();
    dw.put_encoded(i, enc)
        .await
        .map_err(|e| EngineError::repo(dw.name(), e))?;
    ctx.progress.clock.target(t);
    c.new.fetch_add(len, Ordering::Relaxed);
    c.uploaded.fetch_add(stored, Ordering::Relaxed);
    ctx.progress.add_written(stored);
    ctx.progress.add_done(len);
    Ok(())
}
