//! VHD (Virtual PC / Xen / Azure): fixed, dynamic and differencing disks.
//!
//! All fields are big-endian. A 512-byte footer ends the file (dynamic disks keep a copy at
//! offset 0); dynamic and differencing disks add a 1024-byte dynamic header, a BAT of u32
//! sector numbers (`0xFFFFFFFF` = absent) and blocks laid out as `[sector bitmap][data]`. The
//! bitmap is most-significant-bit first; it decides presence only in differencing disks (bit 0
//! = read the parent), as qemu and Hyper-V do for dynamic ones too.

use crate::Format;
use crate::bytes::{be16, be32, be64, utf16};
use crate::error::ImageError;
use crate::layout::{Mapper, Piece};
use crate::open::{Identity, Level, ParentRef};
use async_trait::async_trait;
use ferry_core::{BlockError, BlockSource};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub(crate) const FOOTER_LEN: usize = 512;
pub(crate) const DYN_HEADER_LEN: usize = 1024;
pub(crate) const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Largest VHD the format allows (2040 GiB); anything bigger is corrupt input.
pub(crate) const MAX_SIZE: u64 = 2040 << 30;
/// Creator string we write; not `qemu`/`vpc `, so readers trust `current_size` over CHS.
pub(crate) const CREATOR: &[u8; 4] = b"frry";

pub(crate) const DISK_FIXED: u32 = 2;
pub(crate) const DISK_DYNAMIC: u32 = 3;
pub(crate) const DISK_DIFFERENCING: u32 = 4;

/// The decoded footer.
#[derive(Debug, Clone)]
pub(crate) struct Footer {
    pub data_offset: u64,
    pub creator: [u8; 4],
    pub current_size: u64,
    pub geometry: (u16, u8, u8),
    pub disk_type: u32,
    pub unique_id: [u8; 16],
}

/// One's complement of the byte sum, skipping the checksum field at `field`.
pub(crate) fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, v)| s.wrapping_add(*v as u32));
    !sum
}

pub(crate) fn parse_footer(file: &str, b: &[u8]) -> Result<Footer, ImageError> {
    let what = "VHD footer";
    if b.len() < FOOTER_LEN || &b[..8] != b"conectix" {
        return Err(ImageError::corrupt(file, what, "no `conectix` cookie"));
    }
    let stored = be32(b, 64);
    let computed = checksum(&b[..FOOTER_LEN], 64);
    if stored != computed {
        return Err(ImageError::corrupt(
            file,
            what,
            format!("checksum {stored:#010x} does not match the contents ({computed:#010x})"),
        ));
    }
    let mut creator = [0u8; 4];
    creator.copy_from_slice(&b[28..32]);
    let mut unique_id = [0u8; 16];
    unique_id.copy_from_slice(&b[68..84]);
    let f = Footer {
        data_offset: be64(b, 16),
        creator,
        current_size: be64(b, 48),
        geometry: (be16(b, 56), b[58], b[59]),
        disk_type: be32(b, 60),
        unique_id,
    };
    if !matches!(f.disk_type, DISK_FIXED | DISK_DYNAMIC | DISK_DIFFERENCING) {
        return Err(ImageError::corrupt(
            file,
            what,
            format!("unknown disk type {}", f.disk_type),
        ));
    }
    Ok(f)
}

