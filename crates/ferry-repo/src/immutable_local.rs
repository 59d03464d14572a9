//! Hardened local repositories: every data object carries the inode immutable flag
//! (`FS_IMMUTABLE_FL`, what `chattr +i` sets; ADR 0185).
//!
//! * A flagged file cannot be written, truncated, renamed, linked, unlinked, nor have its
//!   metadata (mode, owner, times) changed, by anyone — root included — until a process with
//!   `CAP_LINUX_IMMUTABLE` clears the flag (`ioctl_iflags(2)`). So the flag is only as strong as
//!   the control over who holds that capability (docs/immutability.md, threat model).
//! * Objects are written to a staging file, fsynced, hard-linked into place only if absent (as
//!   `object_store`'s local backend does), and flagged after. A crash in between leaves a
//!   complete but unflagged object; [`LocalLock::seal`] is idempotent, and the next write of
//!   the same key (a backup uploading the chunk again), the next commit that references it, or
//!   `ferry repo check` flags it.
//! * Retain-until dates cannot live on the inode: they come from the same ledger as S3's
//!   (`retention/…`, whose segments are flagged too), and for objects no live segment names,
//!   from the object's modification time — which the flag itself freezes.

use crate::error::{RepoError, Result};
use crate::immutable::Deleted;
use crate::store::Created;
use nix::errno::Errno;
use nix::libc::{c_int, c_long};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// `FS_IMMUTABLE_FL` from `<linux/fs.h>` ('i' in lsattr).
const FS_IMMUTABLE_FL: c_int = 0x0000_0010;

// `FS_IOC_GETFLAGS` / `FS_IOC_SETFLAGS` are declared with a `long` argument, but the kernel
// reads and writes an `int` (ioctl_iflags(2)).
nix::ioctl_read_bad!(
    fs_ioc_getflags,
    nix::request_code_read!(b'f', 1, std::mem::size_of::<c_long>()),
    c_int
);
nix::ioctl_write_ptr_bad!(
    fs_ioc_setflags,
    nix::request_code_write!(b'f', 2, std::mem::size_of::<c_long>()),
    c_int
);

fn open_for_flags(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
}

/// The inode flags of an open file.
fn get_flags(f: &File) -> nix::Result<c_int> {
    let mut flags: c_int = 0;
    // SAFETY: the fd is open for the call's duration and `flags` is a valid `int` to write.
    unsafe { fs_ioc_getflags(f.as_raw_fd(), &mut flags) }?;
    Ok(flags)
}

/// Sets or clears `FS_IMMUTABLE_FL` (a no-op when already so).
fn set_immutable(f: &File, on: bool) -> nix::Result<()> {
    let flags = get_flags(f)?;
    let new = if on {
        flags | FS_IMMUTABLE_FL
    } else {
        flags & !FS_IMMUTABLE_FL
    };
    if new == flags {
        return Ok(());
    }
    // SAFETY: the fd is open for the call's duration and `new` is a valid `int` to read.
    unsafe { fs_ioc_setflags(f.as_raw_fd(), &new) }?;
    Ok(())
}

