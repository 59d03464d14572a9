//! A copy-on-write overlay over a read-only [`BlockSource`]: writes land in a sparse temporary
//! file and never reach the source. It is what makes a restore point bootable over NBD.
//!
//! The overlay tracks written bytes in 64 KiB cells. A write that covers part of a cell not yet
//! in the overlay first copies that cell from the source, so every cell is either wholly in the
//! overlay file or wholly in the source. Writes are serialized (one lock); reads run in parallel
//! and see a cell either before or after a concurrent write to it, as NBD allows.

use async_trait::async_trait;
use ferry_core::{BlockError, BlockSource, ExtentMap};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

/// Granularity of the overlay's bookkeeping.
pub const CELL: u64 = 64 << 10;

/// A writable view of a read-only source.
pub struct CowOverlay {
    source: Arc<dyn BlockSource>,
    file: Arc<File>,
    cells: Mutex<ExtentMap>,
    write_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for CowOverlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowOverlay")
            .field("source", &self.source.name())
            .field("written", &self.written().total_len())
            .finish()
    }
}

impl CowOverlay {
    /// An empty overlay over `source`, backed by an unlinked temporary file.
    pub fn new(source: Arc<dyn BlockSource>) -> std::io::Result<Self> {
        Self::with_file(source, tempfile::tempfile()?)
    }

    /// [`Self::new`] with the temporary file in `dir`: on the volume the data is meant for (a
    /// host agent staging a restored disk), still unlinked, so nothing is left after a crash.
    pub fn new_in(source: Arc<dyn BlockSource>, dir: &std::path::Path) -> std::io::Result<Self> {
        Self::with_file(source, tempfile::tempfile_in(dir)?)
    }