impl Footer {
    /// The virtual size. Virtual PC and qemu (`vpc `, `qemu` creators) size the disk by its CHS
    /// geometry; everyone else (Hyper-V, Xen, Azure, qemu's `force_size`) by `current_size`.
    pub(crate) fn virtual_size(&self) -> u64 {
        let (c, h, s) = self.geometry;
        let chs = c as u64 * h as u64 * s as u64;
        let by_geometry = matches!(&self.creator, b"vpc " | b"qemu") && chs != 65535 * 16 * 255;
        if by_geometry {
            chs * 512
        } else {
            self.current_size
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct DynHeader {
    pub table_offset: u64,
    pub max_entries: u32,
    pub block_size: u32,
    pub parent_unique_id: [u8; 16],
    pub parent_name: String,
    /// (platform code, data offset, data length)
    pub locators: Vec<([u8; 4], u64, u32)>,
}

pub(crate) fn parse_dyn_header(file: &str, b: &[u8]) -> Result<DynHeader, ImageError> {
    let what = "VHD dynamic header";
    if b.len() < DYN_HEADER_LEN || &b[..8] != b"cxsparse" {
        return Err(ImageError::corrupt(file, what, "no `cxsparse` cookie"));
    }
    let stored = be32(b, 36);
    let computed = checksum(&b[..DYN_HEADER_LEN], 36);
    if stored != computed {
        return Err(ImageError::corrupt(
            file,
            what,
            format!("checksum {stored:#010x} does not match the contents ({computed:#010x})"),
        ));
    }
    let block_size = be32(b, 32);
    if !block_size.is_power_of_two() || !(512..=(256 << 20)).contains(&block_size) {
        return Err(ImageError::corrupt(
            file,
            what,
            format!("block size {block_size} is not a power of two between 512 B and 256 MiB"),
        ));
    }
    let mut parent_unique_id = [0u8; 16];
    parent_unique_id.copy_from_slice(&b[40..56]);
    let locators = (0..8)
        .map(|i| 576 + i * 24)
        .filter_map(|o| {
            let mut code = [0u8; 4];
            code.copy_from_slice(&b[o..o + 4]);
            (code != [0; 4]).then(|| (code, be64(b, o + 16), be32(b, o + 8)))
        })
        .collect();
    Ok(DynHeader {
        table_offset: be64(b, 16),
        max_entries: be32(b, 28),
        block_size,
        parent_unique_id,
        parent_name: utf16(&b[64..576], true),
        locators,
    })
}

#[derive(Debug)]
struct VhdMapper {
    name: String,
    bat: Vec<u32>,
    block_size: u64,
    bitmap_len: u64,
    differencing: bool,
    bitmaps: Mutex<HashMap<u32, Arc<Vec<u8>>>>,
}

#[derive(Debug)]
struct FixedMapper;

#[async_trait]
impl Mapper for FixedMapper {
    async fn map(
        &self,
        _: &[Arc<dyn BlockSource>],
        offset: u64,
        max: u64,
    ) -> Result<(Piece, u64), BlockError> {
        Ok((Piece::Data { file: 0, offset }, max))
    }
}

impl VhdMapper {
    async fn bitmap(
        &self,
        file: &dyn BlockSource,
        block: u32,
        sector: u32,
    ) -> Result<Arc<Vec<u8>>, BlockError> {
        if let Some(b) = self
            .bitmaps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&block)
        {
            return Ok(b.clone());
        }
        let mut bm = vec![0u8; self.bitmap_len as usize];
        file.read_at(sector as u64 * 512, &mut bm).await?;
        let bm = Arc::new(bm);
        let mut cache = self.bitmaps.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= 4096 {
            cache.clear();
        }
        cache.insert(block, bm.clone());
        Ok(bm)
    }
}

#[async_trait]
impl Mapper for VhdMapper {
    async fn map(
        &self,
        files: &[Arc<dyn BlockSource>],
        offset: u64,
        max: u64,
    ) -> Result<(Piece, u64), BlockError> {
        let block = offset / self.block_size;
        let within = offset % self.block_size;
        let run = (self.block_size - within).min(max);
        let absent = if self.differencing {
            Piece::Parent
        } else {
            Piece::Zero
        };
        let Some(&sector) = self.bat.get(block as usize) else {
            return Err(BlockError::corrupt(
                &self.name,
                format!(
                    "offset {offset} lies beyond the VHD BAT ({} entries)",
                    self.bat.len()
                ),
            ));
        };
        if sector == UNALLOCATED {
            return Ok((absent, run));
        }
        let data = sector as u64 * 512 + self.bitmap_len;
        if !self.differencing {
            return Ok((
                Piece::Data {
                    file: 0,
                    offset: data + within,
                },
                run,
            ));
        }
        let bm = self.bitmap(files[0].as_ref(), block as u32, sector).await?;
        let bit = |s: u64| bm[(s / 8) as usize] >> (7 - (s % 8)) & 1 == 1;
        let first = within / 512;
        let present = bit(first);
        let mut end = (first + 1) * 512;
        while end < within + run && bit(end / 512) == present {
            end += 512;
        }
        let n = (end - within).min(run);
        Ok((
            if present {
                Piece::Data {
                    file: 0,
                    offset: data + within,
                }
            } else {
                Piece::Parent
            },
            n,
        ))
    }
}

/// Opens a VHD whose file is `src`.
pub(crate) async fn open(src: Arc<dyn BlockSource>) -> Result<Level, ImageError> {
    let name = src.name();
    let file_len = src.size();
    if file_len < FOOTER_LEN as u64 {
        return Err(ImageError::corrupt(
            &name,
            "VHD footer",
            format!("file is {file_len} bytes, shorter than a footer"),
        ));
    }
    let mut head = [0u8; FOOTER_LEN];
    src.read_at(0, &mut head).await?;
    let mut tail = [0u8; FOOTER_LEN];
    src.read_at(file_len - FOOTER_LEN as u64, &mut tail).await?;
    // The trailing footer is authoritative; a dynamic disk whose tail was lost (truncated copy)
    // still has the copy at offset 0, but we refuse it: its data may be cut short too.
    let footer = match parse_footer(&name, &tail) {
        Ok(f) => f,
        Err(e) if &head[..8] == b"conectix" => {
            return Err(ImageError::corrupt(
                &name,
                "VHD footer at the end of the file",
                format!("{e}; the file looks truncated"),
            ));
        }
        Err(e) => return Err(e),
    };
    let size = footer.virtual_size();
    if size > MAX_SIZE || size % 512 != 0 {
        return Err(ImageError::corrupt(
            &name,
            "VHD footer",
            format!("virtual size {size} is not a multiple of 512 up to 2040 GiB"),
        ));
    }
    if footer.disk_type == DISK_FIXED {
        if file_len < size + FOOTER_LEN as u64 {
            return Err(ImageError::corrupt(
                &name,
                "fixed VHD",
                format!(
                    "file is {file_len} bytes, too short for {size} bytes of data and a footer"
                ),
            ));
        }
        return Ok(Level {
            format: Format::Vhd,
            subformat: "fixed".into(),
            size,
            block_size: 0,
            mapper: Box::new(FixedMapper),
            files: vec![src],
            parent: None,
            identity: Identity::VhdUniqueId(footer.unique_id),
        });
    }
    let dyn_off = footer.data_offset;
    if dyn_off
        .checked_add(DYN_HEADER_LEN as u64)
        .is_none_or(|e| e > file_len)
    {
        return Err(ImageError::corrupt(
            &name,
            "VHD footer",
            format!("dynamic header offset {dyn_off} lies past the end of the file"),
        ));
    }
    let mut dh = vec![0u8; DYN_HEADER_LEN];
    src.read_at(dyn_off, &mut dh).await?;
    let dh = parse_dyn_header(&name, &dh)?;
    let bs = dh.block_size as u64;
    let blocks = size.div_ceil(bs);
    if (dh.max_entries as u64) < blocks {
        return Err(ImageError::corrupt(
            &name,
            "VHD dynamic header",
            format!(
                "BAT has {} entries, the disk needs {blocks}",
                dh.max_entries
            ),
        ));
    }
    let bat_len = blocks * 4;
    if dh
        .table_offset
        .checked_add(bat_len)
        .is_none_or(|e| e > file_len)
    {
        return Err(ImageError::corrupt(
            &name,
            "VHD BAT",
            format!(
                "{bat_len} bytes at offset {} reach past the end of the file ({file_len} bytes)",
                dh.table_offset
            ),
        ));
    }
    let mut raw = vec![0u8; bat_len as usize];
    src.read_at(dh.table_offset, &mut raw).await?;
    let bat: Vec<u32> = raw
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let bitmap_len = (bs / 512).div_ceil(8).div_ceil(512) * 512;
    for (i, &s) in bat.iter().enumerate() {
        if s == UNALLOCATED {
            continue;
        }
        let used = bs.min(size - i as u64 * bs);
        let end = s as u64 * 512 + bitmap_len + used;
        if end > file_len {
            return Err(ImageError::corrupt(
                &name,
                format!("VHD BAT entry {i}"),
                format!(
                    "block at sector {s} ends at byte {end}, past the end of the file ({file_len} bytes)"
                ),
            ));
        }
    }
    let differencing = footer.disk_type == DISK_DIFFERENCING;
    let parent = if differencing {
        let mut candidates = Vec::new();
        for (code, off, len) in &dh.locators {
            if !matches!(code, b"W2ru" | b"W2ku") || *len == 0 {
                continue;
            }
            if *len > 64 * 1024 || off.checked_add(*len as u64).is_none_or(|e| e > file_len) {
                return Err(ImageError::corrupt(
                    &name,
                    "VHD parent locator",
                    format!("{len} bytes at offset {off} are out of bounds"),
                ));
            }
            let mut b = vec![0u8; *len as usize];
            src.read_at(*off, &mut b).await?;
            candidates.push(utf16(&b, false));
        }
        if !dh.parent_name.is_empty() {
            candidates.push(dh.parent_name.clone());
        }
        Some(ParentRef {
            candidates,
            expect: Identity::VhdUniqueId(dh.parent_unique_id),
        })
    } else {
        None
    };
    Ok(Level {
        format: Format::Vhd,
        subformat: if differencing {
            "differencing"
        } else {
            "dynamic"
        }
        .into(),
        size,
        block_size: bs,
        mapper: Box::new(VhdMapper {
            name: name.clone(),
            bat,
            block_size: bs,
            bitmap_len,
            differencing,
            bitmaps: Mutex::new(HashMap::new()),
        }),
        files: vec![src],
        parent,
        identity: Identity::VhdUniqueId(footer.unique_id),
    })
}
