//! Partition tables: MBR (primary and logical partitions) and GPT, decoded from bytes without I/O
//! ([`parse_mbr`], [`parse_ebr`], [`parse_gpt_header`], [`parse_gpt_entries`]) and read from a
//! disk by [`read_table`]. Every length, count and offset read from the disk is checked before use.

use crate::error::{FsError, Result};
use crate::reader::ReadAt;
use serde::Serialize;

/// GPT partition type of Linux swap (0657FD6D-A4AB-43C4-84E5-0933C84B4F4F), as stored on disk.
pub const GPT_LINUX_SWAP: [u8; 16] = guid_bytes(0x0657_FD6D, 0xA4AB, 0x43C4, 0x84E5_0933_C84B_4F4F);
/// MBR partition type of Linux swap.
pub const MBR_LINUX_SWAP: u8 = 0x82;
/// Most logical partitions followed in an extended partition's chain.
const MAX_LOGICAL: u32 = 256;
/// Largest GPT entry array accepted (the usual one is 16 KiB).
const MAX_GPT_ENTRIES_BYTES: u64 = 4 << 20;

const fn guid_bytes(a: u32, b: u16, c: u16, d: u64) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    let d = d.to_be_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// Formats an on-disk GUID as `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX`.
pub fn guid_string(g: &[u8; 16]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

/// How the disk is partitioned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// A DOS/MBR partition table.
    Mbr,
    /// A GUID partition table.
    Gpt,
    /// No partition table (the disk may hold a file system directly).
    None,
}

/// The partition type as the table stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PartitionType {
    /// MBR system id byte.
    Mbr(u8),
    /// GPT type GUID.
    Gpt(String),
}

/// One partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// 1-based number as Linux names it (MBR: 1–4 primary, 5+ logical; GPT: entry index + 1).
    pub number: u32,
    /// First byte on the disk.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type as stored.
    #[serde(rename = "type")]
    pub ptype: PartitionType,
    /// Human name of the type (`Linux swap`, `Microsoft basic data`, …).
    pub type_name: String,
    /// GPT partition name (empty on MBR).
    pub name: String,
}

impl Partition {
    /// True when the table marks this partition as Linux swap.
    pub fn is_swap_type(&self) -> bool {
        match &self.ptype {
            PartitionType::Mbr(t) => *t == MBR_LINUX_SWAP,
            PartitionType::Gpt(g) => *g == guid_string(&GPT_LINUX_SWAP),
        }
    }
}

/// A disk's partition table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionTable {
    /// MBR, GPT or none.
    pub scheme: Scheme,
    /// Logical sector size the table was found with.
    pub sector_size: u32,
    /// The partitions, by number.
    pub partitions: Vec<Partition>,
}

/// One MBR entry (primary or in an EBR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MbrEntry {
    /// Slot 0–3.
    pub slot: u8,
    /// System id.
    pub ptype: u8,
    /// First sector (relative, as stored).
    pub lba: u32,
    /// Sectors.
    pub sectors: u32,
}

impl MbrEntry {
    /// True for an extended-partition container (CHS, LBA, Linux).
    pub fn is_extended(&self) -> bool {
        matches!(self.ptype, 0x05 | 0x0F | 0x85)
    }
}

/// Decodes a boot sector's partition entries; `None` when it carries no 0x55AA signature.
pub fn parse_mbr(sector: &[u8]) -> Option<Vec<MbrEntry>> {
    if sector.len() < 512 || sector[510] != 0x55 || sector[511] != 0xAA {
        return None;
    }
    let mut v = Vec::new();
    for slot in 0..4u8 {
        let e = &sector[446 + 16 * slot as usize..][..16];
        let ptype = e[4];
        let lba = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
        let sectors = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
        if ptype != 0 && sectors != 0 {
            v.push(MbrEntry {
                slot,
                ptype,
                lba,
                sectors,
            });
        }
    }
    Some(v)
}

/// Decodes an extended boot record: the logical partition it describes (LBA relative to this
/// EBR) and the next EBR (LBA relative to the extended partition's start), if any.
pub fn parse_ebr(sector: &[u8]) -> Result<(Option<MbrEntry>, Option<MbrEntry>)> {
    let entries = parse_mbr(sector)
        .ok_or_else(|| FsError::corrupt("extended boot record", "no 0x55AA signature"))?;
    let logical = entries
        .iter()
        .find(|e| e.slot == 0 && !e.is_extended())
        .copied();
    let next = entries
        .iter()
        .find(|e| e.slot == 1 && e.is_extended())
        .copied();
    Ok((logical, next))
}

/// A decoded GPT header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptHeader {
    /// First LBA of the entry array.
    pub entries_lba: u64,
    /// Number of entries.
    pub entries: u32,
    /// Bytes per entry.
    pub entry_size: u32,
    /// CRC32 of the entry array.
    pub entries_crc: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes and checks a GPT header sector.