    fn with_file(source: Arc<dyn BlockSource>, file: File) -> std::io::Result<Self> {
        file.set_len(source.size())?;
        Ok(Self {
            source,
            file: Arc::new(file),
            cells: Mutex::new(ExtentMap::new()),
            write_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Bytes (cell-aligned) held by the overlay rather than the source.
    pub fn written(&self) -> ExtentMap {
        self.cells.lock().expect("overlay lock").clone()
    }

    fn err(&self, op: String, e: std::io::Error) -> BlockError {
        BlockError::io(format!("{} (overlay)", self.source.name()), op, e)
    }

    async fn pwrite(&self, offset: u64, data: Vec<u8>) -> Result<(), BlockError> {
        let f = self.file.clone();
        let len = data.len();
        tokio::task::spawn_blocking(move || f.write_all_at(&data, offset))
            .await
            .map_err(|e| {
                self.err(
                    format!("write of {len} bytes at offset {offset}"),
                    std::io::Error::other(e),
                )
            })?
            .map_err(|e| self.err(format!("write of {len} bytes at offset {offset}"), e))
    }

    async fn pread(&self, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let mut v = vec![0u8; len];
            f.read_exact_at(&mut v, offset).map(|_| v)
        })
        .await
        .map_err(|e| {
            self.err(
                format!("read of {len} bytes at offset {offset}"),
                std::io::Error::other(e),
            )
        })?
        .map_err(|e| self.err(format!("read of {len} bytes at offset {offset}"), e))
    }

    /// Copies the cell holding `offset` from the source unless the overlay has it already.
    async fn fill_cell(&self, offset: u64) -> Result<(), BlockError> {
        let start = offset / CELL * CELL;
        let end = (start + CELL).min(self.size());
        if self.cells.lock().expect("overlay lock").contains(start) {
            return Ok(());
        }
        let mut v = vec![0u8; (end - start) as usize];
        if self
            .source
            .allocated(start..end)
            .await?
            .intersects(start..end)
        {
            self.source.read_at(start, &mut v).await?;
        }
        self.pwrite(start, v).await
    }

    /// Writes `data` at `offset` into the overlay.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        BlockError::check_range(&self.name(), offset, data.len() as u64, self.size())?;
        if data.is_empty() {
            return Ok(());
        }
        let _g = self.write_lock.lock().await;
        let end = offset + data.len() as u64;
        if offset % CELL != 0 {
            self.fill_cell(offset).await?;
        }
        if end % CELL != 0 && end != self.size() {
            self.fill_cell(end - 1).await?;
        }
        self.pwrite(offset, data.to_vec()).await?;
        let aligned = (end.div_ceil(CELL) * CELL).min(self.size());
        self.cells
            .lock()
            .expect("overlay lock")
            .insert(offset / CELL * CELL..aligned);
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros. Whole cells that read as zeros already
    /// (neither written nor allocated in the source: a new disk staged over zeros) are left
    /// alone, so zeroing a large range costs nothing there.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        BlockError::check_range(&self.name(), offset, len, self.size())?;
        let end = offset + len;
        let in_source = self.source.allocated(offset..end).await?;
        let zeros = vec![0u8; CELL as usize];
        let mut pos = offset;
        while pos < end {
            let cell = pos / CELL * CELL..(pos / CELL * CELL + CELL).min(self.size());
            let n = cell.end.min(end) - pos;
            let whole = pos == cell.start && pos + n == cell.end;
            let zero_already = whole
                && !in_source.intersects(cell.clone())
                && !self
                    .cells
                    .lock()
                    .expect("overlay lock")
                    .intersects(cell.clone());
            if !zero_already {
                self.write(pos, &zeros[..n as usize]).await?;
            }
            pos += n;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockSource for CowOverlay {
    fn size(&self) -> u64 {
        self.source.size()
    }

    fn name(&self) -> String {
        format!("{} (overlay)", self.source.name())
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        BlockError::check_range(&self.name(), offset, buf.len() as u64, self.size())?;
        let range = offset..offset + buf.len() as u64;
        let written = self.cells.lock().expect("overlay lock").clip(range.clone());
        let mut pos = offset;
        for e in written
            .iter()
            .chain(std::iter::once(ferry_core::Extent::new(range.end, 0)))
        {
            if e.offset > pos {
                let (a, b) = ((pos - offset) as usize, (e.offset - offset) as usize);
                self.source.read_at(pos, &mut buf[a..b]).await?;
            }
            if e.length > 0 {
                let a = (e.offset - offset) as usize;
                let v = self.pread(e.offset, e.length as usize).await?;
                buf[a..a + v.len()].copy_from_slice(&v);
            }
            pos = e.end();
        }
        Ok(())
    }

    async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, BlockError> {
        let range = range.start..range.end.min(self.size());
        let written = self.cells.lock().expect("overlay lock").clip(range.clone());
        Ok(self.source.allocated(range).await?.union(&written))
    }

    fn preferred_read_size(&self) -> u64 {
        self.source.preferred_read_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{MemSource, block::read_all};

    #[tokio::test]
    async fn writes_stay_in_the_overlay() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
        let src = Arc::new(MemSource::new("m", data.clone(), 4096));
        let ov = CowOverlay::new(src.clone()).unwrap();
        ov.write(70_000, &[0xee; 100]).await.unwrap();
        ov.write(299_990, &[0xdd; 10]).await.unwrap();
        ov.write_zeroes(0, 10).await.unwrap();
        let mut expect = data.clone();
        expect[70_000..70_100].fill(0xee);
        expect[299_990..].fill(0xdd);
        expect[..10].fill(0);
        assert_eq!(read_all(&ov).await.unwrap(), expect);
        assert_eq!(src.data(), &data[..], "source untouched");
        assert_eq!(ov.written().total_len(), 2 * CELL + (300_000 - 4 * CELL));
        assert!(ov.write(299_999, &[1, 2]).await.is_err());
    }

    #[tokio::test]
    async fn zeroing_what_reads_as_zeros_writes_nothing() {
        let mut data = vec![0u8; 8 * CELL as usize];
        data[5 * CELL as usize] = 7;
        let src = Arc::new(MemSource::new("m", data.clone(), CELL as usize));
        let ov = CowOverlay::new(src).unwrap();
        ov.write(CELL + 10, &[1; 10]).await.unwrap();
        ov.write_zeroes(0, 8 * CELL).await.unwrap();
        // Cell 1 (written) and cell 5 (allocated in the source) are zeroed in the overlay.
        assert_eq!(ov.written().total_len(), 2 * CELL);
        assert_eq!(read_all(&ov).await.unwrap(), vec![0u8; 8 * CELL as usize]);
        // Partial cells are written as before.
        ov.write_zeroes(3 * CELL + 1, 10).await.unwrap();
        assert_eq!(ov.written().total_len(), 3 * CELL);
    }
}
