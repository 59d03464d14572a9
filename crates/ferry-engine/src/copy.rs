//! Copy jobs: restore points from one repository into another (ADR 0061).
//!
//! The two repositories have their own keys, so a chunk is fetched from the source, opened and
//! re-hashed with the source's keys, and — unless the destination already holds it — encoded
//! with the destination's chunk-id key, compression and encryption, written, read back and
//! authenticated, and only then published to the destination's catalog. A restore point keeps
//! its id, times, VM and labels; its manifest is written last, so a killed copy leaves nothing
//! that looks complete and a re-run skips every chunk that arrived.
//!
//! What is never fetched: zero chunks, and chunks whose source id sits at the same position in
//! the previous restore point of the same VM that both repositories hold (the destination's
//! index of that one gives the destination id, the way a changed-block backup reuses unchanged
//! chunks). What is fetched but not sent: chunks whose destination id the destination's
//! catalog lists, or whose object is already there (an interrupted run's unpublished tail).
//!
//! Memory is bounded by `in_flight` chunks per disk (each at most a stored object, its
//! plaintext and its re-encoded object) plus two or three chunk-id indexes of the disk.

use crate::error::{EngineError, Result};
use crate::progress::RateLimiter;
use ferry_core::block::BlockSource;
use ferry_repo::{ChunkId, DiskIndex, DiskWriter, Manifest, PutOutcome, Repository};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Settings of a copy job.
#[derive(Clone, Copy, Debug)]
pub struct CopyOptions {
    /// Chunks fetched, re-encoded and written at once, per disk.
    pub in_flight: usize,
    /// Cap on the bytes fetched from the source per second.
    pub limit_rate: Option<u64>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            in_flight: 8,
            limit_rate: None,
        }
    }
}

/// What a copy job did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CopyReport {
    /// Restore points written to the destination, oldest first.
    pub copied: Vec<String>,
    /// Selected restore points the destination already held.
    pub already_present: Vec<String>,
    /// Chunks written to the destination (each read back and authenticated).
    pub chunks_sent: u64,
    /// Non-zero chunks not sent: known to the destination, or found there already.
    pub chunks_skipped: u64,
    /// Of the skipped chunks, those never fetched from the source (same position and id in
    /// the previous restore point both repositories hold).
    pub chunks_not_fetched: u64,
    /// All-zero chunks (never stored).
    pub zero_chunks: u64,
    /// Bytes fetched from the source: stored (compressed, encrypted) sizes; plaintext bytes
    /// read when the two repositories use different chunk sizes.
    pub bytes_read: u64,
    /// Bytes written to the destination (stored sizes).
    pub bytes_written: u64,
    /// Boot-verification records (with their screenshots) copied beside the restore points,
    /// each read back and checked.
    pub verifications_copied: u64,
    /// Wall time.
    pub seconds: f64,
}

#[derive(Default)]
struct Counters {
    bytes_read: AtomicU64,
    not_fetched: AtomicU64,
}