pub fn parse_gpt_header(sector: &[u8]) -> Result<GptHeader> {
    let what = "GPT header";
    if sector.len() < 92 || &sector[..8] != b"EFI PART" {
        return Err(FsError::corrupt(what, "no `EFI PART` signature"));
    }
    let hsize = le32(sector, 12) as usize;
    if !(92..=sector.len()).contains(&hsize) {
        return Err(FsError::corrupt(
            what,
            format!("header size {hsize} outside 92..={}", sector.len()),
        ));
    }
    let stored = le32(sector, 16);
    let mut h = crc32fast::Hasher::new();
    h.update(&sector[..16]);
    h.update(&[0; 4]);
    h.update(&sector[20..hsize]);
    let crc = h.finalize();
    if crc != stored {
        return Err(FsError::corrupt(
            what,
            format!("CRC32 {crc:08x} does not match the stored {stored:08x}"),
        ));
    }
    let entries = le32(sector, 80);
    let entry_size = le32(sector, 84);
    if entry_size < 128 || entry_size % 8 != 0 {
        return Err(FsError::corrupt(
            what,
            format!("entry size {entry_size} (must be a multiple of 8, at least 128)"),
        ));
    }
    if u64::from(entries) * u64::from(entry_size) > MAX_GPT_ENTRIES_BYTES {
        return Err(FsError::corrupt(
            what,
            format!("{entries} entries of {entry_size} bytes exceed {MAX_GPT_ENTRIES_BYTES} bytes"),
        ));
    }
    Ok(GptHeader {
        entries_lba: le64(sector, 72),
        entries,
        entry_size,
        entries_crc: le32(sector, 88),
    })
}

/// Known names of common types (for listings).
pub fn gpt_type_name(g: &[u8; 16]) -> &'static str {
    match guid_string(g).as_str() {
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI system",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        _ => "unknown",
    }
}

/// Known names of common MBR types.
pub fn mbr_type_name(t: u8) -> &'static str {
    match t {
        0x07 => "NTFS/exFAT",
        0x0B | 0x0C => "FAT32",
        0x05 | 0x0F | 0x85 => "extended",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8E => "Linux LVM",
        0xEE => "GPT protective",
        0xEF => "EFI system",
        _ => "unknown",
    }
}

/// Decodes a GPT entry array (checked against the header's CRC32) into partitions that lie
/// within a disk of `disk_size` bytes.
pub fn parse_gpt_entries(
    array: &[u8],
    h: &GptHeader,
    sector_size: u32,
    disk_size: u64,
) -> Result<Vec<Partition>> {
    let what = "GPT partition entries";
    let len = h.entries as usize * h.entry_size as usize;
    if array.len() < len {
        return Err(FsError::corrupt(
            what,
            format!("{} bytes, the header says {len}", array.len()),
        ));
    }
    let crc = crc32fast::hash(&array[..len]);
    if crc != h.entries_crc {
        return Err(FsError::corrupt(
            what,
            format!(
                "CRC32 {crc:08x} does not match the header's {:08x}",
                h.entries_crc
            ),
        ));
    }
    let ss = u64::from(sector_size);
    let mut out = Vec::new();
    for (i, e) in array[..len].chunks_exact(h.entry_size as usize).enumerate() {
        let mut ty = [0u8; 16];
        ty.copy_from_slice(&e[..16]);
        if ty == [0; 16] {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        let start = first.checked_mul(ss);
        let end = last.checked_add(1).and_then(|l| l.checked_mul(ss));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(FsError::corrupt(
                what,
                format!("entry {}: LBA overflow", i + 1),
            ));
        };
        if last < first || end > disk_size {
            return Err(FsError::corrupt(
                what,
                format!(
                    "entry {}: LBAs {first}..={last} do not fit a disk of {disk_size} bytes",
                    i + 1
                ),
            ));
        }
        let name: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        out.push(Partition {
            number: i as u32 + 1,
            start,
            size: end - start,
            ptype: PartitionType::Gpt(guid_string(&ty)),
            type_name: gpt_type_name(&ty).into(),
            name: String::from_utf16_lossy(&name),
        });
    }
    Ok(out)
}

fn read_vec(r: &dyn ReadAt, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
    if offset.checked_add(len as u64).is_none_or(|e| e > r.size()) {
        return Err(FsError::corrupt(
            what,
            format!(
                "{len} bytes at offset {offset} lie past the end of the disk ({} bytes)",
                r.size()
            ),
        ));
    }
    let mut v = vec![0; len];
    r.read_exact_at(offset, &mut v)?;
    Ok(v)
}

fn mbr_partition(
    number: u32,
    ptype: u8,
    start_lba: u64,
    sectors: u32,
    disk: u64,
) -> Result<Partition> {
    let start = start_lba * 512;
    let size = u64::from(sectors) * 512;
    if start + size > disk {
        return Err(FsError::corrupt(
            "MBR",
            format!(
                "partition {number} ({size} bytes at {start}) reaches past the end of the disk ({disk} bytes)"
            ),
        ));
    }
    Ok(Partition {
        number,
        start,
        size,
        ptype: PartitionType::Mbr(ptype),
        type_name: mbr_type_name(ptype).into(),
        name: String::new(),
    })
}

