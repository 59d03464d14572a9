//! Local files and block devices as [`BlockSource`] and [`BlockTarget`].
//!
//! Reads are positional (`pread`), so many tasks can read one file at once. On a multi-threaded
//! Tokio runtime they run in place via `block_in_place` (no copy); elsewhere (a current-thread
//! runtime) they run on the blocking pool into a scratch buffer. `allocated()` asks the file
//! system with `SEEK_DATA`/`SEEK_HOLE`, so holes in sparse files cost nothing downstream.

use crate::bytes::is_zero;
use crate::error::ImageError;
use async_trait::async_trait;
use ferry_core::aligned::{BouncePool, DIRECT_ALIGN};
use ferry_core::{BlockError, BlockSource, BlockTarget, ExtentMap};
use nix::unistd::{Whence, lseek};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Runs blocking file I/O without stalling the async executor.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        Ok(h) => match h.spawn_blocking(f).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        },
        // No runtime (e.g. a plain executor in a fuzz harness): just do it.
        Err(_) => f(),
    }
}

fn in_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

fn size_of(file: &File, path: &Path) -> Result<(u64, bool), ImageError> {
    let meta = file
        .metadata()
        .map_err(|e| ImageError::io(path.display(), "stat", e))?;
    if meta.file_type().is_block_device() {
        let mut f = file;
        let size = f.seek(SeekFrom::End(0)).map_err(|e| {
            ImageError::io(path.display(), "seek to the end of the block device", e)
        })?;
        Ok((size, false))
    } else {
        Ok((meta.len(), meta.is_file()))
    }
}

/// A second descriptor of `path` with `O_DIRECT`, for reading or for writing.
fn open_direct(path: &Path, write: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
        .open(path)
}

/// Whether the page cache holds every page of `offset..offset + len` of `file`, asked with
/// `cachestat(2)` (Linux 6.5+; no I/O, no readahead). Unknown (older kernel, block device
/// without support) counts as not cached.
fn all_cached(file: &File, offset: u64, len: u64) -> bool {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // The same number on every architecture (the unified table); not in `libc` for all targets.
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: cachestat reads `range` and writes one `Stat` (the kernel's struct cachestat,
    // five u64s); both outlive the call, and flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(512) as u64;
    r == 0 && stat.nr_cache.saturating_mul(page) >= len
}

/// A read-only local file or block device.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
    name: String,
    file: Arc<File>,
    size: u64,
    regular: bool,
    /// A second descriptor opened with `O_DIRECT`, for block-aligned reads into aligned buffers.
    direct: Option<Arc<File>>,
}