/// Copies the restore points `selected` (ids of `source_manifests`, the source's restore
/// points) that `dst` lacks, oldest first.
pub async fn copy(
    src: &Repository,
    dst: &Repository,
    source_manifests: &[Manifest],
    selected: &[String],
    opts: CopyOptions,
) -> Result<CopyReport> {
    let start = Instant::now();
    let mut present: BTreeSet<String> = dst
        .snapshot_ids()
        .await
        .map_err(|e| EngineError::repo("-", e))?
        .into_iter()
        .collect();
    let mut todo: Vec<&Manifest> = source_manifests
        .iter()
        .filter(|m| selected.contains(&m.id))
        .collect();
    todo.sort_by(|a, b| a.id.cmp(&b.id));
    let limiter = opts.limit_rate.map(RateLimiter::new);
    let counters = Counters::default();
    let mut report = CopyReport::default();
    for m in todo {
        if present.contains(&m.id) {
            report.already_present.push(m.id.clone());
            report.verifications_copied += copy_verifications(src, dst, &m.id).await?;
            continue;
        }
        // The newest older restore point of the same VM that both repositories hold.
        let base = source_manifests
            .iter()
            .filter(|p| p.meta.vm.id == m.meta.vm.id && p.id < m.id && present.contains(&p.id))
            .max_by(|a, b| a.id.cmp(&b.id));
        let writer = dst
            .begin_copy(m, base.map(|b| b.id.as_str()))
            .await
            .map_err(|e| EngineError::repo("-", e))?;
        // Pruned from the destination meanwhile: no positional reuse.
        let base = base.filter(|_| writer.previous().is_some());
        let mut disks = Vec::with_capacity(m.disks.len());
        for d in &m.disks {
            let dw = writer
                .add_disk(&d.name, d.size, d.change_token.clone())
                .map_err(|e| EngineError::repo(&d.name, e))?;
            let ctx = DiskCopy {
                src,
                manifest: m,
                disk: &dw,
                limiter: limiter.as_ref(),
                counters: &counters,
                in_flight: opts.in_flight.max(1),
            };
            if d.chunk_size == dw.chunk_size() {
                let src_index = src
                    .load_index(m, &d.name)
                    .await
                    .map_err(|e| EngineError::repo(&d.name, e))?;
                let prev = match base {
                    Some(b) => previous_pair(src, &writer, b, &d.name, d.chunk_size).await?,
                    None => None,
                };
                ctx.same_grid(&src_index, prev.as_ref()).await?;
            } else {
                ctx.regrid().await?;
            }
            disks.push(dw);
        }
        let stats_before_commit = writer.stats();
        let committed = writer
            .commit(disks)
            .await
            .map_err(|e| EngineError::repo("-", e))?;
        report.chunks_sent += stats_before_commit.uploaded;
        report.bytes_written += stats_before_commit.uploaded_bytes;
        report.chunks_skipped += stats_before_commit.reused + stats_before_commit.already_present;
        report.zero_chunks += stats_before_commit.zero;
        tracing::info!(snapshot = %committed.id, sent = stats_before_commit.uploaded, "restore point copied");
        report.verifications_copied += copy_verifications(src, dst, &committed.id).await?;
        present.insert(committed.id.clone());
        report.copied.push(committed.id);
    }
    report.bytes_read = counters.bytes_read.load(Ordering::Relaxed);
    report.chunks_not_fetched = counters.not_fetched.load(Ordering::Relaxed);
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Copies the boot-verification records of restore point `id` that `dst` lacks (ADR 0103):
/// each is authenticated in the source, re-sealed for the destination under the same key, and
/// read back there. Returns how many were copied.
async fn copy_verifications(src: &Repository, dst: &Repository, id: &str) -> Result<u64> {
    let repo_err = |e| EngineError::repo("-", e);
    let have: BTreeSet<String> = dst
        .boot_verifications(id)
        .await
        .map_err(repo_err)?
        .into_iter()
        .map(|v| v.key)
        .collect();
    let mut n = 0;
    for v in src.boot_verifications(id).await.map_err(repo_err)? {
        if have.contains(&v.key) {
            continue;
        }
        let png = match &v.screenshot {
            Some(k) => Some(src.load_screenshot(k).await.map_err(repo_err)?),
            None => None,
        };
        dst.import_boot_verification(&v, png.as_deref())
            .await
            .map_err(repo_err)?;
        n += 1;
    }
    Ok(n)
}

/// The source's and the destination's index of disk `name` of restore point `base`, when
/// both use `chunk_size`.
async fn previous_pair(
    src: &Repository,
    writer: &ferry_repo::BackupWriter,
    base: &Manifest,
    name: &str,
    chunk_size: u32,
) -> Result<Option<(DiskIndex, DiskIndex)>> {
    if !base
        .disks
        .iter()
        .any(|d| d.name == name && d.chunk_size == chunk_size)
    {
        return Ok(None);
    }
    let Some(dst_index) = writer
        .previous_index(name)
        .await
        .map_err(|e| EngineError::repo(name, e))?
    else {
        return Ok(None);
    };
    if dst_index.chunk_size != chunk_size {
        return Ok(None);
    }
    let src_index = src
        .load_index(base, name)
        .await
        .map_err(|e| EngineError::repo(name, e))?;
    Ok(Some((src_index, dst_index)))
}

struct DiskCopy<'a> {
    src: &'a Repository,
    manifest: &'a Manifest,
    disk: &'a DiskWriter,
    limiter: Option<&'a RateLimiter>,
    counters: &'a Counters,
    in_flight: usize,
}

