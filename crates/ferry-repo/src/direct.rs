//! Create-if-absent writes of large objects in a local repository with `O_DIRECT`.
//!
//! On the appliance's kind of VM a buffered write costs more CPU than compressing the data
//! did not save: every page-cache page is freshly allocated (and, under memory ballooning or
//! free-page reporting, faulted in from the host), then copied into. A backup writes gigabytes of
//! chunk objects that nobody reads soon, so their whole blocks bypass the cache (written from
//! the sealed buffer itself, which starts on a block boundary) and only the last partial block
//! is written through it. Semantics match `object_store`'s local backend: the data goes
//! to a staging file `<key>#<digits>` (which its listing ignores), then is hard-linked to the key
//! only if absent, so a crash never leaves a partial object under its name.
//!
//! Small objects, keys that need escaping and file systems without `O_DIRECT` (tmpfs) take
//! the ordinary `object_store` path.

use crate::store::Created;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Result};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ferry_core::aligned::{BouncePool, DIRECT_ALIGN as ALIGN};

/// Objects below this size are written buffered (the copy is cheap; the padding is not).
pub(crate) const MIN_DIRECT: usize = 64 * 1024;

/// Writes objects under one local directory.
#[derive(Debug)]
pub(crate) struct DirectWriter {
    root: PathBuf,
    /// Set after the file system refused `O_DIRECT`: every later write takes the normal path.
    refused: AtomicBool,
    next: AtomicU64,
    bounce: BouncePool,
}

impl DirectWriter {
    pub(crate) fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            refused: AtomicBool::new(false),
            next: AtomicU64::new(0),
            bounce: BouncePool::default(),
        }
    }

    /// Whether [`create`](Self::create) handles this object (else the caller's normal path does).
    pub(crate) fn accepts(&self, key: &str, len: usize) -> bool {
        len >= MIN_DIRECT && plain_key(key) && !self.refused.load(Ordering::Relaxed)
    }

    /// Writes `data` at `key` unless an object exists there. `Ok(None)`: the file system does
    /// not do `O_DIRECT`; nothing was written and the caller should write normally.
    pub(crate) fn create(&self, key: &str, data: &[u8]) -> Result<Option<Created>> {
        let dest = self.root.join(key);
        let (file, staging) = match self.staging(&dest) {
            Ok(x) => x,
            Err(e) if e.kind() == ErrorKind::InvalidInput => {
                // EINVAL from open(O_DIRECT): tmpfs and a few others.
                self.refused.store(true, Ordering::Relaxed);
                tracing::debug!(root = %self.root.display(), "no O_DIRECT here: buffered object writes");
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let written = self.write(&file, data).and_then(|()| {
            drop(file);
            link_new(&staging, &dest)
        });
        let _ = std::fs::remove_file(&staging);
        written.map(Some)
    }

    /// Opens a new staging file beside `dest`, creating parent directories as needed.
    fn staging(&self, dest: &Path) -> Result<(File, PathBuf)> {
        open_staging(&self.root, dest, &self.next, |p| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(OFlag::O_DIRECT.bits())
                .open(p)
        })
    }

    /// Writes `data`: its whole blocks with `O_DIRECT` (from where they are when `data` starts
    /// on a block boundary, as sealed chunks do; else from an aligned copy), the last partial
    /// block through the page cache. Padding that block for `O_DIRECT` and truncating the
    /// file afterwards made ext4 read it back from disk to zero its end, once per object.
    fn write(&self, file: &File, data: &[u8]) -> Result<()> {
        let body = data.len() / ALIGN * ALIGN;
        if data.as_ptr().align_offset(ALIGN) == 0 {
            file.write_all_at(&data[..body], 0)?;
        } else {
            self.bounce
                .with_aligned(&data[..body], body, |b| file.write_all_at(b, 0))?;
        }
        if body < data.len() {
            let flags = OFlag::from_bits_retain(fcntl(file.as_raw_fd(), FcntlArg::F_GETFL)?);
            fcntl(file.as_raw_fd(), FcntlArg::F_SETFL(flags - OFlag::O_DIRECT))?;
            file.write_all_at(&data[body..], body as u64)?;
        }
        Ok(())
    }
}

