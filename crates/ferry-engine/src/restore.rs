//! Restore: a restore point's disk to a sparse raw file, a block device, any `ferry-image`
//! writer, or an NBD export.
//!
//! Chunks are fetched several at a time and authenticated (decrypt, decompress, re-hash
//! against the chunk id) before a byte is written. Raw targets get parallel positional writes
//! in which all-zero 64 KiB runs are skipped on a fresh sparse file (or written as
//! WRITE_ZEROES on devices and NBD exports); image formats are written strictly in order.
//! New files appear under their final name only when complete.

use crate::error::{EngineError, Result};
use crate::progress::{Progress, StageClock, TimeSplit};
use ferry_core::{BlockError, BlockTarget};
/// The file formats a disk restores to (the daemon names them through the engine).
pub use ferry_image::OutputFormat;
use ferry_image::{FileTarget, ImageWriter};
use ferry_nbd::NbdClient;
use ferry_repo::{ChunkId, DiskIndex, Manifest, Repository};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Granularity of hole detection inside restored chunks.
const ZERO_GRAIN: usize = 64 << 10;

/// Where a disk goes.
#[derive(Debug, Clone)]
pub enum RestoreTo {
    /// A file at this path in this format. A block device (or an existing file with
    /// [`OutputFormat::Raw`] and `in_place`) is written in place; anything else is created
    /// under a temporary name and renamed when complete.
    File {
        /// Output path.
        path: PathBuf,
        /// Output format.
        format: OutputFormat,
    },
    /// An NBD export at least as large as the disk.
    Nbd(Arc<NbdClient>),
}

/// Tuning and control of a restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Chunks fetched and written concurrently.
    pub fetches_in_flight: usize,
    /// Cancelling stops the restore and removes a partially written new file.
    pub cancel: CancellationToken,
    /// Live counters.
    pub progress: Arc<Progress>,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        Self {
            fetches_in_flight: 8,
            cancel: CancellationToken::new(),
            progress: Arc::new(Progress::new()),
        }
    }
}

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RestoreReport {
    /// The restore point.
    pub snapshot: String,
    /// The disk.
    pub disk: String,
    /// Where it went.
    pub target: String,
    /// Virtual size.
    pub size: u64,
    /// Chunks fetched from the repository.
    pub chunks_fetched: u64,
    /// Stored bytes fetched.
    pub fetched_bytes: u64,
    /// Bytes written to the target (zero runs excluded).
    pub written_bytes: u64,
    /// Bytes of all-zero chunks (left as holes or written as zeroes).
    pub zero_bytes: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Where the time went (source = repository fetches).
    pub time: TimeSplit,
}

#[derive(Default)]
struct Counters {
    fetched: AtomicU64,
    fetched_bytes: AtomicU64,
    written: AtomicU64,
    zero: AtomicU64,
}

/// Restores `disk` of restore point `manifest` to `to`.
pub async fn restore_disk(
    repo: &Repository,
    manifest: &Manifest,
    disk: &str,
    to: RestoreTo,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let index = repo
        .load_index(manifest, disk)
        .await
        .map_err(|e| EngineError::repo(disk, e))?;
    opts.progress.set_current(disk);
    opts.progress.add_total(index.disk_size);
    let job = Arc::new(Job {
        repo: repo.clone(),
        disk: disk.to_string(),
        index,
        clock: StageClock::default(),
        counters: Counters::default(),
        progress: opts.progress.clone(),
        in_flight: opts.fetches_in_flight.max(1),
        cpu: crate::cpu::CpuPool::new(std::thread::available_parallelism().map_or(2, |n| n.get()))?,
    });
    let run = async {
        match &to {
            RestoreTo::Nbd(client) => {
                let t: Arc<dyn BlockTarget> = client.clone();
                job.to_block_target(t, false).await
            }
            RestoreTo::File { path, format } => job.to_file(path, *format).await,
        }
    };
    let target_label = match &to {
        RestoreTo::Nbd(c) => c.uri_redacted(),
        RestoreTo::File { path, .. } => path.display().to_string(),
    };
    tokio::select! {
        biased;
        _ = opts.cancel.cancelled() => {
            if let RestoreTo::File { path, .. } = &to {
                let _ = std::fs::remove_file(temp_path(path));
            }
            return Err(EngineError::Cancelled);
        }
        r = run => r?,
    }
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let counters = &job.counters;
    Ok(RestoreReport {
        snapshot: manifest.id.clone(),
        disk: disk.to_string(),
        target: target_label,
        size: job.index.disk_size,
        chunks_fetched: l(&counters.fetched),
        fetched_bytes: l(&counters.fetched_bytes),
        written_bytes: l(&counters.written),
        zero_bytes: l(&counters.zero),
        seconds: started.elapsed().as_secs_f64(),
        time: job.clock.split(),
    })
}