/// Reads the partition table of a disk: GPT (behind a protective MBR; 512- or 4096-byte
/// sectors), MBR with logical partitions, or none.
pub fn read_table(r: &dyn ReadAt) -> Result<PartitionTable> {
    let size = r.size();
    let none = PartitionTable {
        scheme: Scheme::None,
        sector_size: 512,
        partitions: Vec::new(),
    };
    if size < 512 {
        return Ok(none);
    }
    let mbr = read_vec(r, 0, 512, "MBR")?;
    let Some(entries) = parse_mbr(&mbr) else {
        return Ok(none);
    };
    // A boot sector of a file system (NTFS, FAT) also ends in 0x55AA: no table then.
    if &mbr[3..11] == b"NTFS    " || &mbr[82..87] == b"FAT32" || &mbr[54..59] == b"FAT1" {
        return Ok(none);
    }
    if entries.iter().any(|e| e.ptype == 0xEE) {
        let mut last_err = None;
        for ss in [512u32, 4096] {
            if u64::from(ss) * 2 > size {
                continue;
            }
            let hdr = read_vec(r, u64::from(ss), ss as usize, "GPT header")?;
            if &hdr[..8] != b"EFI PART" {
                continue;
            }
            match parse_gpt_header(&hdr) {
                Ok(h) => {
                    let off = h.entries_lba.checked_mul(u64::from(ss)).ok_or_else(|| {
                        FsError::corrupt("GPT header", "entry array LBA overflows")
                    })?;
                    let len = h.entries as usize * h.entry_size as usize;
                    let array = read_vec(r, off, len, "GPT partition entries")?;
                    let partitions = parse_gpt_entries(&array, &h, ss, size)?;
                    return Ok(PartitionTable {
                        scheme: Scheme::Gpt,
                        sector_size: ss,
                        partitions,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        return Err(last_err.unwrap_or_else(|| {
            FsError::corrupt(
                "GPT",
                "a protective MBR but no `EFI PART` header at LBA 1 (512- or 4096-byte sectors)",
            )
        }));
    }
    let mut partitions = Vec::new();
    for e in &entries {
        partitions.push(mbr_partition(
            u32::from(e.slot) + 1,
            e.ptype,
            u64::from(e.lba),
            e.sectors,
            size,
        )?);
        if !e.is_extended() {
            continue;
        }
        // Logical partitions: a chain of EBRs, each relative to the extended partition.
        let ext = u64::from(e.lba);
        let mut ebr_lba = ext;
        let mut number = 5;
        let mut seen = std::collections::HashSet::new();
        while number < 5 + MAX_LOGICAL {
            if !seen.insert(ebr_lba) {
                return Err(FsError::corrupt(
                    "extended partition",
                    format!("EBR chain loops back to sector {ebr_lba}"),
                ));
            }
            let sector = read_vec(r, ebr_lba * 512, 512, "extended boot record")?;
            let (logical, next) = parse_ebr(&sector).map_err(|e| {
                FsError::corrupt(
                    format!("extended boot record at sector {ebr_lba}"),
                    e.to_string(),
                )
            })?;
            if let Some(l) = logical {
                partitions.push(mbr_partition(
                    number,
                    l.ptype,
                    ebr_lba + u64::from(l.lba),
                    l.sectors,
                    size,
                )?);
                number += 1;
            }
            match next {
                Some(n) => ebr_lba = ext + u64::from(n.lba),
                None => break,
            }
        }
    }
    partitions.sort_by_key(|p| p.number);
    Ok(PartitionTable {
        scheme: Scheme::Mbr,
        sector_size: 512,
        partitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_guid_round_trips() {
        assert_eq!(
            guid_string(&GPT_LINUX_SWAP),
            "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
        );
        assert_eq!(gpt_type_name(&GPT_LINUX_SWAP), "Linux swap");
    }

    #[test]
    fn mbr_without_signature_is_no_table() {
        assert_eq!(parse_mbr(&[0u8; 512]), None);
    }

    #[test]
    fn gpt_header_crc_is_checked() {
        let mut s = vec![0u8; 512];
        s[..8].copy_from_slice(b"EFI PART");
        s[12..16].copy_from_slice(&92u32.to_le_bytes());
        s[80..84].copy_from_slice(&128u32.to_le_bytes());
        s[84..88].copy_from_slice(&128u32.to_le_bytes());
        let err = parse_gpt_header(&s).unwrap_err().to_string();
        assert!(err.contains("CRC32"), "{err}");
        let mut h = crc32fast::Hasher::new();
        h.update(&s[..92]);
        let crc = h.finalize();
        s[16..20].copy_from_slice(&crc.to_le_bytes());
        let h = parse_gpt_header(&s).unwrap();
        assert_eq!((h.entries, h.entry_size), (128, 128));
    }
}
