//! The boundary through which disks flow: [`BlockSource`] (read side) and [`BlockTarget`]
//! (write side), implemented by files and block devices, image formats, NBD exports and
//! restore points alike.
//!
//! Both traits are object-safe (`Arc<dyn BlockSource>`), take positional I/O so several readers
//! can work on one disk at once, and report failures as [`BlockError`], which names the disk and
//! says whether a retry can help.

use crate::extent::ExtentMap;
use async_trait::async_trait;
use bytes::Bytes;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// Error from a [`BlockSource`] or [`BlockTarget`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockError {
    /// The request reaches past the end of the disk.
    #[error("{disk}: {len} bytes at offset {offset} reach past the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Which disk.
        disk: String,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// The underlying I/O failed.
    #[error("{disk}: {op} failed")]
    Io {
        /// Which disk.
        disk: String,
        /// What was being done, e.g. `read of 4194304 bytes at offset 0`.
        op: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The data or metadata is malformed or inconsistent (a corrupt image, a hostile server).
    #[error("{disk}: {message}")]
    Corrupt {
        /// Which disk.
        disk: String,
        /// What is wrong, naming the structure at fault.
        message: String,
    },
    /// The source or target cannot do this (e.g. writing to a read-only export).
    #[error("{disk}: {message}")]
    Unsupported {
        /// Which disk.
        disk: String,
        /// What is not supported.
        message: String,
    },
    /// Any other failure, with its cause.
    #[error("{disk}: {message}")]
    Other {
        /// Which disk.
        disk: String,
        /// What failed.
        message: String,
        /// Whether the same request may succeed if tried again.
        retryable: bool,
        /// The cause, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl BlockError {
    /// Whether the same request may succeed if tried again (a dropped connection, a timeout).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::WouldBlock
            ),
            Self::Other { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// Shorthand for [`BlockError::Corrupt`].
    pub fn corrupt(disk: impl fmt::Display, message: impl Into<String>) -> Self {
        Self::Corrupt {
            disk: disk.to_string(),
            message: message.into(),
        }
    }

    /// Shorthand for [`BlockError::Io`].
    pub fn io(disk: impl fmt::Display, op: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            disk: disk.to_string(),
            op: op.into(),
            source,
        }
    }

    /// Checks that `len` bytes at `offset` lie within a disk of `size` bytes.
    pub fn check_range(
        disk: &dyn fmt::Display,
        offset: u64,
        len: u64,
        size: u64,
    ) -> Result<(), Self> {
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Self::OutOfRange {
                disk: disk.to_string(),
                offset,
                len,
                size,
            }),
        }
    }
}

/// Random-access, read-only view of one virtual disk.
///
/// Every byte outside [`allocated`](BlockSource::allocated) reads as zero, so callers may skip
/// those ranges without reading them.
#[async_trait]
pub trait BlockSource: Send + Sync + fmt::Debug {
    /// Virtual size of the disk in bytes.
    fn size(&self) -> u64;

    /// A short name for messages: a path, an NBD URI without secrets, `vm/disk`.
    fn name(&self) -> String;

    /// Fills `buf` with the bytes at `offset`. The whole range must lie within [`size`](Self::size).
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;

    /// The `len` bytes at `offset` in a buffer the source already holds them in (an NBD
    /// reply as received), so the caller reads them without a copy. `None`: the source has no
    /// such buffer; use [`read_at`](Self::read_at).
    async fn read_shared(&self, offset: u64, len: usize) -> Result<Option<Bytes>, BlockError> {
        let _ = (offset, len);
        Ok(None)
    }

    /// The parts of `range` that may hold non-zero data. Everything else reads as zeros.
    /// The default, for sources that cannot tell, is the whole range.
    async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, BlockError> {
        Ok(ExtentMap::from_range(
            range.start..range.end.min(self.size()),
        ))
    }

    /// Preferred read size in bytes (e.g. an image's block size, an NBD server's preferred
    /// block size); a hint for scheduling, 0 if unknown.
    fn preferred_read_size(&self) -> u64 {
        0
    }
}

#[async_trait]
impl<T: BlockSource + ?Sized> BlockSource for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn name(&self) -> String {
        (**self).name()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        (**self).read_at(offset, buf).await
    }
    async fn read_shared(&self, offset: u64, len: usize) -> Result<Option<Bytes>, BlockError> {
        (**self).read_shared(offset, len).await
    }
    async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, BlockError> {
        (**self).allocated(range).await
    }
    fn preferred_read_size(&self) -> u64 {
        (**self).preferred_read_size()
    }
}

