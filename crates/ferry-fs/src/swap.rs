//! Swap and pagefile detection for backups: the extents of Linux swap partitions (by MBR/GPT
//! type or `SWAPSPACE2` signature), Linux swap files on ext4 (from `/etc/fstab` and the usual
//! names, each confirmed by its signature) and NTFS `pagefile.sys`, `hiberfil.sys` and
//! `swapfile.sys` in the volume root. The first page of a Linux swap area (its header, which
//! `swapon` needs) is never excluded.

use crate::error::Result;
use crate::ext4map::Mapper;
use crate::fs::{FsKind, Volume, detect};
use crate::partition::{Scheme, read_table};
use crate::reader::{ReadAt, Slice};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::sync::Arc;

/// The swap signature, at the end of the first page of a swap area.
pub const SWAP_MAGIC: &[u8; 10] = b"SWAPSPACE2";
/// Page sizes whose swap header is recognised.
const PAGE_SIZES: [u64; 4] = [4096, 8192, 16384, 65536];
/// Swap files looked for besides those `/etc/fstab` names.
const USUAL_SWAP_FILES: [&str; 3] = ["/swapfile", "/swap.img", "/swap/swapfile"];
/// NTFS files whose contents are never needed after a restore.
pub const NTFS_PAGING_FILES: [&str; 3] = ["pagefile.sys", "hiberfil.sys", "swapfile.sys"];

/// What an exclusion is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExclusionKind {
    /// A Linux swap partition (everything after its header page).
    SwapPartition,
    /// A Linux swap file (everything after its header page).
    SwapFile,
    /// An NTFS paging, hibernation or swap file.
    Pagefile,
}

/// One excluded area: read as zeros by the backup, never stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusion {
    /// What it is.
    pub kind: ExclusionKind,
    /// Where (`partition 2`, `partition 3:/swapfile`, `partition 4:pagefile.sys`).
    pub what: String,
    /// Byte ranges of the disk.
    pub ranges: Vec<Range<u64>>,
}

impl Exclusion {
    /// Bytes excluded.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }
}

/// The page size of the swap header at the start of `head`, if it carries one.
pub fn swap_header_size(head: &[u8]) -> Option<u64> {
    PAGE_SIZES.into_iter().find(|&ps| {
        let ps = ps as usize;
        head.len() >= ps && &head[ps - 10..ps] == SWAP_MAGIC
    })
}

/// Swap files named by an fstab (entries of type `swap` whose source is a path outside `/dev`).
pub fn fstab_swap_files(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "swap" && f[0].starts_with('/') && !f[0].starts_with("/dev/"))
                .then(|| f[0].to_string())
        })
        .collect()
}

fn read_head(vol: &Slice) -> Result<Vec<u8>> {
    let n = 65536.min(vol.len()) as usize;
    let mut b = vec![0u8; n];
    vol.read_exact_at(0, &mut b)?;
    Ok(b)
}

fn shift(ranges: Vec<Range<u64>>, by: u64) -> Vec<Range<u64>> {
    ranges
        .into_iter()
        .map(|r| r.start + by..r.end + by)
        .collect()
}

/// Finds what a backup of `disk` may read as zeros. Problems with one partition are logged
/// and that partition is left alone; only an unreadable disk is an error.
pub fn find_exclusions(disk: Arc<dyn ReadAt>) -> Result<Vec<Exclusion>> {
    let table = match read_table(&*disk) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(disk = %disk.name(), error = %e, "no swap exclusion: partition table unreadable");
            return Ok(Vec::new());
        }
    };
    let mut vols = Vec::new();
    if table.scheme == Scheme::None {
        vols.push((
            Slice::new(disk.clone(), 0, disk.size(), "disk"),
            false,
            "disk".to_string(),
        ));
    }
    for p in &table.partitions {
        if matches!(
            p.ptype,
            crate::partition::PartitionType::Mbr(0x05 | 0x0F | 0x85)
        ) {
            continue;
        }
        let label = format!("partition {}", p.number);
        vols.push((
            Slice::new(disk.clone(), p.start, p.size, label.clone()),
            p.is_swap_type(),
            label,
        ));
    }
    let mut out = Vec::new();
    for (vol, swap_type, label) in vols {
        match exclusions_in(&vol, swap_type, &label) {
            Ok(v) => out.extend(v),
            Err(e) => {
                tracing::warn!(disk = %disk.name(), volume = %label, error = %e, "no swap exclusion in this volume")
            }
        }
    }
    Ok(out)
}

fn exclusions_in(vol: &Slice, swap_type: bool, label: &str) -> Result<Vec<Exclusion>> {
    let head = read_head(vol)?;
    let header = swap_header_size(&head);
    if header.is_some() || swap_type {
        // A swap-typed partition without a signature (encrypted swap) is swap all the same.
        let keep = header.unwrap_or(4096).min(vol.len());
        let area = vol.start() + keep..vol.start() + vol.len();
        return Ok(vec![Exclusion {
            kind: ExclusionKind::SwapPartition,
            what: label.to_string(),
            ranges: vec![area],
        }]);
    }
    let mut out = Vec::new();
    match detect(vol)? {
        Some(FsKind::Ext4) => {
            let fs = Volume::open(vol.clone())?;
            let mut names: Vec<String> = match fs.read_head("/etc/fstab", 1 << 20) {
                Ok(b) => fstab_swap_files(&String::from_utf8_lossy(&b)),
                Err(_) => Vec::new(),
            };
            for n in USUAL_SWAP_FILES {
                if !names.iter().any(|x| x == n) {
                    names.push(n.to_string());
                }
            }
            let mapper = Mapper::new(vol)?;
            for name in names {
                let Ok(head) = fs.read_head(&name, 65536) else {
                    continue;
                };
                let Some(keep) = swap_header_size(&head) else {
                    tracing::debug!(volume = %label, file = %name, "not a swap file (no SWAPSPACE2 signature)");
                    continue;
                };
                if let Some((ranges, _)) = mapper.map_file(&name, keep)? {
                    out.push(Exclusion {
                        kind: ExclusionKind::SwapFile,
                        what: format!("{label}:{name}"),
                        ranges: shift(ranges, vol.start()),
                    });
                }
            }
        }
        Some(FsKind::Ntfs) => {
            let fs = Volume::open(vol.clone())?;
            for name in NTFS_PAGING_FILES {
                if let Some((ranges, _)) = fs.ntfs_data_runs(name)? {
                    out.push(Exclusion {
                        kind: ExclusionKind::Pagefile,
                        what: format!("{label}:{name}"),
                        ranges: shift(ranges, vol.start()),
                    });
                }
            }
        }
        None => {}
    }
    out.retain(|e| e.bytes() > 0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fstab_swap_files_are_paths_outside_dev() {
        let t = "# comment\nUUID=x / ext4 defaults 0 1\n/dev/sda2 none swap sw 0 0\n/swapfile none swap sw 0 0 # mine\n/var/swap\tnone\tswap\tdefaults\n/data/x /x ext4 defaults\n";
        assert_eq!(fstab_swap_files(t), ["/swapfile", "/var/swap"]);
    }

    #[test]
    fn swap_header_by_page_size() {
        let mut b = vec![0u8; 65536];
        assert_eq!(swap_header_size(&b), None);
        b[8192 - 10..8192].copy_from_slice(SWAP_MAGIC);
        assert_eq!(swap_header_size(&b), Some(8192));
        b[4086..4096].copy_from_slice(SWAP_MAGIC);
        assert_eq!(swap_header_size(&b), Some(4096));
    }
}