/// The temporary name a new output file is written under.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.ferry-part"))
}

/// One disk's restore, shared by its per-chunk tasks.
struct Job {
    repo: Repository,
    disk: String,
    index: DiskIndex,
    clock: StageClock,
    counters: Counters,
    progress: Arc<Progress>,
    in_flight: usize,
    cpu: crate::cpu::CpuPool,
}

impl Job {
    /// Fetches and authenticates chunk `i` (`None` for a zero chunk).
    async fn fetch(&self, i: usize) -> Result<Option<Vec<u8>>> {
        let id: ChunkId = self.index.chunks[i];
        if id.is_zero() {
            let r = self.index.chunk_range(i);
            self.counters
                .zero
                .fetch_add(r.end - r.start, Ordering::Relaxed);
            return Ok(None);
        }
        let key = id.object_key();
        let t = Instant::now();
        let data = self
            .repo
            .store()
            .get(&key)
            .await
            .map_err(|e| EngineError::repo(&self.disk, e))?;
        self.clock.source(t);
        self.counters.fetched.fetch_add(1, Ordering::Relaxed);
        self.counters
            .fetched_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.progress.add_read(data.len() as u64);
        let codec = self.repo.codec().clone();
        let (plain, took) = self.cpu.run(move || codec.decode(&id, &data)).await?;
        self.clock.cpu(took);
        let plain = plain.map_err(|e| EngineError::repo(&self.disk, e))?;
        let r = self.index.chunk_range(i);
        if plain.len() as u64 != r.end - r.start {
            return Err(EngineError::repo(
                &self.disk,
                ferry_repo::RepoError::Corrupt {
                    key,
                    reason: format!(
                        "holds {} bytes, chunk {i} of the index needs {}",
                        plain.len(),
                        r.end - r.start
                    ),
                },
            ));
        }
        Ok(Some(plain))
    }

    fn target_err(&self, target: &str, source: BlockError) -> EngineError {
        EngineError::Target {
            disk: self.disk.to_string(),
            target: target.to_string(),
            source,
        }
    }

    /// Parallel positional writes, one task per non-zero chunk (at most `in_flight` at once,
    /// so a write blocking one worker thread never stalls the others' fetches). `fresh`: the
    /// target reads as zeros already (a new sparse file), so zero runs are skipped instead of
    /// written.
    async fn to_block_target(self: &Arc<Self>, t: Arc<dyn BlockTarget>, fresh: bool) -> Result<()> {
        let size = self.index.disk_size;
        let name = t.name();
        if t.size() < size {
            return Err(EngineError::TargetTooSmall {
                disk: self.disk.to_string(),
                target: name,
                target_size: t.size(),
                disk_size: size,
            });
        }
        let mut tasks = crate::tasks::ChunkTasks::new(self.in_flight);
        for i in 0..self.index.chunks.len() {
            if fresh && self.index.chunks[i].is_zero() {
                let r = self.index.chunk_range(i);
                self.counters
                    .zero
                    .fetch_add(r.end - r.start, Ordering::Relaxed);
                self.progress.add_done(r.end - r.start);
                continue;
            }
            let (job, t) = (self.clone(), t.clone());
            tasks
                .spawn(async move { job.write_chunk(i, &*t, fresh).await })
                .await?;
        }
        tasks.finish().await?;
        t.flush().await.map_err(|e| self.target_err(&name, e))
    }

    /// Fetches chunk `i` and writes it to `t`.
    async fn write_chunk(&self, i: usize, t: &dyn BlockTarget, fresh: bool) -> Result<()> {
        let name = t.name();
        let r = self.index.chunk_range(i);
        let len = r.end - r.start;
        let data = self.fetch(i).await?;
        let w = Instant::now();
        match data {
            None if fresh => {}
            None => t
                .write_zeroes(r.start, len)
                .await
                .map_err(|e| self.target_err(&name, e))?,
            Some(data) => {
                for (off, run, zero) in runs(&data) {
                    let at = r.start + off as u64;
                    if zero {
                        if !fresh {
                            t.write_zeroes(at, run.len() as u64)
                                .await
                                .map_err(|e| self.target_err(&name, e))?;
                        }
                    } else {
                        t.write_at(at, run)
                            .await
                            .map_err(|e| self.target_err(&name, e))?;
                        self.counters
                            .written
                            .fetch_add(run.len() as u64, Ordering::Relaxed);
                        self.progress.add_written(run.len() as u64);
                    }
                }
            }
        }
        self.clock.target(w);
        self.progress.add_done(len);
        Ok(())
    }