impl FileSource {
    /// Opens `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let file =
            File::open(path).map_err(|e| ImageError::io(path.display(), "open for reading", e))?;
        let (size, regular) = size_of(&file, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            name: path.display().to_string(),
            file: Arc::new(file),
            size,
            regular,
            direct: None,
        })
    }

    /// Reads block-aligned ranges into block-aligned buffers with `O_DIRECT` unless the page
    /// cache already holds all of them: a backup of a large disk then neither evicts the
    /// machine's cache nor pays for filling it (allocating and zeroing the pages, the copy out;
    /// most of a buffered backup's kernel time on this kind of VM), while data that is cached
    /// anyway is not read from the device again. Other reads (image metadata, unaligned
    /// pieces) stay buffered; the kernel writes back dirty cached pages of a range before
    /// reading it directly, so both views agree. A file system without `O_DIRECT` (tmpfs)
    /// keeps buffered reads.
    pub fn with_direct_io(mut self) -> Self {
        match open_direct(&self.path, false) {
            Ok(f) => self.direct = Some(Arc::new(f)),
            Err(e) => {
                tracing::debug!(source = %self.name, error = %e, "no O_DIRECT: buffered reads")
            }
        }
        self
    }

    /// Whether aligned reads bypass the page cache (see [`with_direct_io`](Self::with_direct_io)).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl BlockSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        BlockError::check_range(&self.name, offset, buf.len() as u64, self.size)?;
        let len = buf.len();
        let op = || format!("read of {len} bytes at offset {offset}");
        let aligned = offset % DIRECT_ALIGN as u64 == 0
            && len % DIRECT_ALIGN == 0
            && buf.as_ptr().align_offset(DIRECT_ALIGN) == 0;
        if let (Some(direct), true) = (&self.direct, aligned && in_multi_thread_runtime()) {
            let file = if all_cached(&self.file, offset, len as u64) {
                &self.file
            } else {
                direct
            };
            return tokio::task::block_in_place(|| file.read_exact_at(buf, offset))
                .map_err(|e| BlockError::io(&self.name, op(), e));
        }
        if in_multi_thread_runtime() {
            let file = &self.file;
            return tokio::task::block_in_place(|| file.read_exact_at(buf, offset))
                .map_err(|e| BlockError::io(&self.name, op(), e));
        }
        let file = self.file.clone();
        let scratch = blocking(move || {
            let mut v = vec![0u8; len];
            file.read_exact_at(&mut v, offset).map(|()| v)
        })
        .await
        .map_err(|e| BlockError::io(&self.name, op(), e))?;
        buf.copy_from_slice(&scratch);
        Ok(())
    }

    async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, BlockError> {
        let range = range.start.min(self.size)..range.end.min(self.size);
        if !self.regular || range.is_empty() {
            return Ok(ExtentMap::from_range(range));
        }
        let fd = self.file.as_raw_fd();
        let mut out = ExtentMap::new();
        let mut pos = range.start;
        while pos < range.end {
            let data = match lseek(fd, pos as i64, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(nix::errno::Errno::ENXIO) => break, // only a hole remains
                // A file system without SEEK_DATA: everything may hold data.
                Err(nix::errno::Errno::EINVAL | nix::errno::Errno::EOPNOTSUPP) => {
                    out.insert(pos..range.end);
                    break;
                }
                Err(e) => {
                    return Err(BlockError::io(
                        &self.name,
                        format!("SEEK_DATA from offset {pos}"),
                        e.into(),
                    ));
                }
            };
            if data >= range.end {
                break;
            }
            let hole = match lseek(fd, data as i64, Whence::SeekHole) {
                Ok(h) => h as u64,
                Err(e) => {
                    return Err(BlockError::io(
                        &self.name,
                        format!("SEEK_HOLE from offset {data}"),
                        e.into(),
                    ));
                }
            };
            out.insert(data..hole.min(range.end));
            pos = hole.max(data + 1);
        }
        Ok(out)
    }
}

/// A writable local file or block device. A file created by [`FileTarget::create`] is sparse:
/// zeros are left as (or punched into) holes.
#[derive(Debug, Clone)]
pub struct FileTarget {
    path: PathBuf,
    name: String,
    file: Arc<File>,
    size: u64,
    regular: bool,
    /// A second descriptor opened with `O_DIRECT`, for block-aligned writes.
    direct: Option<Arc<Direct>>,
}

/// The `O_DIRECT` descriptor plus reusable bounce buffers (caller buffers are not
/// block-aligned).
#[derive(Debug)]
struct Direct {
    file: File,
    bounce: BouncePool,
}

impl Direct {
    /// Writes `data` at `offset` from an aligned copy.
    fn write(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.bounce
            .with_aligned(data, data.len(), |b| self.file.write_all_at(b, offset))
    }
}