/// Keys whose path is the key itself under `object_store`'s local encoding (no escaping, no
/// hidden or staging names): lowercase/uppercase ASCII letters, digits, `-`, `_`, `.` and `/`.
fn plain_key(key: &str) -> bool {
    !key.is_empty()
        && key.split('/').all(|seg| {
            !seg.is_empty()
                && !seg.starts_with('.')
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
}

/// Gives the complete `staging` file the name `dest` unless something has it already.
pub(crate) fn link_new(staging: &Path, dest: &Path) -> Result<Created> {
    match std::fs::hard_link(staging, dest) {
        Ok(()) => Ok(Created::Written),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(Created::AlreadyExists),
        Err(e) => Err(e),
    }
}

/// Opens (with `open`, which must create exclusively) a new staging file `<dest>#<pid><n>`
/// beside `dest` — a name the local store's listing ignores — creating parent directories
/// under `root` as needed.
pub(crate) fn open_staging(
    root: &Path,
    dest: &Path,
    next: &AtomicU64,
    open: impl Fn(&Path) -> Result<File>,
) -> Result<(File, PathBuf)> {
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let mut path = dest.as_os_str().to_owned();
        path.push(format!("#{}{n:06}", std::process::id()));
        let path = PathBuf::from(path);
        match open(&path) {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                std::fs::create_dir_all(path.parent().unwrap_or(root))?;
                // Once more now that the directory exists; a second NotFound is real.
                return open(&path).map(|f| (f, path));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_keys_only() {
        assert!(plain_key("chunks/ab/abcdef0123"));
        assert!(plain_key("indexes/20261130T1.disk0-a_b"));
        for k in ["", "/a", "a//b", "a/.hidden", "a/b#1", "a b", "a/%41", "ü"] {
            assert!(!plain_key(k), "{k:?}");
        }
    }

    #[test]
    fn writes_exact_bytes_once_and_leaves_no_staging() {
        let dir = tempfile::tempdir().unwrap();
        let w = DirectWriter::new(dir.path());
        // Lengths with and without a partial last block; data starting on a block boundary
        // (written in place) and one byte off it (written from a copy).
        let cases = [MIN_DIRECT, MIN_DIRECT + 1, 1 << 20, (1 << 20) + 4095]
            .into_iter()
            .flat_map(|len| [(len, 0), (len, 1)]);
        for (len, shift) in cases {
            let key = format!("chunks/{len:x}/obj{shift}");
            let mut backing = vec![0u8; len + 2 * ALIGN];
            let at = backing.as_ptr().align_offset(ALIGN) + shift;
            let data = &mut backing[at..at + len];
            for (i, b) in data.iter_mut().enumerate() {
                *b = (i * 7 + len) as u8;
            }
            let data = &*data;
            let first = w.create(&key, data).unwrap();
            let tmpfs = nix::sys::statfs::statfs(dir.path())
                .unwrap()
                .filesystem_type()
                == nix::sys::statfs::TMPFS_MAGIC;
            assert_eq!(
                first.is_none(),
                tmpfs,
                "O_DIRECT is refused exactly on tmpfs"
            );
            match first {
                Some(c) => {
                    assert_eq!(c, Created::Written);
                    assert_eq!(std::fs::read(dir.path().join(&key)).unwrap(), data);
                    let other = vec![1u8; len];
                    assert_eq!(
                        w.create(&key, &other).unwrap(),
                        Some(Created::AlreadyExists)
                    );
                    assert_eq!(std::fs::read(dir.path().join(&key)).unwrap(), data);
                }
                None => assert!(!dir.path().join(&key).exists()),
            }
            let names: Vec<_> = std::fs::read_dir(dir.path().join(format!("chunks/{len:x}")))
                .map(|d| d.map(|e| e.unwrap().file_name()).collect())
                .unwrap_or_default();
            assert!(
                names.iter().all(|n| !n.to_string_lossy().contains('#')),
                "{names:?}"
            );
        }
    }
}