    async fn to_file(self: &Arc<Self>, path: &Path, format: OutputFormat) -> Result<()> {
        let size = self.index.disk_size;
        let is_device = std::fs::metadata(path)
            .map(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_block_device()
            })
            .unwrap_or(false);
        let image_err = |what: String| {
            move |source| EngineError::Image {
                what,
                source: Box::new(source),
            }
        };
        if is_device {
            if format != OutputFormat::Raw {
                return Err(EngineError::Usage(format!(
                    "{}: a block device takes raw data only",
                    path.display()
                )));
            }
            let t = FileTarget::open(path)
                .map_err(image_err(format!(
                    "cannot open {} for writing",
                    path.display()
                )))?
                .with_direct_io();
            return self.to_block_target(Arc::new(t), false).await;
        }
        if format == OutputFormat::Raw {
            let tmp = temp_path(path);
            let t = FileTarget::create(&tmp, size)
                .map_err(image_err(format!("cannot create {}", tmp.display())))?
                .with_direct_io();
            let r = self.to_block_target(Arc::new(t), true).await;
            if let Err(e) = r {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            std::fs::rename(&tmp, path).map_err(|e| EngineError::Target {
                disk: self.disk.to_string(),
                target: path.display().to_string(),
                source: BlockError::io(path.display(), "rename into place", e),
            })?;
            return Ok(());
        }
        let r = self.to_image(path, format).await;
        if r.is_err() {
            let _ = std::fs::remove_file(temp_path(path));
        }
        r
    }

    /// Image formats: fetched in parallel, written in order on a blocking thread.
    async fn to_image(&self, path: &Path, format: OutputFormat) -> Result<()> {
        let size = self.index.disk_size;
        let label = path.display().to_string();
        let writer =
            ImageWriter::create(path, format, size).map_err(|source| EngineError::Image {
                what: format!("cannot create {label}"),
                source: Box::new(source),
            })?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Vec<u8>)>(self.in_flight);
        let sink = tokio::task::spawn_blocking(move || {
            let mut w = writer;
            while let Some((off, data)) = rx.blocking_recv() {
                w.write(off, &data)?;
            }
            w.finish()
        });
        let feed = async {
            let mut chunks = futures::stream::iter(0..self.index.chunks.len())
                .map(|i| async move { self.fetch(i).await.map(|d| (i, d)) })
                .buffered(self.in_flight);
            while let Some((i, data)) = chunks.try_next().await? {
                let r = self.index.chunk_range(i);
                if let Some(data) = data {
                    let w = Instant::now();
                    let n = data.len() as u64;
                    if tx.send((r.start, data)).await.is_err() {
                        // The writer stopped: its error is reported below.
                        break;
                    }
                    self.clock.target(w);
                    self.counters.written.fetch_add(n, Ordering::Relaxed);
                    self.progress.add_written(n);
                }
                self.progress.add_done(r.end - r.start);
            }
            Ok::<_, EngineError>(())
        };
        let fed = feed.await;
        drop(tx);
        let done = sink
            .await
            .map_err(|e| EngineError::Internal(format!("image writer task failed: {e}")))?;
        fed?;
        done.map(|_| ()).map_err(|source| EngineError::Image {
            what: format!("writing {label}"),
            source: Box::new(source),
        })
    }
}

/// Splits `data` into maximal runs of all-zero and non-zero [`ZERO_GRAIN`] pieces:
/// `(offset, bytes, is_zero)`.
fn runs(data: &[u8]) -> Vec<(usize, &[u8], bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for (k, piece) in data.chunks(ZERO_GRAIN).enumerate() {
        let z = ferry_repo::codec::is_all_zero(piece);
        let off = k * ZERO_GRAIN;
        match out.last_mut() {
            Some((_, len, lz)) if *lz == z => *len += piece.len(),
            _ => out.push((off, piece.len(), z)),
        }
    }
    out.into_iter()
        .map(|(o, l, z)| (o, &data[o..o + l], z))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_zero_and_data() {
        let mut d = vec![0u8; 4 * ZERO_GRAIN + 100];
        d[ZERO_GRAIN + 5] = 1;
        d[2 * ZERO_GRAIN] = 1;
        d[4 * ZERO_GRAIN + 99] = 1;
        let r: Vec<(usize, usize, bool)> =
            runs(&d).iter().map(|(o, b, z)| (*o, b.len(), *z)).collect();
        assert_eq!(
            r,
            vec![
                (0, ZERO_GRAIN, true),
                (ZERO_GRAIN, 2 * ZERO_GRAIN, false),
                (3 * ZERO_GRAIN, ZERO_GRAIN, true),
                (4 * ZERO_GRAIN, 100, false),
            ]
        );
        assert!(runs(&[]).is_empty());
    }
}
