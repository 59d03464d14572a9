//! Block-aligned bounce buffers for `O_DIRECT` I/O. Memory only: the I/O stays with the caller
//! (local repository objects in `ferry-repo`, restore targets in `ferry-image`).

use std::sync::Mutex;

/// Alignment of direct I/O: covers devices with 512-byte and 4 KiB logical blocks.
pub const DIRECT_ALIGN: usize = 4096;

/// Reusable aligned buffers; holds at most one per concurrent user.
#[derive(Debug, Default)]
pub struct BouncePool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BouncePool {
    /// Copies `data` into a [`DIRECT_ALIGN`]-aligned buffer of `len` bytes (`len` ≥
    /// `data.len()`; the rest zero-filled) and runs `f` on it.
    pub fn with_aligned<R>(&self, data: &[u8], len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        let len = len.max(data.len());
        let mut b = self
            .free
            .lock()
            .map(|mut p| p.pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        if b.len() < len + DIRECT_ALIGN {
            // Rounded up so that lengths varying by a few bytes (compressed objects) reuse one
            // buffer instead of faulting in a fresh one each time.
            b = vec![0; (len + DIRECT_ALIGN).next_multiple_of(64 << 10)];
        }
        let at = b.as_ptr().align_offset(DIRECT_ALIGN);
        b[at..at + data.len()].copy_from_slice(data);
        b[at + data.len()..at + len].fill(0);
        let r = f(&b[at..at + len]);
        if let Ok(mut p) = self.free.lock() {
            p.push(b);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_padded_and_reused() {
        let pool = BouncePool::default();
        for (data, len) in [
            (&[1u8, 2, 3][..], 4096),
            (&[9u8; 5000][..], 8192),
            (&[7u8; 10][..], 3),
        ] {
            pool.with_aligned(data, len, |b| {
                assert_eq!(b.as_ptr().align_offset(DIRECT_ALIGN), 0);
                assert_eq!(b.len(), len.max(data.len()));
                assert_eq!(&b[..data.len()], data);
                assert!(b[data.len()..].iter().all(|x| *x == 0));
            });
        }
        assert_eq!(pool.free.lock().unwrap().len(), 1);
    }
}
