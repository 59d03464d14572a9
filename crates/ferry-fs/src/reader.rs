//! Synchronous random-access reads for the file-system crates (`ntfs`, `ext4-view` read through
//! `Read + Seek` or a read-at callback), over an async [`BlockSource`].
//!
//! [`BlockReader`] blocks on the source's future with a runtime handle, so it must be used from
//! a thread that is not driving that runtime (`tokio::task::spawn_blocking`). It keeps a small
//! cache of 1 MiB windows: the file-system crates read 512 bytes to 4 KiB at a time, while a
//! restore point's disk decodes whole chunks.

use crate::error::{FsError, Result};
use ferry_core::BlockSource;
use std::collections::VecDeque;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

/// Random-access reads of a disk or of a part of one.
pub trait ReadAt: Send + Sync {
    /// Fills `buf` with the bytes at `offset`; the range lies within [`size`](Self::size).
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// A name for messages.
    fn name(&self) -> String;
}

/// An in-memory disk (tests, fuzzing).
#[derive(Debug, Clone)]
pub struct MemDisk(pub Vec<u8>);

impl ReadAt for MemDisk {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.0.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| {
                FsError::corrupt(
                    "memory disk",
                    format!(
                        "{} bytes at {offset} lie past its end ({} bytes)",
                        buf.len(),
                        self.0.len()
                    ),
                )
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn name(&self) -> String {
        "memory disk".into()
    }
}

const WINDOW: u64 = 1 << 20;
const WINDOWS_CACHED: usize = 32;
/// Windows fetched at once when reads are sequential (one source read: a restore point then
/// decodes several chunks concurrently).
const READAHEAD: u64 = 16;
/// Window for probing (swap detection at backup): the source is read as little as possible.
pub const PROBE_WINDOW: u64 = 64 << 10;

/// A [`BlockSource`] read synchronously, with a cache of recently read 1 MiB windows.
pub struct BlockReader {
    src: Arc<dyn BlockSource>,
    rt: tokio::runtime::Handle,
    window: u64,
    cache: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
    last_miss: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for BlockReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockReader")
            .field("src", &self.src.name())
            .finish()
    }
}

impl BlockReader {
    /// Reads `src` by blocking on `rt` (call its methods outside that runtime's worker threads).
    pub fn new(src: Arc<dyn BlockSource>, rt: tokio::runtime::Handle) -> Self {
        Self::with_window(src, rt, WINDOW)
    }

    /// As [`new`](Self::new) with cache windows of `window` bytes (a power of two).
    pub fn with_window(src: Arc<dyn BlockSource>, rt: tokio::runtime::Handle, window: u64) -> Self {
        Self {
            src,
            rt,
            window: window.max(4096),
            cache: Mutex::new(VecDeque::new()),
            last_miss: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    fn direct(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.rt
            .block_on(self.src.read_at(offset, buf))
            .map_err(|source| FsError::Read {
                what: format!(
                    "{}, {} bytes at offset {offset}",
                    self.src.name(),
                    buf.len()
                ),
                source,
            })
    }

    fn cached(&self, w: u64) -> Result<Arc<Vec<u8>>> {
        let mut cache = self.cache.lock().expect("cache lock");
        if let Some(i) = cache.iter().position(|(k, _)| *k == w) {
            let hit = cache.remove(i).expect("present");
            let data = hit.1.clone();
            cache.push_front(hit);
            return Ok(data);
        }
        drop(cache);
        use std::sync::atomic::Ordering::Relaxed;
        let sequential = self.last_miss.swap(w, Relaxed) == w.wrapping_sub(1);
        let count = if sequential && self.window == WINDOW {
            READAHEAD
        } else {
            1
        };
        let start = w * self.window;
        let len = (count * self.window).min(self.src.size() - start) as usize;
        let mut v = vec![0; len];
        self.direct(start, &mut v)?;
        let mut cache = self.cache.lock().expect("cache lock");
        let mut first = None;
        for (i, part) in v.chunks(self.window as usize).enumerate() {
            let data = Arc::new(part.to_vec());
            first.get_or_insert_with(|| data.clone());
            cache.retain(|(k, _)| *k != w + i as u64);
            cache.push_front((w + i as u64, data));
        }
        if count > 1 {
            self.last_miss.store(w + count - 1, Relaxed);
        }
        cache.truncate(WINDOWS_CACHED);
        first.ok_or_else(|| FsError::corrupt(self.src.name(), format!("no data at window {w}")))
    }
}

impl ReadAt for BlockReader {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.src.size()) {
            return Err(FsError::corrupt(
                self.src.name(),
                format!(
                    "{} bytes at offset {offset} lie past the end of the disk ({} bytes)",
                    buf.len(),
                    self.src.size()
                ),
            ));
        }
        if buf.len() as u64 >= READAHEAD * self.window {
            return self.direct(offset, buf);
        }
        let mut pos = offset;
        let mut done = 0;
        while done < buf.len() {
            let w = pos / self.window;
            let data = self.cached(w)?;
            let at = (pos - w * self.window) as usize;
            let n = (data.len() - at).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[at..at + n]);
            done += n;
            pos += n as u64;
        }
        Ok(())
    }
    fn size(&self) -> u64 {
        self.src.size()
    }
    fn name(&self) -> String {
        self.src.name()
    }
}

/// A byte range of a disk (a partition) with a cursor: `Read + Seek` for `ntfs`, a read-at
/// callback for `ext4-view`.
#[derive(Clone)]
pub struct Slice {
    disk: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
    pos: u64,
    label: String,
}

impl std::fmt::Debug for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slice({})", self.label)
    }
}

impl Slice {
    /// Bytes `start..start + len` of `disk`, named `label` in messages.
    pub fn new(disk: Arc<dyn ReadAt>, start: u64, len: u64, label: impl Into<String>) -> Self {
        Self {
            disk,
            start,
            len,
            pos: 0,
            label: label.into(),
        }
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// First byte on the disk.
    pub fn start(&self) -> u64 {
        self.start
    }
    /// Name for messages.
    pub fn label(&self) -> &str {
        &self.label
    }
    /// Reads exactly `buf.len()` bytes at `offset` within the slice.
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(FsError::corrupt(
                &self.label,
                format!(
                    "{} bytes at offset {offset} lie past its end ({} bytes)",
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.disk.read_exact_at(self.start + offset, buf)
    }
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.read_exact_at(self.pos, &mut buf[..n])
            .map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Slice {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let new = new
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        self.pos = new;
        Ok(new)
    }
}

impl ext4_view::Ext4Read for Slice {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.read_exact_at(start_byte, dst)?;
        Ok(())
    }
}