impl DiskCopy<'_> {
    /// Same chunk size on both sides: chunk `i` of the source is chunk `i` of the copy.
    async fn same_grid(
        &self,
        index: &DiskIndex,
        prev: Option<&(DiskIndex, DiskIndex)>,
    ) -> Result<()> {
        let name = self.disk.name();
        let mut fetch = Vec::new();
        for (i, id) in index.chunks.iter().enumerate() {
            let reuse = prev.and_then(|(ps, pd)| {
                (ps.chunks.get(i) == Some(id))
                    .then(|| pd.chunks.get(i).copied())
                    .flatten()
                    .filter(|d| !d.is_zero() && self.disk.is_known(d))
            });
            let r = if id.is_zero() {
                self.disk.zero_chunk(i as u64)
            } else if let Some(d) = reuse {
                self.counters.not_fetched.fetch_add(1, Ordering::Relaxed);
                self.disk.reuse_chunk(i as u64, d)
            } else {
                fetch.push((i as u64, *id));
                Ok(())
            };
            r.map_err(|e| EngineError::repo(name, e))?;
        }
        futures::stream::iter(fetch)
            .map(|(i, id)| self.copy_chunk(i, id))
            .buffer_unordered(self.in_flight)
            .try_collect::<()>()
            .await
    }

    async fn copy_chunk(&self, i: u64, id: ChunkId) -> Result<()> {
        let name = self.disk.name();
        let key = id.object_key();
        if let Some(l) = self.limiter {
            l.acquire(u64::from(self.disk.chunk_size())).await;
        }
        let data = self
            .src
            .store()
            .get(&key)
            .await
            .map_err(|e| self.source_error(e))?;
        self.counters
            .bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let codec = self.src.codec().clone();
        let plain = tokio::task::spawn_blocking(move || codec.decode(&id, &data))
            .await
            .map_err(|e| EngineError::Internal(format!("decode task failed: {e}")))?
            .map_err(|e| self.source_error(e))?;
        self.disk
            .put_chunk(i, plain.into())
            .await
            .map_err(|e| EngineError::repo(name, e))?;
        Ok(())
    }

    /// Different chunk sizes: the copy's chunks are read from the source disk as a block
    /// device (each source chunk authenticated on the way) and stored like a backup's.
    async fn regrid(&self) -> Result<()> {
        let name = self.disk.name();
        let source = self
            .src
            .open_disk(&self.manifest.id, name)
            .await
            .map_err(|e| self.source_error(e))?;
        let allocated =
            source
                .allocated(0..source.size())
                .await
                .map_err(|e| EngineError::Source {
                    disk: name.into(),
                    source: e,
                })?;
        let source: Arc<dyn BlockSource> = source;
        // In order, so consecutive reads share the source's one-chunk cache.
        futures::stream::iter(0..self.disk.chunk_count())
            .map(|i| {
                let source = source.clone();
                let range = self.disk.chunk_range(i);
                let has_data = !allocated.clip(range.clone()).is_empty();
                async move {
                    if !has_data {
                        return self
                            .disk
                            .zero_chunk(i)
                            .map_err(|e| EngineError::repo(name, e));
                    }
                    let len = range.end - range.start;
                    if let Some(l) = self.limiter {
                        l.acquire(len).await;
                    }
                    let mut buf = vec![0u8; len as usize];
                    source.read_at(range.start, &mut buf).await.map_err(|e| {
                        EngineError::Source {
                            disk: name.into(),
                            source: e,
                        }
                    })?;
                    self.counters.bytes_read.fetch_add(len, Ordering::Relaxed);
                    match self.disk.put_chunk(i, buf.into()).await {
                        Ok(PutOutcome::Zero | PutOutcome::Known | PutOutcome::Stored) => Ok(()),
                        Err(e) => Err(EngineError::repo(name, e)),
                    }
                }
            })
            .buffered(self.in_flight)
            .try_collect::<()>()
            .await
    }

    fn source_error(&self, e: ferry_repo::RepoError) -> EngineError {
        EngineError::CopySource {
            snapshot: self.manifest.id.clone(),
            disk: self.disk.name().into(),
            source: e,
        }
    }
}
