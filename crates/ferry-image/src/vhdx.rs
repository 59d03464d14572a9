//! VHDX (Hyper-V): dynamic, fixed and differencing (`.avhdx`) disks.
//!
//! Little-endian, MS-layout GUIDs. The first MiB holds the file identifier, two 4 KiB headers
//! (CRC-32C, the valid one with the higher sequence number wins) and two copies of the region
//! table, which locates the BAT and the metadata region. BAT entries are interleaved: after
//! every `chunk_ratio` payload entries comes one sector-bitmap entry. Sector bitmaps are
//! LSB-first, one bit per logical sector, and matter only for PARTIALLY_PRESENT blocks of
//! differencing disks. A non-empty log means the file was not closed cleanly; we refuse it
//! rather than read metadata the log would have changed.

use crate::Format;
use crate::bytes::{Guid, crc32c_without, le16, le32, le64, utf16};
use crate::error::ImageError;
use crate::layout::{Mapper, Piece};
use crate::open::{Identity, Level, ParentRef};
use async_trait::async_trait;
use ferry_core::{BlockError, BlockSource};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub(crate) const MIB: u64 = 1 << 20;
pub(crate) const HEADER_OFFSETS: [u64; 2] = [64 * 1024, 128 * 1024];
pub(crate) const REGION_OFFSETS: [u64; 2] = [192 * 1024, 256 * 1024];
pub(crate) const HEADER_LEN: usize = 4096;
pub(crate) const REGION_LEN: usize = 64 * 1024;
/// The format's limit (64 TiB).
pub(crate) const MAX_SIZE: u64 = 64 << 40;