/// Whether the file at `path` carries the immutable flag (`None`: no such file).
pub fn is_immutable(path: &Path) -> std::io::Result<Option<bool>> {
    let f = match open_for_flags(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(Some(get_flags(&f)? & FS_IMMUTABLE_FL != 0))
}

/// Writes, seals and deletes the data objects of a hardened local repository.
#[derive(Debug)]
pub struct LocalLock {
    root: PathBuf,
    next: AtomicU64,
}

impl LocalLock {
    /// Objects live under `root` (the repository directory).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            next: AtomicU64::new(0),
        }
    }

    /// The file of `key`.
    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Sets and clears the flag on a probe file: refuses a file system without inode flags
    /// (tmpfs before Linux 6.0, ramfs, NFS, SMB, FAT: `ENOTTY`/`EOPNOTSUPP`) and a process
    /// without `CAP_LINUX_IMMUTABLE` (`EPERM`), with an error that says which.
    pub fn probe(&self, location: &str) -> Result<()> {
        let fail = |reason: String| RepoError::Immutability {
            location: location.into(),
            reason,
        };
        let probe = self.root.join(format!(
            ".ferry-immutable-probe-{}-{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        let f = File::create(&probe)
            .map_err(|e| fail(format!("cannot create a probe file in the directory: {e}")))?;
        let res = set_immutable(&f, true);
        let cleared = set_immutable(&f, false);
        drop(f);
        let _ = std::fs::remove_file(&probe);
        match res.and(cleared) {
            Ok(()) => Ok(()),
            Err(Errno::ENOTTY | Errno::EOPNOTSUPP | Errno::EINVAL) => Err(fail(
                "this file system does not support the inode immutable flag (chattr +i); put a \
                 hardened repository on ext4, XFS or btrfs"
                    .into(),
            )),
            Err(Errno::EPERM) => Err(fail(
                "this process may not set the inode immutable flag: it needs the \
                 CAP_LINUX_IMMUTABLE capability (run ferry as root, or give its service \
                 AmbientCapabilities=CAP_LINUX_IMMUTABLE; see docs/immutability.md)"
                    .into(),
            )),
            Err(e) => Err(fail(format!(
                "cannot set the inode immutable flag on a probe file: {e}"
            ))),
        }
    }

    /// Creates `key` only if absent, durably, then flags it. An existing object is flagged
    /// too (it may be the leftover of a crash between its link and its flag).
    pub fn create(&self, key: &str, data: &[u8]) -> std::io::Result<Created> {
        let dest = self.path(key);
        let (mut file, staging) = self.staging(&dest)?;
        let linked = file
            .write_all(data)
            .and_then(|()| file.sync_all())
            .and_then(|()| {
                drop(file);
                crate::direct::link_new(&staging, &dest)
            });
        // Before the flag: an immutable inode's other names cannot be unlinked.
        let _ = std::fs::remove_file(&staging);
        let created = linked?;
        if created == Created::Written {
            if let Some(dir) = dest.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        self.seal(key)?;
        Ok(created)
    }

    /// Flags `key` (idempotent; a missing object is fine).
    pub fn seal(&self, key: &str) -> std::io::Result<()> {
        match open_for_flags(&self.path(key)) {
            Ok(f) => Ok(set_immutable(&f, true)?),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Flags each of `keys` that lacks the flag; returns how many did.
    pub fn seal_all(
        &self,
        keys: &[String],
    ) -> std::result::Result<usize, (String, std::io::Error)> {
        let mut n = 0;
        for k in keys {
            let res = match open_for_flags(&self.path(k)) {
                Ok(f) => get_flags(&f).and_then(|flags| {
                    if flags & FS_IMMUTABLE_FL == 0 {
                        n += 1;
                        set_immutable(&f, true)
                    } else {
                        Ok(())
                    }
                }),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => return Err((k.clone(), e)),
            };
            res.map_err(|e| (k.clone(), e.into()))?;
        }
        Ok(n)
    }

    /// Modification time (Unix seconds) and size of `key`, `None` if missing.
    pub fn stat(&self, key: &str) -> std::io::Result<Option<(i64, u64)>> {
        use std::os::unix::fs::MetadataExt as _;
        match std::fs::symlink_metadata(self.path(key)) {
            Ok(m) => Ok(Some((m.mtime(), m.len()))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Clears the flag of `key` and deletes it. `Refused`: this process may not clear the flag.
    pub fn remove(&self, key: &str) -> std::io::Result<Deleted> {
        let path = self.path(key);
        match open_for_flags(&path) {
            Ok(f) => match set_immutable(&f, false) {
                Ok(()) => {}
                Err(Errno::EPERM) => return Ok(Deleted::Refused),
                Err(e) => return Err(e.into()),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Deleted::Deleted),
            Err(e) => return Err(e),
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(Deleted::Deleted),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(Deleted::Deleted),
            Err(e) if e.kind() == ErrorKind::PermissionDenied => Ok(Deleted::Refused),
            Err(e) => Err(e),
        }
    }

    /// A new staging file beside `dest`, created exclusively.
    fn staging(&self, dest: &Path) -> std::io::Result<(File, PathBuf)> {
        crate::direct::open_staging(&self.root, dest, &self.next, |p| {
            OpenOptions::new().write(true).create_new(true).open(p)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clears what a test flagged, so its temporary directory can be removed.
    struct Unflag(PathBuf);
    impl Drop for Unflag {
        fn drop(&mut self) {
            if let Ok(f) = open_for_flags(&self.0) {
                let _ = set_immutable(&f, false);
            }
        }
    }

    #[test]
    fn create_seals_and_remove_unseals() {
        let dir = tempfile::tempdir().unwrap();
        let lock = LocalLock::new(dir.path());
        let _g = Unflag(lock.path("chunks/ab/abcd"));
        lock.probe("test").unwrap();
        assert_eq!(
            lock.create("chunks/ab/abcd", b"data").unwrap(),
            Created::Written
        );
        let path = lock.path("chunks/ab/abcd");
        assert_eq!(is_immutable(&path).unwrap(), Some(true));
        let err = std::fs::remove_file(&path).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
        assert_eq!(
            lock.create("chunks/ab/abcd", b"other").unwrap(),
            Created::AlreadyExists
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        // No staging file is left beside it.
        assert_eq!(
            std::fs::read_dir(lock.path("chunks/ab")).unwrap().count(),
            1
        );
        assert_eq!(lock.remove("chunks/ab/abcd").unwrap(), Deleted::Deleted);
        assert_eq!(is_immutable(&path).unwrap(), None);
        assert_eq!(lock.remove("chunks/ab/abcd").unwrap(), Deleted::Deleted);
    }
}