impl FileTarget {
    /// Creates (or truncates) a sparse file of `size` bytes.
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| ImageError::io(path.display(), "create", e))?;
        file.set_len(size)
            .map_err(|e| ImageError::io(path.display(), format!("set length to {size}"), e))?;
        Ok(Self {
            path: path.to_path_buf(),
            name: path.display().to_string(),
            file: Arc::new(file),
            size,
            regular: true,
            direct: None,
        })
    }

    /// Opens an existing file or block device for writing, keeping its size and contents.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| ImageError::io(path.display(), "open for writing", e))?;
        let (size, regular) = size_of(&file, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            name: path.display().to_string(),
            file: Arc::new(file),
            size,
            regular,
            direct: None,
        })
    }

    /// Writes block-aligned data with `O_DIRECT`, bypassing the page cache: a restore of a
    /// large disk then neither evicts the machine's cache nor pays the kernel's page-cache
    /// copy (on this kind of VM most of a buffered restore's CPU time). Unaligned pieces
    /// (a disk's odd-sized tail) still go through the page cache. A file system without
    /// `O_DIRECT` (tmpfs) keeps buffered writes.
    pub fn with_direct_io(mut self) -> Self {
        match open_direct(&self.path, true) {
            Ok(file) => {
                self.direct = Some(Arc::new(Direct {
                    file,
                    bounce: BouncePool::default(),
                }))
            }
            Err(e) => {
                tracing::debug!(target = %self.name, error = %e, "no O_DIRECT: buffered writes")
            }
        }
        self
    }

    /// Whether block-aligned writes bypass the page cache (see [`with_direct_io`](Self::with_direct_io)).
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn punch(&self, offset: u64, len: u64) -> bool {
        use nix::fcntl::{FallocateFlags, fallocate};
        self.regular
            && fallocate(
                self.file.as_raw_fd(),
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
            .is_ok()
    }
}

#[async_trait]
impl BlockTarget for FileTarget {
    fn size(&self) -> u64 {
        self.size
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        BlockError::check_range(&self.name, offset, data.len() as u64, self.size)?;
        if is_zero(data) && self.punch(offset, data.len() as u64) {
            return Ok(());
        }
        let op = || format!("write of {} bytes at offset {offset}", data.len());
        let aligned = offset % DIRECT_ALIGN as u64 == 0 && data.len() % DIRECT_ALIGN == 0;
        if let Some(direct) = self.direct.as_ref().filter(|_| aligned) {
            let r = if in_multi_thread_runtime() {
                tokio::task::block_in_place(|| direct.write(data, offset))
            } else {
                let (direct, data) = (direct.clone(), data.to_vec());
                blocking(move || direct.write(&data, offset)).await
            };
            return r.map_err(|e| BlockError::io(&self.name, op(), e));
        }
        if in_multi_thread_runtime() {
            let file = &self.file;
            return tokio::task::block_in_place(|| file.write_all_at(data, offset))
                .map_err(|e| BlockError::io(&self.name, op(), e));
        }
        let file = self.file.clone();
        let owned = data.to_vec();
        blocking(move || file.write_all_at(&owned, offset))
            .await
            .map_err(|e| BlockError::io(&self.name, op(), e))
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        BlockError::check_range(&self.name, offset, len, self.size)?;
        if self.punch(offset, len) {
            return Ok(());
        }
        const STEP: u64 = 1 << 20;
        let zeros = vec![0u8; STEP.min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = STEP.min(offset + len - pos) as usize;
            let file = self.file.clone();
            let chunk = zeros[..n].to_vec();
            blocking(move || file.write_all_at(&chunk, pos))
                .await
                .map_err(|e| {
                    BlockError::io(
                        &self.name,
                        format!("write of {n} zero bytes at offset {pos}"),
                        e,
                    )
                })?;
            pos += n as u64;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        let file = self.file.clone();
        blocking(move || file.sync_data())
            .await
            .map_err(|e| BlockError::io(&self.name, "flush", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// `cachestat` sees pages come and go: the choice between the cache and `O_DIRECT` rests
    /// on it (a kernel without it would make every aligned read direct).
    #[test]
    fn cache_residency_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![7u8; 8 << 20]).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&p).unwrap();
        assert!(all_cached(&f, 0, 8 << 20), "just written");
        nix::fcntl::posix_fadvise(
            f.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        assert!(!all_cached(&f, 0, 8 << 20), "dropped");
        assert!(!all_cached(&f, 0, 4096), "dropped");
        let mut buf = vec![0u8; 64 << 10];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(all_cached(&f, 0, 64 << 10), "read back");
        // Readahead may bring in more than was read, never the whole 8 MiB.
        assert!(!all_cached(&f, 0, 8 << 20), "only partly cached");
    }
}