pub(crate) const BAT_GUID: Guid = Guid::from_str_const("2DC27766-F623-4200-9D64-115E9BFD4A08");
pub(crate) const METADATA_GUID: Guid = Guid::from_str_const("8B7CA206-4790-4B9A-B8FE-575F050F886E");
pub(crate) const FILE_PARAMS: Guid = Guid::from_str_const("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
pub(crate) const VIRTUAL_SIZE: Guid = Guid::from_str_const("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
pub(crate) const PAGE83: Guid = Guid::from_str_const("BECA12AB-B2E6-4523-93EF-C309E000C746");
pub(crate) const LOGICAL_SECTOR: Guid =
    Guid::from_str_const("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
pub(crate) const PHYSICAL_SECTOR: Guid =
    Guid::from_str_const("CDA348C7-445D-4471-9CC9-E9885251C556");
pub(crate) const PARENT_LOCATOR: Guid =
    Guid::from_str_const("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
pub(crate) const LOCATOR_TYPE: Guid = Guid::from_str_const("B04AEFB7-D19E-4A81-B789-25B8E9445913");

pub(crate) const PAYLOAD_NOT_PRESENT: u64 = 0;
pub(crate) const PAYLOAD_UNDEFINED: u64 = 1;
pub(crate) const PAYLOAD_ZERO: u64 = 2;
/// MS-VHDX says 3; qemu's headers (and so files qemu wrote) use 5.
pub(crate) const PAYLOAD_UNMAPPED: u64 = 3;
pub(crate) const PAYLOAD_UNMAPPED_QEMU: u64 = 5;
pub(crate) const PAYLOAD_FULLY_PRESENT: u64 = 6;
pub(crate) const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;
pub(crate) const SB_PRESENT: u64 = 6;

/// A decoded header.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub seq: u64,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_length: u32,
    pub log_offset: u64,
}

pub(crate) fn parse_header(file: &str, which: usize, b: &[u8]) -> Result<Header, ImageError> {
    let what = format!("VHDX header {}", which + 1);
    if b.len() < HEADER_LEN || &b[..4] != b"head" {
        return Err(ImageError::corrupt(file, what, "no `head` signature"));
    }
    let stored = le32(b, 4);
    let computed = crc32c_without(&b[..HEADER_LEN], 4);
    if stored != computed {
        return Err(ImageError::corrupt(
            file,
            what,
            format!("CRC-32C {stored:#010x} does not match the contents ({computed:#010x})"),
        ));
    }
    let version = le16(b, 66);
    if version != 1 {
        return Err(ImageError::corrupt(
            file,
            what,
            format!("version {version}, expected 1"),
        ));
    }
    Ok(Header {
        seq: le64(b, 8),
        data_write_guid: Guid::from_slice(b, 32),
        log_guid: Guid::from_slice(b, 48),
        log_length: le32(b, 68),
        log_offset: le64(b, 72),
    })
}

/// Region table entries as (guid, file offset, length, required).
pub(crate) fn parse_region_table(
    file: &str,
    which: usize,
    b: &[u8],
) -> Result<Vec<(Guid, u64, u32, bool)>, ImageError> {
    let what = format!("VHDX region table {}", which + 1);
    if b.len() < REGION_LEN || &b[..4] != b"regi" {
        return Err(ImageError::corrupt(file, what, "no `regi` signature"));
    }
    let stored = le32(b, 4);
    let computed = crc32c_without(&b[..REGION_LEN], 4);
    if stored != computed {
        return Err(ImageError::corrupt(
            file,
            what,
            format!("CRC-32C {stored:#010x} does not match the contents ({computed:#010x})"),
        ));
    }
    let count = le32(b, 8);
    if count > 2047 {
        return Err(ImageError::corrupt(
            file,
            what,
            format!("{count} entries, at most 2047 allowed"),
        ));
    }
    Ok((0..count as usize)
        .map(|i| {
            let o = 16 + i * 32;
            (
                Guid::from_slice(b, o),
                le64(b, o + 16),
                le32(b, o + 24),
                le32(b, o + 28) & 1 == 1,
            )
        })
        .collect())
}

/// The valid header with the higher sequence number among the two copies (`copies[i]`: the raw
/// 4 KiB of header `i`, or why it could not be read): its slot, decoded, and raw bytes.
pub(crate) fn pick_header(
    file: &str,
    copies: Vec<Result<Vec<u8>, ImageError>>,
) -> Result<(usize, Header, Vec<u8>), ImageError> {
    let mut best: Option<(usize, Header, Vec<u8>)> = None;
    let mut errors = Vec::new();
    for (i, raw) in copies.into_iter().enumerate() {
        match raw.and_then(|b| parse_header(file, i, &b).map(|h| (h, b))) {
            Ok((h, b)) if best.as_ref().is_none_or(|(_, x, _)| h.seq > x.seq) => {
                best = Some((i, h, b))
            }
            Ok(_) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    best.ok_or_else(|| {
        ImageError::corrupt(
            file,
            "VHDX headers",
            format!("neither header is valid: {}", errors.join("; ")),
        )
    })
}

/// A region of the file: offset and length.
pub(crate) type Region = (u64, u32);

/// The BAT and metadata regions, (offset, length) each, from the first valid of the two
/// region-table copies (`copies[i]`: its raw 64 KiB, or why it could not be read). A metadata
/// region over 16 MiB is refused.
pub(crate) fn locate_regions(
    file: &str,
    copies: Vec<Result<Vec<u8>, ImageError>>,
) -> Result<(Region, Region), ImageError> {
    let mut errors = Vec::new();
    let mut regions = None;
    for (i, raw) in copies.into_iter().enumerate() {
        match raw.and_then(|b| parse_region_table(file, i, &b)) {
            Ok(r) => {
                regions = Some(r);
                break;
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let regions = regions.ok_or_else(|| {
        ImageError::corrupt(
            file,
            "VHDX region tables",
            format!("neither copy is valid: {}", errors.join("; ")),
        )
    })?;
    let (mut bat, mut md) = (None, None);
    for (id, off, len, required) in regions {
        match id {
            BAT_GUID => bat = Some((off, len)),
            METADATA_GUID => md = Some((off, len)),
            _ if required => {
                return Err(ImageError::unsupported(
                    file,
                    format!("required VHDX region {id} is unknown"),
                ));
            }
            _ => {}
        }
    }
    let (Some(bat), Some(md)) = (bat, md) else {
        return Err(ImageError::corrupt(
            file,
            "VHDX region table",
            "BAT or metadata region missing",
        ));
    };
    if md.1 as u64 > 16 * MIB {
        return Err(ImageError::corrupt(
            file,
            "VHDX metadata region",
            format!("{} bytes is absurdly large", md.1),
        ));
    }
    Ok((bat, md))
}

/// Decoded metadata items.
#[derive(Debug, Clone, Default)]
pub(crate) struct Metadata {
    pub block_size: u32,
    pub has_parent: bool,
    pub leave_allocated: bool,
    pub virtual_size: u64,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub parent: Vec<(String, String)>,
}

/// Parses the metadata region `b` (read whole; callers bound its length).
pub(crate) fn parse_metadata(file: &str, b: &[u8]) -> Result<Metadata, ImageError> {
    let what = "VHDX metadata table";
    if b.len() < 64 * 1024 || &b[..8] != b"metadata" {
        return Err(ImageError::corrupt(file, what, "no `metadata` signature"));
    }
    let count = le16(b, 10) as usize;
    if count > 2047 {
        return Err(ImageError::corrupt(
            file,
            what,
            format!("{count} entries, at most 2047 allowed"),
        ));
    }
    let mut md = Metadata::default();
    let (mut seen_params, mut seen_size, mut seen_lss) = (false, false, false);
    for i in 0..count {
        let o = 32 + i * 32;
        let id = Guid::from_slice(b, o);
        let off = le32(b, o + 16) as usize;
        let len = le32(b, o + 20) as usize;
        let flags = le32(b, o + 24);
        let item_what = format!("VHDX metadata item {id}");
        if len == 0 {
            continue;
        }
        let item = off
            .checked_add(len)
            .and_then(|e| b.get(off..e))
            .ok_or_else(|| {
                ImageError::corrupt(
                    file,
                    &item_what,
                    format!("{len} bytes at offset {off} lie outside the metadata region"),
                )
            })?;
        let need = |n: usize| -> Result<(), ImageError> {
            if item.len() < n {
                Err(ImageError::corrupt(
                    file,
                    &item_what,
                    format!("{} bytes, expected {n}", item.len()),
                ))
            } else {
                Ok(())
            }
        };
        match id {
            FILE_PARAMS => {
                need(8)?;
                md.block_size = le32(item, 0);
                md.has_parent = le32(item, 4) & 2 != 0;
                md.leave_allocated = le32(item, 4) & 1 != 0;
                seen_params = true;
            }
            VIRTUAL_SIZE => {
                need(8)?;
                md.virtual_size = le64(item, 0);
                seen_size = true;
            }
            LOGICAL_SECTOR => {
                need(4)?;
                md.logical_sector = le32(item, 0);
                seen_lss = true;
            }
            PHYSICAL_SECTOR => {
                need(4)?;
                md.physical_sector = le32(item, 0);
            }
            PAGE83 => {}
            PARENT_LOCATOR => {
                need(20)?;
                let kv = le16(item, 18) as usize;
                for k in 0..kv {
                    let e = 20 + k * 12;
                    need(e + 12)?;
                    let (ko, vo) = (le32(item, e) as usize, le32(item, e + 4) as usize);
                    let (kl, vl) = (le16(item, e + 8) as usize, le16(item, e + 10) as usize);
                    let key = ko.checked_add(kl).and_then(|x| item.get(ko..x));
                    let val = vo.checked_add(vl).and_then(|x| item.get(vo..x));
                    match (key, val) {
                        (Some(key), Some(val)) => {
                            md.parent.push((utf16(key, false), utf16(val, false)))
                        }
                        _ => {
                            return Err(ImageError::corrupt(
                                file,
                                "VHDX parent locator",
                                format!("key/value {k} lies outside the item"),
                            ));
                        }
                    }
                }
            }
            _ if flags & 4 != 0 => {
                return Err(ImageError::unsupported(
                    file,
                    format!("required VHDX metadata item {id} is unknown"),
                ));
            }
            _ => {}
        }
    }
    if !(seen_params && seen_size && seen_lss) {
        return Err(ImageError::corrupt(
            file,
            what,
            "file parameters, virtual disk size or logical sector size missing",
        ));
    }
    if !md.block_size.is_power_of_two() || !(MIB as u32..=(256 << 20)).contains(&md.block_size) {
        return Err(ImageError::corrupt(
            file,
            "VHDX file parameters",
            format!(
                "block size {} is not a power of two from 1 MiB to 256 MiB",
                md.block_size
            ),
        ));
    }
    if !matches!(md.logical_sector, 512 | 4096) {
        return Err(ImageError::corrupt(
            file,
            "VHDX logical sector size",
            format!("{} is neither 512 nor 4096", md.logical_sector),
        ));
    }
    if md.virtual_size == 0
        || md.virtual_size > MAX_SIZE
        || md.virtual_size % md.logical_sector as u64 != 0
    {
        return Err(ImageError::corrupt(
            file,
            "VHDX virtual disk size",
            format!(
                "{} is not a multiple of the sector size up to 64 TiB",
                md.virtual_size
            ),
        ));
    }
    Ok(md)
}

/// The BAT geometry shared by reader and writer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub block_size: u64,
    pub chunk_ratio: u64,
    pub data_blocks: u64,
    pub total_entries: u64,
}

impl Geometry {
    pub(crate) fn new(
        virtual_size: u64,
        block_size: u64,
        logical_sector: u64,
        differencing: bool,
    ) -> Self {
        let chunk_ratio = (1u64 << 23) * logical_sector / block_size;
        let data_blocks = virtual_size.div_ceil(block_size);
        let total_entries = if differencing {
            data_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            data_blocks + data_blocks.saturating_sub(1) / chunk_ratio
        };
        Self {
            block_size,
            chunk_ratio,
            data_blocks,
            total_entries,
        }
    }
    pub(crate) fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }
    pub(crate) fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }
}

#[derive(Debug)]
struct VhdxMapper {
    name: String,
    geo: Geometry,
    logical_sector: u64,
    bat: Vec<u64>,
    differencing: bool,
    bitmaps: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
}

impl VhdxMapper {
    async fn bitmap(&self, file: &dyn BlockSource, chunk: u64) -> Result<Arc<Vec<u8>>, BlockError> {
        if let Some(b) = self
            .bitmaps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&chunk)
        {
            return Ok(b.clone());
        }
        let idx = self.geo.bitmap_index(chunk);
        let e = self.bat.get(idx as usize).copied().unwrap_or(0);
        if e & 7 != SB_PRESENT {
            return Err(BlockError::corrupt(
                &self.name,
                format!(
                    "VHDX BAT entry {idx}: a partially present block's sector bitmap is not present (state {})",
                    e & 7
                ),
            ));
        }
        let mut bm = vec![0u8; MIB as usize];
        file.read_at((e >> 20) << 20, &mut bm).await?;
        let bm = Arc::new(bm);
        let mut cache = self.bitmaps.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= 64 {
            cache.clear();
        }
        cache.insert(chunk, bm.clone());
        Ok(bm)
    }
}

#[async_trait]
impl Mapper for VhdxMapper {
    async fn map(
        &self,
        files: &[Arc<dyn BlockSource>],
        offset: u64,
        max: u64,
    ) -> Result<(Piece, u64), BlockError> {
        let bs = self.geo.block_size;
        let block = offset / bs;
        let within = offset % bs;
        let run = (bs - within).min(max);
        let idx = self.geo.payload_index(block);
        let e = *self.bat.get(idx as usize).ok_or_else(|| {
            BlockError::corrupt(
                &self.name,
                format!("offset {offset} lies beyond the VHDX BAT"),
            )
        })?;
        let file_off = (e >> 20) << 20;
        let absent = if self.differencing {
            Piece::Parent
        } else {
            Piece::Zero
        };
        Ok(match e & 7 {
            PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED => (absent, run),
            PAYLOAD_ZERO | PAYLOAD_UNMAPPED | PAYLOAD_UNMAPPED_QEMU => (Piece::Zero, run),
            PAYLOAD_FULLY_PRESENT => (
                Piece::Data {
                    file: 0,
                    offset: file_off + within,
                },
                run,
            ),
            PAYLOAD_PARTIALLY_PRESENT => {
                let chunk = block / self.geo.chunk_ratio;
                let bm = self.bitmap(files[0].as_ref(), chunk).await?;
                let lss = self.logical_sector;
                // Sector index within the chunk the bitmap covers.
                let chunk_start = chunk * self.geo.chunk_ratio * bs;
                let bit = |s: u64| {
                    bm.get((s / 8) as usize)
                        .is_some_and(|b| b >> (s % 8) & 1 == 1)
                };
                let first = (offset - chunk_start) / lss;
                let present = bit(first);
                let mut end = offset - offset % lss + lss;
                while end < offset + run && bit((end - chunk_start) / lss) == present {
                    end += lss;
                }
                let n = (end - offset).min(run);
                (
                    if present {
                        Piece::Data {
                            file: 0,
                            offset: file_off + within,
                        }
                    } else {
                        Piece::Parent
                    },
                    n,
                )
            }
            s => {
                return Err(BlockError::corrupt(
                    &self.name,
                    format!("VHDX BAT entry {idx} has reserved state {s}"),
                ));
            }
        })
    }
}

async fn read_vec(
    src: &dyn BlockSource,
    name: &str,
    what: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, ImageError> {
    if offset.checked_add(len).is_none_or(|e| e > src.size()) {
        return Err(ImageError::corrupt(
            name,
            what,
            format!(
                "{len} bytes at offset {offset} reach past the end of the file ({} bytes)",
                src.size()
            ),
        ));
    }
    let mut v = vec![0u8; len as usize];
    src.read_at(offset, &mut v).await?;
    Ok(v)
}

/// Opens a VHDX whose file is `src`.
pub(crate) async fn open(src: Arc<dyn BlockSource>) -> Result<Level, ImageError> {
    let name = src.name();
    let file_len = src.size();
    let ident = read_vec(src.as_ref(), &name, "VHDX file identifier", 0, 8).await?;
    if ident != b"vhdxfile" {
        return Err(ImageError::corrupt(
            &name,
            "VHDX file identifier",
            "no `vhdxfile` signature",
        ));
    }
    let mut copies = Vec::new();
    for off in HEADER_OFFSETS {
        copies.push(read_vec(src.as_ref(), &name, "VHDX header", off, HEADER_LEN as u64).await);
    }
    let (_, header, _) = pick_header(&name, copies)?;
    if !header.log_guid.is_zero() {
        return Err(ImageError::unsupported(
            &name,
            format!(
                "VHDX log is not empty (log GUID {}, {} bytes at offset {}): the disk was not closed cleanly; \
                 attach it once in Hyper-V (or merge the checkpoint) so the log is replayed, then retry",
                header.log_guid, header.log_length, header.log_offset
            ),
        ));
    }
    let mut copies = Vec::new();
    for off in REGION_OFFSETS {
        copies.push(
            read_vec(
                src.as_ref(),
                &name,
                "VHDX region table",
                off,
                REGION_LEN as u64,
            )
            .await,
        );
    }
    let ((bat_off, bat_len), (md_off, md_len)) = locate_regions(&name, copies)?;
    let md = read_vec(
        src.as_ref(),
        &name,
        "VHDX metadata region",
        md_off,
        md_len as u64,
    )
    .await?;
    let md = parse_metadata(&name, &md)?;
    let differencing = md.has_parent;
    let geo = Geometry::new(
        md.virtual_size,
        md.block_size as u64,
        md.logical_sector as u64,
        differencing,
    );
    let need = geo.total_entries * 8;
    if (bat_len as u64) < need {
        return Err(ImageError::corrupt(
            &name,
            "VHDX BAT region",
            format!("{bat_len} bytes, the disk needs {need}"),
        ));
    }
    let raw = read_vec(src.as_ref(), &name, "VHDX BAT", bat_off, need).await?;
    let bat: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let bs = geo.block_size;
    for block in 0..geo.data_blocks {
        let idx = geo.payload_index(block);
        let e = bat[idx as usize];
        let state = e & 7;
        if matches!(state, PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT) {
            if state == PAYLOAD_PARTIALLY_PRESENT && !differencing {
                return Err(ImageError::corrupt(
                    &name,
                    format!("VHDX BAT entry {idx}"),
                    "partially present block in a disk without a parent",
                ));
            }
            let off = (e >> 20) << 20;
            let used = bs.min(md.virtual_size - block * bs);
            if off < MIB || off + used > file_len {
                return Err(ImageError::corrupt(
                    &name,
                    format!("VHDX BAT entry {idx}"),
                    format!("block at offset {off} lies outside the file ({file_len} bytes)"),
                ));
            }
        }
    }
    if differencing {
        for chunk in 0..geo.data_blocks.div_ceil(geo.chunk_ratio) {
            let idx = geo.bitmap_index(chunk);
            let e = bat[idx as usize];
            if e & 7 == SB_PRESENT {
                let off = (e >> 20) << 20;
                if off < MIB || off + MIB > file_len {
                    return Err(ImageError::corrupt(
                        &name,
                        format!("VHDX BAT entry {idx}"),
                        format!(
                            "sector bitmap at offset {off} lies outside the file ({file_len} bytes)"
                        ),
                    ));
                }
            }
        }
    }
    let parent = if differencing {
        let get = |k: &str| {
            md.parent
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let candidates: Vec<String> = ["relative_path", "volume_path", "absolute_win32_path"]
            .iter()
            .filter_map(|k| get(k))
            .collect();
        let expect = match get("parent_linkage") {
            Some(s) => Identity::VhdxDataWrite(Guid::parse(&s).ok_or_else(|| {
                ImageError::corrupt(
                    &name,
                    "VHDX parent locator",
                    format!("parent_linkage `{s}` is not a GUID"),
                )
            })?),
            None => {
                return Err(ImageError::corrupt(
                    &name,
                    "VHDX parent locator",
                    "differencing disk without parent_linkage",
                ));
            }
        };
        Some(ParentRef { candidates, expect })
    } else {
        None
    };
    Ok(Level {
        format: Format::Vhdx,
        subformat: if differencing {
            "differencing"
        } else if md.leave_allocated {
            // LeaveBlocksAllocated: what fixed VHDX files (Hyper-V's and qemu's) set.
            "fixed"
        } else {
            "dynamic"
        }
        .into(),
        size: md.virtual_size,
        block_size: bs,
        mapper: Box::new(VhdxMapper {
            name: name.clone(),
            geo,
            logical_sector: md.logical_sector as u64,
            bat,
            differencing,
            bitmaps: Mutex::new(HashMap::new()),
        }),
        files: vec![src],
        parent,
        identity: Identity::VhdxDataWrite(header.data_write_guid),
    })
}
