//! Entry points for the cargo-fuzz targets (`fuzz/`) and the proptests that run the same code
//! on random input in CI: whatever the bytes, decoding returns a value or an error.

use crate::reader::{MemDisk, ReadAt, Slice};
use std::sync::Arc;

/// Partition table decoding of a disk image, then every volume's detection.
pub fn partitions(data: &[u8]) {
    let _ = crate::partition::parse_mbr(data);
    let _ = crate::partition::parse_ebr(data);
    if let Ok(h) = crate::partition::parse_gpt_header(data) {
        let _ = crate::partition::parse_gpt_entries(data, &h, 512, data.len() as u64);
    }
    let disk: Arc<dyn ReadAt> = Arc::new(MemDisk(data.to_vec()));
    if let Ok(d) = crate::Disk::open(disk) {
        let _ = d.volumes();
    }
}

/// The ext4 mapper (superblock, inodes, extent trees, directories) on a file-system image, and
/// the swap signature and fstab decoders.
pub fn ext4map(data: &[u8]) {
    let _ = crate::ext4map::Superblock::parse(data);
    let _ = crate::ext4map::parse_inode(data);
    let _ = crate::ext4map::parse_extent_node(data);
    let _ = crate::ext4map::parse_dirents(data);
    let _ = crate::swap::swap_header_size(data);
    let _ = crate::swap::fstab_swap_files(&String::from_utf8_lossy(data));
    let disk: Arc<dyn ReadAt> = Arc::new(MemDisk(data.to_vec()));
    let vol = Slice::new(disk, 0, data.len() as u64, "fuzz");
    if let Ok(m) = crate::ext4map::Mapper::new(&vol) {
        let _ = m.map_file("/swapfile", 4096);
        let _ = m.map_file("/etc/fstab", 0);
    }
}

/// The SAN reader's run-list decoder on an NTFS volume image: the file lookup, `$DATA`, an
/// `$ATTRIBUTE_LIST` and its data runs.
pub fn ntfs_layout(data: &[u8]) {
    let disk: Arc<dyn ReadAt> = Arc::new(MemDisk(data.to_vec()));
    let vol = Slice::new(disk, 0, data.len() as u64, "fuzz");
    if let Ok(v) = crate::Volume::open(vol) {
        for p in ["/base.vhdx", "/child.avhdx", "/$MFT", "/"] {
            let _ = v.ntfs_file_layout(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    fn with_magic(mut v: Vec<u8>, at: usize, magic: &[u8]) -> Vec<u8> {
        if v.len() >= at + magic.len() {
            v[at..at + magic.len()].copy_from_slice(magic);
        }
        v
    }

    proptest! {
        #[test]
        fn partitions_never_panic(v in proptest::collection::vec(any::<u8>(), 0..4096)) {
            super::partitions(&v);
            super::partitions(&with_magic(v.clone(), 510, &[0x55, 0xAA]));
            super::partitions(&with_magic(with_magic(v, 510, &[0x55, 0xAA]), 512, b"EFI PART"));
        }

        #[test]
        fn ntfs_layout_never_panics(v in proptest::collection::vec(any::<u8>(), 0..8192)) {
            super::ntfs_layout(&with_magic(v, 3, b"NTFS    "));
        }

        #[test]
        fn ext4map_never_panics(v in proptest::collection::vec(any::<u8>(), 0..8192)) {
            super::ext4map(&v);
            super::ext4map(&with_magic(v, 1024 + 56, &[0x53, 0xEF]));
        }
    }
}
