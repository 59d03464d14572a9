//! A [`BlockSource`] wrapper that counts what is read, so tests and progress reports can tell
//! how much an incremental backup really fetched from the hypervisor.

use async_trait::async_trait;
use bytes::Bytes;
use ferry_core::{BlockError, BlockSource, ExtentMap};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one source.
#[derive(Debug, Default)]
pub struct ReadCounters {
    reads: AtomicU64,
    bytes: AtomicU64,
}

impl ReadCounters {
    /// Number of `read_at` calls.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }
    /// Bytes read.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Counts the reads of `inner`.
#[derive(Debug)]
pub struct CountingSource {
    inner: Arc<dyn BlockSource>,
    counters: Arc<ReadCounters>,
}

impl CountingSource {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn BlockSource>) -> Self {
        Self {
            inner,
            counters: Arc::default(),
        }
    }
    /// The counters (shared).
    pub fn counters(&self) -> Arc<ReadCounters> {
        self.counters.clone()
    }
}

#[async_trait]
impl BlockSource for CountingSource {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.inner.read_at(offset, buf).await?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    async fn read_shared(&self, offset: u64, len: usize) -> Result<Option<Bytes>, BlockError> {
        let r = self.inner.read_shared(offset, len).await?;
        if r.is_some() {
            self.counters.reads.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
        }
        Ok(r)
    }
    async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, BlockError> {
        self.inner.allocated(range).await
    }
    fn preferred_read_size(&self) -> u64 {
        self.inner.preferred_read_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::MemSource;

    #[tokio::test]
    async fn counts_reads_and_bytes() {
        let src = CountingSource::new(Arc::new(MemSource::new("m", vec![7u8; 8192], 4096)));
        let c = src.counters();
        let mut b = [0u8; 100];
        src.read_at(10, &mut b).await.unwrap();
        src.read_at(4000, &mut b).await.unwrap();
        assert_eq!((c.reads(), c.bytes()), (2, 200));
        assert!(src.read_at(8190, &mut b).await.is_err());
        assert_eq!(c.reads(), 2, "failed reads are not counted");
    }
}