/// Random-access, writable disk: a restore target (sparse file, block device, NBD export).
#[async_trait]
pub trait BlockTarget: Send + Sync + fmt::Debug {
    /// Size of the disk in bytes.
    fn size(&self) -> u64;

    /// A short name for messages.
    fn name(&self) -> String;

    /// Writes `data` at `offset`.
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), BlockError>;

    /// Makes `len` bytes at `offset` read as zeros, deallocating them where the target can
    /// (hole punch, NBD WRITE_ZEROES/TRIM). The default writes zero buffers.
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        const STEP: u64 = 1 << 20;
        let zeros = vec![0u8; STEP.min(len) as usize];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = STEP.min(end - pos) as usize;
            self.write_at(pos, &zeros[..n]).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<(), BlockError>;
}

/// An in-memory disk, for tests, fuzzing and small fixtures. Its allocation map is either given
/// or computed from the non-zero `grain`-sized cells of the data.
#[derive(Clone)]
pub struct MemSource {
    name: String,
    data: Arc<Vec<u8>>,
    allocated: ExtentMap,
}

impl MemSource {
    /// A disk holding `data`; every `grain` bytes holding a non-zero byte count as allocated.
    pub fn new(name: impl Into<String>, data: Vec<u8>, grain: usize) -> Self {
        let grain = grain.max(1);
        let mut allocated = ExtentMap::new();
        for (i, cell) in data.chunks(grain).enumerate() {
            if cell.iter().any(|b| *b != 0) {
                let start = (i * grain) as u64;
                allocated.insert(start..start + cell.len() as u64);
            }
        }
        Self {
            name: name.into(),
            data: Arc::new(data),
            allocated,
        }
    }

    /// A disk holding `data` with an explicit allocation map (clipped to the data).
    pub fn with_allocation(name: impl Into<String>, data: Vec<u8>, allocated: ExtentMap) -> Self {
        let allocated = allocated.clip(0..data.len() as u64);
        Self {
            name: name.into(),
            data: Arc::new(data),
            allocated,
        }
    }

    /// The bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

impl fmt::Debug for MemSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemSource")
            .field("name", &self.name)
            .field("size", &self.data.len())
            .finish()
    }
}

#[async_trait]
impl BlockSource for MemSource {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        BlockError::check_range(&self.name, offset, buf.len() as u64, self.size())?;
        let start = offset as usize;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }

    async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, BlockError> {
        Ok(self.allocated.clip(range))
    }
}

/// Reads a whole source into memory, zero-filling unallocated ranges without reading them.
/// For tests and small disks only.
pub async fn read_all(src: &dyn BlockSource) -> Result<Vec<u8>, BlockError> {
    let size = src.size();
    let len = usize::try_from(size).map_err(|_| BlockError::Unsupported {
        disk: src.name(),
        message: format!("{size} bytes do not fit in memory"),
    })?;
    let mut out = vec![0u8; len];
    for e in src.allocated(0..size).await?.iter() {
        let (s, l) = (e.offset as usize, e.length as usize);
        src.read_at(e.offset, &mut out[s..s + l]).await?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mem_source_reads_and_maps() {
        let mut data = vec![0u8; 64];
        data[17] = 7;
        data[40] = 9;
        let src: Arc<dyn BlockSource> = Arc::new(MemSource::new("m", data.clone(), 8));
        assert_eq!(src.size(), 64);
        let map = src.allocated(0..64).await.unwrap();
        assert_eq!(map.total_len(), 16);
        assert!(map.contains(17) && map.contains(40) && !map.contains(0));
        assert_eq!(read_all(&src).await.unwrap(), data);
        let mut buf = [0u8; 4];
        let err = src.read_at(62, &mut buf).await.unwrap_err();
        assert!(matches!(err, BlockError::OutOfRange { .. }), "{err}");
        assert!(err.to_string().contains("m: 4 bytes at offset 62"), "{err}");
        assert!(!err.is_retryable());
    }

    #[test]
    fn check_range_rejects_overflow() {
        assert!(BlockError::check_range(&"d", u64::MAX, 2, u64::MAX).is_err());
        assert!(BlockError::check_range(&"d", 10, 0, 10).is_ok());
    }
}
