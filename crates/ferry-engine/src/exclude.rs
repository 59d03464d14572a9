//! Swap and pagefile exclusion (ADR 0071): before a backup reads a disk, `ferry-fs` finds Linux
//! swap partitions and swap files and NTFS paging files; their extents are subtracted from the
//! disk's allocated extents, so the backup reads and stores them as zeros (swap headers kept).
//! What was excluded travels in the restore point's labels, one JSON list per disk.

use ferry_core::{BlockError, BlockSource, ExtentMap};
use ferry_fs::{BlockReader, Exclusion};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Label naming what was excluded from disk `disk`: a JSON list of
/// `{"kind","what","ranges":[{"start","end"}…]}`.
pub fn label_key(disk: &str) -> String {
    format!("ferry.disk.{disk}.excluded")
}

/// Label recording that exclusion was turned off for the backup (value `off`).
pub const LABEL_OFF: &str = "ferry.exclude-swap";

/// Counts what detection reads, so a backup can report it apart from the data it read.
#[derive(Debug)]
struct Probe {
    inner: Arc<dyn BlockSource>,
    bytes: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl BlockSource for Probe {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.inner.read_at(offset, buf).await?;
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    async fn allocated(&self, range: std::ops::Range<u64>) -> Result<ExtentMap, BlockError> {
        self.inner.allocated(range).await
    }
    fn preferred_read_size(&self) -> u64 {
        self.inner.preferred_read_size()
    }
}

/// What to exclude from `source`, and how many bytes finding it read. Detection problems are
/// logged and exclude nothing: a backup never fails or loses data because a partition could not
/// be understood.
pub async fn detect(disk: &str, source: &Arc<dyn BlockSource>) -> (Vec<Exclusion>, u64) {
    let bytes = Arc::new(AtomicU64::new(0));
    let probe: Arc<dyn BlockSource> = Arc::new(Probe {
        inner: source.clone(),
        bytes: bytes.clone(),
    });
    let reader = BlockReader::with_window(
        probe,
        tokio::runtime::Handle::current(),
        ferry_fs::reader::PROBE_WINDOW,
    );
    let size = source.size();
    let r = tokio::task::spawn_blocking(move || ferry_fs::find_exclusions(Arc::new(reader))).await;
    let found = match r {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            tracing::warn!(%disk, error = %e, "swap/pagefile detection failed; nothing excluded");
            Vec::new()
        }
        Err(e) => {
            tracing::warn!(%disk, error = %e, "swap/pagefile detection stopped; nothing excluded");
            Vec::new()
        }
    };
    let found = found
        .into_iter()
        .map(|mut e| {
            e.ranges.retain_mut(|r| {
                r.end = r.end.min(size);
                r.start < r.end
            });
            e
        })
        .filter(|e| e.bytes() > 0)
        .inspect(|e| {
            tracing::info!(%disk, kind = ?e.kind, what = %e.what, bytes = e.bytes(), "excluding from the backup (read as zeros)")
        })
        .collect();
    (found, bytes.load(Ordering::Relaxed))
}

/// The byte extents of `list`.
pub fn extents(list: &[Exclusion]) -> ExtentMap {
    let mut m = ExtentMap::new();
    for e in list {
        for r in &e.ranges {
            m.insert(r.clone());
        }
    }
    m
}

/// What a restore point's labels say was excluded from `disk` (empty when nothing, or when the
/// label is unreadable: then the caller treats every exclusion as new).
pub fn from_labels(labels: &BTreeMap<String, String>, disk: &str) -> Vec<Exclusion> {
    labels
        .get(&label_key(disk))
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default()
}
