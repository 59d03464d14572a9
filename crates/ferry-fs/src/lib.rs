//! File-level access to disks: partition tables (MBR with logical partitions, GPT) and file
//! systems (ext2/3/4 through `ext4-view`, NTFS through `ntfs`) read over a
//! [`BlockSource`](ferry_core::BlockSource) — a restore point's disk, an image, an NBD export —
//! without restoring or mounting anything. Knows nothing of repositories.
//!
//! * [`partition`]: decode partition tables (sans-I/O decoders, fuzzed) and read them.
//! * [`fs`]: detect, list and read file systems inside a partition.
//! * [`swap`]: find Linux swap partitions and files and NTFS paging files, for backups that
//!   read them as zeros.
//! * [`reader`]: synchronous, cached reads over an async `BlockSource`.
//! * [`ext4map`]: where a file's blocks lie on ext4 (for swap files).
//! * [`san`]: off-host reads of files (VHDX/AVHDX) straight from an NTFS volume on a LUN, and
//!   the parent resolver that keeps an image chain inside that volume.

pub mod error;
pub mod ext4map;
pub mod fs;
pub mod fuzzing;
pub mod partition;
pub mod reader;
pub mod san;
pub mod swap;

pub use error::{FsError, Result};
pub use fs::{Entry, EntryKind, FsKind, NtfsLayout, Volume};
pub use partition::{Partition, PartitionTable, Scheme, read_table};
pub use reader::{BlockReader, MemDisk, ReadAt, Slice};
pub use san::{NtfsFileSource, SanResolver, SanVolume};
pub use swap::{Exclusion, ExclusionKind, find_exclusions};

use std::sync::Arc;

/// A disk opened for file-level access.
pub struct Disk {
    disk: Arc<dyn ReadAt>,
    table: PartitionTable,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Disk({})", self.disk.name())
    }
}

/// One volume of a disk as listed: a partition (or the whole disk) and its file system.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VolumeInfo {
    /// Partition number (0: the whole disk, which has no partition table).
    pub number: u32,
    /// First byte.
    pub start: u64,
    /// Length.
    pub size: u64,
    /// Partition type name (empty for a whole disk).
    pub type_name: String,
    /// GPT name.
    pub name: String,
    /// File system this build reads, if any.
    pub fs: Option<FsKind>,
    /// What else was found when it reads none.
    pub found: String,
}

impl Disk {
    /// Reads the partition table of `disk`.
    pub fn open(disk: Arc<dyn ReadAt>) -> Result<Self> {
        let table = read_table(&*disk)?;
        Ok(Self { disk, table })
    }

    /// The partition table.
    pub fn table(&self) -> &PartitionTable {
        &self.table
    }

    fn slice_of(&self, number: u32) -> Result<Slice> {
        if number == 0 {
            return Ok(Slice::new(
                self.disk.clone(),
                0,
                self.disk.size(),
                "the whole disk",
            ));
        }
        let p = self
            .table
            .partitions
            .iter()
            .find(|p| p.number == number)
            .ok_or_else(|| {
                FsError::NotFound(format!(
                    "no partition {number} (the disk has {})",
                    if self.table.partitions.is_empty() {
                        "no partitions".to_string()
                    } else {
                        self.table
                            .partitions
                            .iter()
                            .map(|p| p.number.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ))
            })?;
        Ok(Slice::new(
            self.disk.clone(),
            p.start,
            p.size,
            format!("partition {number}"),
        ))
    }

    /// The volumes: every partition, or the whole disk when there is no table.
    pub fn volumes(&self) -> Result<Vec<VolumeInfo>> {
        let mut v = Vec::new();
        if self.table.scheme == Scheme::None {
            let s = self.slice_of(0)?;
            let fs = fs::detect(&s)?;
            v.push(VolumeInfo {
                number: 0,
                start: 0,
                size: s.len(),
                type_name: String::new(),
                name: String::new(),
                fs,
                found: if fs.is_some() {
                    String::new()
                } else {
                    fs::describe_unknown(&s)
                },
            });
        }
        for p in &self.table.partitions {
            let s = self.slice_of(p.number)?;
            let extended = matches!(p.ptype, partition::PartitionType::Mbr(0x05 | 0x0F | 0x85));
            let fs = if extended { None } else { fs::detect(&s)? };
            v.push(VolumeInfo {
                number: p.number,
                start: p.start,
                size: p.size,
                type_name: p.type_name.clone(),
                name: p.name.clone(),
                fs,
                found: match (fs, extended) {
                    (Some(_), _) => String::new(),
                    (None, true) => "extended partition (holds logical partitions)".into(),
                    (None, false) => fs::describe_unknown(&s),
                },
            });
        }
        Ok(v)
    }

    /// Opens the file system of partition `number` (0: the whole disk); `None` picks the only
    /// or first volume with a file system this build reads.
    pub fn volume(&self, number: Option<u32>) -> Result<Volume> {
        let n = match number {
            Some(n) => n,
            None => self
                .volumes()?
                .into_iter()
                .find(|v| v.fs.is_some())
                .map(|v| v.number)
                .ok_or_else(|| FsError::Unsupported {
                    what: self.disk.name(),
                    message: "no ext4 or NTFS file system on this disk (`ferry files ls` without a path lists its partitions)".into(),
                })?,
        };
        Volume::open(self.slice_of(n)?)
    }
}
