//! VMDK (VMware): text descriptors with flat, sparse and VMFS extents, monolithicSparse and
//! streamOptimized files (`KDMV`), ESX vmfsSparse deltas (`COWD`) and snapshot chains through
//! `parentFileNameHint`.
//!
//! A sparse extent maps grains (default 64 KiB) through a grain directory of u32 sector
//! offsets of grain tables (512 u32 entries; 4096 for COWD). GTE 0 = not in this file (parent
//! or zeros), GTE 1 = zero grain when the header says so. streamOptimized grains are zlib
//! streams preceded by a `{lba u64, size u32}` marker, and the grain directory is found
//! through the footer copy of the header at the end of the file. Grain tables are loaded on
//! first use and cached; the cache is bounded.

use crate::Format;
use crate::bytes::{le16, le32, le64};
use crate::error::ImageError;
use crate::layout::{Mapper, Piece};
use crate::open::{Identity, Level, ParentRef, Resolver};
use async_trait::async_trait;
use ferry_core::{BlockError, BlockSource};
use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::sync::{Arc, Mutex};

pub(crate) const SECTOR: u64 = 512;
pub(crate) const GD_AT_END: u64 = u64::MAX;
pub(crate) const FLAG_NL_DETECT: u32 = 1;
pub(crate) const FLAG_ZERO_GRAIN: u32 = 1 << 2;
pub(crate) const FLAG_COMPRESSED: u32 = 1 << 16;
pub(crate) const FLAG_MARKERS: u32 = 1 << 17;
/// Virtual sizes beyond this (128 TiB) are treated as corrupt input.
pub(crate) const MAX_SIZE: u64 = 128 << 40;
const MAX_DESCRIPTOR: u64 = 1 << 20;

/// A decoded `KDMV` (or `COWD`) sparse extent header.
#[derive(Debug, Clone)]
pub(crate) struct SparseHeader {
    pub version: u32,
    pub flags: u32,
    pub capacity: u64,
    pub grain_sectors: u64,
    pub descriptor_offset: u64,
    pub descriptor_size: u64,
    pub gtes_per_gt: u32,
    pub gd_offset: u64,
    pub compress_algorithm: u16,
    pub cowd: bool,
    /// COWD only: number of grain directory entries.
    pub gd_entries: u64,
}

pub(crate) fn parse_sparse_header(file: &str, b: &[u8]) -> Result<SparseHeader, ImageError> {
    let what = "VMDK sparse header";
    if b.len() < 512 {
        return Err(ImageError::corrupt(file, what, "shorter than 512 bytes"));
    }
    let h = match &b[..4] {
        b"KDMV" => SparseHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain_sectors: le64(b, 20),
            descriptor_offset: le64(b, 28),
            descriptor_size: le64(b, 36),
            gtes_per_gt: le32(b, 44),
            gd_offset: le64(b, 56),
            compress_algorithm: le16(b, 77),
            cowd: false,
            gd_entries: 0,
        },
        b"COWD" => SparseHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le32(b, 12) as u64,
            grain_sectors: le32(b, 16) as u64,
            descriptor_offset: 0,
            descriptor_size: 0,
            gtes_per_gt: 4096,
            gd_offset: le32(b, 20) as u64,
            compress_algorithm: 0,
            cowd: true,
            gd_entries: le32(b, 24) as u64,
        },
        _ => return Err(ImageError::corrupt(file, what, "no `KDMV` or `COWD` magic")),
    };
    if !h.cowd && !(1..=3).contains(&h.version) {
        return Err(ImageError::unsupported(
            file,
            format!("VMDK sparse header version {}", h.version),
        ));
    }
    if !h.grain_sectors.is_power_of_two() || h.grain_sectors > 1 << 16 {
        return Err(ImageError::corrupt(
            file,
            what,
            format!(
                "grain size of {} sectors is not a power of two up to 32 MiB",
                h.grain_sectors
            ),
        ));
    }
    if h.gtes_per_gt == 0 || h.gtes_per_gt > 1 << 16 {
        return Err(ImageError::corrupt(
            file,
            what,
            format!("{} entries per grain table is out of range", h.gtes_per_gt),
        ));
    }
    if h.capacity.checked_mul(SECTOR).is_none_or(|b| b > MAX_SIZE) {
        return Err(ImageError::corrupt(
            file,
            what,
            format!("capacity of {} sectors is absurd", h.capacity),
        ));
    }
    if h.flags & FLAG_COMPRESSED != 0 && h.compress_algorithm != 1 {
        return Err(ImageError::unsupported(
            file,
            format!("VMDK compression algorithm {}", h.compress_algorithm),
        ));
    }
    Ok(h)
}

/// One extent line of a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExtentLine {
    pub access: String,
    pub sectors: u64,
    pub kind: String,
    pub file: String,
    pub offset: u64,
}

/// A parsed text descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub create_type: String,
    pub cid: Option<u32>,
    pub parent_cid: Option<u32>,
    pub parent_hint: Option<String>,
    pub extents: Vec<ExtentLine>,
}

fn unquote(s: &str) -> &str {
    s.trim().trim_matches('"')
}

pub(crate) fn parse_descriptor(file: &str, text: &str) -> Result<Descriptor, ImageError> {
    let mut d = Descriptor::default();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let what = || format!("VMDK descriptor line {}", n + 1);
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
            // RW 2048 SPARSE "file name.vmdk" [offset]
            let rest = line[first.len()..].trim_start();
            let mut it = rest.splitn(3, char::is_whitespace);
            let sectors = it.next().unwrap_or("");
            let kind = it.next().unwrap_or("").trim().to_ascii_uppercase();
            let tail = it.next().unwrap_or("").trim();
            let sectors: u64 = sectors.parse().map_err(|_| {
                ImageError::corrupt(
                    file,
                    what(),
                    format!("extent size `{sectors}` is not a number"),
                )
            })?;
            let (name, after) = if kind == "ZERO" {
                (String::new(), tail)
            } else if let Some(q) = tail.strip_prefix('"') {
                let end = q
                    .find('"')
                    .ok_or_else(|| ImageError::corrupt(file, what(), "unterminated file name"))?;
                (q[..end].to_string(), &q[end + 1..])
            } else {
                return Err(ImageError::corrupt(
                    file,
                    what(),
                    "extent without a quoted file name",
                ));
            };
            let offset = match after.trim() {
                "" => 0,
                o => o.parse().map_err(|_| {
                    ImageError::corrupt(
                        file,
                        what(),
                        format!("extent offset `{o}` is not a number"),
                    )
                })?,
            };
            d.extents.push(ExtentLine {
                access: first.into(),
                sectors,
                kind,
                file: name,
                offset,
            });
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let (k, v) = (k.trim(), unquote(v));
        let hex = |v: &str| {
            u32::from_str_radix(v, 16).map_err(|_| {
                ImageError::corrupt(file, what(), format!("`{v}` is not a hexadecimal CID"))
            })
        };
        match k {
            "createType" => d.create_type = v.to_string(),
            "CID" => d.cid = Some(hex(v)?),
            "parentCID" => d.parent_cid = Some(hex(v)?).filter(|c| *c != 0xFFFF_FFFF),
            "parentFileNameHint" => d.parent_hint = Some(v.to_string()),
            _ => {}
        }
    }
    Ok(d)
}

#[derive(Debug)]
struct Sparse {
    file: usize,
    name: String,
    file_len: u64,
    grain: u64,
    gtes: u64,
    gd: Vec<u32>,
    compressed: bool,
    zero_grain: bool,
    tables: Mutex<HashMap<u32, Arc<Vec<u32>>>>,
    grains: Mutex<VecDeque<(u64, Arc<Vec<u8>>)>>,
}

#[derive(Debug)]
enum Kind {
    Flat { file: usize, offset: u64 },
    Zero,
    Sparse(Box<Sparse>),
}

#[derive(Debug)]
struct Extent {
    start: u64,
    len: u64,
    kind: Kind,
}

#[derive(Debug)]
struct VmdkMapper {
    name: String,
    extents: Vec<Extent>,
    has_parent: bool,
}

impl Sparse {
    async fn table(&self, src: &dyn BlockSource, gt: u32) -> Result<Arc<Vec<u32>>, BlockError> {
        if let Some(t) = self
            .tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&gt)
        {
            return Ok(t.clone());
        }
        let sector = self.gd[gt as usize] as u64;
        let len = self.gtes * 4;
        let off = sector * SECTOR;
        if off + len > self.file_len {
            return Err(BlockError::corrupt(
                &self.name,
                format!(
                    "VMDK grain directory entry {gt}: grain table at sector {sector} lies past the end of the file"
                ),
            ));
        }
        let mut raw = vec![0u8; len as usize];
        src.read_at(off, &mut raw).await?;
        let t = Arc::new(
            raw.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<_>>(),
        );
        let mut cache = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= 4096 {
            cache.clear();
        }
        cache.insert(gt, t.clone());
        Ok(t)
    }

    /// Maps `rel` (offset inside this extent) to a piece and run length.
    async fn map(
        &self,
        src: &dyn BlockSource,
        rel: u64,
        max: u64,
        ext_start: u64,
        ext_len: u64,
        absent: Piece,
    ) -> Result<(Piece, u64), BlockError> {
        let g = rel / self.grain;
        let within = rel % self.grain;
        let gt = (g / self.gtes) as usize;
        let Some(&gde) = self.gd.get(gt) else {
            return Ok((absent, max));
        };
        if gde == 0 {
            let end = (gt as u64 + 1) * self.gtes * self.grain;
            return Ok((absent, (end - rel).min(max)));
        }
        let table = self.table(src, gt as u32).await?;
        let mut i = (g % self.gtes) as usize;
        let gte = table[i];
        let run = (self.grain - within).min(max);
        if gte == 0 || (gte == 1 && self.zero_grain) {
            let piece = if gte == 0 { absent } else { Piece::Zero };
            let mut n = run;
            i += 1;
            while n < max && i < table.len() && table[i] == gte {
                n += self.grain;
                i += 1;
            }
            return Ok((piece, n.min(max)));
        }
        let off = gte as u64 * SECTOR;
        if self.compressed {
            return Ok((
                Piece::Compressed {
                    file: self.file,
                    offset: off,
                    grain_start: ext_start + g * self.grain,
                },
                run,
            ));
        }
        let used = self.grain.min(ext_len - g * self.grain);
        if off + used > self.file_len {
            return Err(BlockError::corrupt(
                &self.name,
                format!(
                    "VMDK grain table entry for grain {g} points to sector {gte}, past the end of the file"
                ),
            ));
        }
        Ok((
            Piece::Data {
                file: self.file,
                offset: off + within,
            },
            run,
        ))
    }

    async fn grain(
        &self,
        src: &dyn BlockSource,
        off: u64,
        expect: u64,
    ) -> Result<Arc<Vec<u8>>, BlockError> {
        if let Some((_, g)) = self
            .grains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(o, _)| *o == off)
        {
            return Ok(g.clone());
        }
        let bad = |m: String| {
            BlockError::corrupt(
                &self.name,
                format!("VMDK compressed grain at offset {off}: {m}"),
            )
        };
        if off + 12 > self.file_len {
            return Err(bad("marker lies past the end of the file".into()));
        }
        let mut marker = [0u8; 12];
        src.read_at(off, &mut marker).await?;
        let size = le32(&marker, 8) as u64;
        // Deflate never expands by more than a few bytes per 16 KiB block.
        if size == 0 || size > self.grain * 2 + 4096 || off + 12 + size > self.file_len {
            return Err(bad(format!("compressed size {size} is out of range")));
        }
        let mut z = vec![0u8; size as usize];
        src.read_at(off + 12, &mut z).await?;
        let mut out = Vec::with_capacity(self.grain as usize);
        flate2::read::ZlibDecoder::new(&z[..])
            .take(self.grain + 1)
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("zlib stream is corrupt: {e}")))?;
        if out.len() as u64 > self.grain || (out.len() as u64) < expect {
            return Err(bad(format!(
                "inflates to {} bytes, expected {expect}",
                out.len()
            )));
        }
        out.resize(self.grain as usize, 0);
        let g = Arc::new(out);
        let mut cache = self.grains.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= 16 {
            cache.pop_front();
        }
        cache.push_back((off, g.clone()));
        Ok(g)
    }
}

impl VmdkMapper {
    fn extent_at(&self, offset: u64) -> Result<&Extent, BlockError> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        self.extents.get(i).ok_or_else(|| {
            BlockError::corrupt(
                &self.name,
                format!("offset {offset} lies in no VMDK extent"),
            )
        })
    }
}

#[async_trait]
impl Mapper for VmdkMapper {
    async fn map(
        &self,
        files: &[Arc<dyn BlockSource>],
        offset: u64,
        max: u64,
    ) -> Result<(Piece, u64), BlockError> {
        let e = self.extent_at(offset)?;
        let rel = offset - e.start;
        let max = max.min(e.len - rel);
        let absent = if self.has_parent {
            Piece::Parent
        } else {
            Piece::Zero
        };
        match &e.kind {
            Kind::Zero => Ok((Piece::Zero, max)),
            Kind::Flat { file, offset } => Ok((
                Piece::Data {
                    file: *file,
                    offset: offset + rel,
                },
                max,
            )),
            Kind::Sparse(s) => {
                s.map(files[s.file].as_ref(), rel, max, e.start, e.len, absent)
                    .await
            }
        }
    }

    async fn grain(
        &self,
        files: &[Arc<dyn BlockSource>],
        file: usize,
        offset: u64,
        grain_start: u64,
    ) -> Result<Arc<Vec<u8>>, BlockError> {
        let e = self.extent_at(grain_start)?;
        match &e.kind {
            Kind::Sparse(s) if s.file == file => {
                // The last grain of an extent may be cut short by the extent's end.
                let expect = s.grain.min(e.start + e.len - grain_start);
                s.grain(files[file].as_ref(), offset, expect).await
            }
            _ => Err(BlockError::corrupt(
                &self.name,
                format!("no sparse extent in file #{file} at offset {grain_start}"),
            )),
        }
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

/// Opens the sparse extent in `src` (file index `file`); also returns its header and embedded
/// descriptor text, if any.
async fn open_sparse(
    src: &Arc<dyn BlockSource>,
    file: usize,
) -> Result<(Sparse, SparseHeader, Option<String>), ImageError> {
    let name = src.name();
    let file_len = src.size();
    let head = read_vec(src.as_ref(), &name, "VMDK sparse header", 0, 512).await?;
    let mut h = parse_sparse_header(&name, &head)?;
    if !h.cowd && h.gd_offset == GD_AT_END {
        // streamOptimized: the footer copy of the header (before the end-of-stream marker)
        // holds the real grain directory offset.
        if file_len < 1536 {
            return Err(ImageError::corrupt(
                &name,
                "VMDK footer",
                "file too short for a footer",
            ));
        }
        let foot = read_vec(src.as_ref(), &name, "VMDK footer", file_len - 1024, 512).await?;
        let f = parse_sparse_header(&name, &foot)
            .map_err(|e| ImageError::corrupt(&name, "VMDK footer", e.to_string()))?;
        if f.gd_offset == GD_AT_END {
            return Err(ImageError::corrupt(
                &name,
                "VMDK footer",
                "grain directory offset is still unset (the stream was cut short)",
            ));
        }
        h.gd_offset = f.gd_offset;
    }
    let grain = h.grain_sectors * SECTOR;
    let grains = h.capacity.div_ceil(h.grain_sectors);
    let gd_entries = if h.cowd {
        h.gd_entries
    } else {
        grains.div_ceil(h.gtes_per_gt as u64)
    };
    if h.cowd && gd_entries < grains.div_ceil(h.gtes_per_gt as u64) {
        return Err(ImageError::corrupt(
            &name,
            "VMDK COWD header",
            format!("{gd_entries} directory entries cannot cover {grains} grains"),
        ));
    }
    let gd_raw = read_vec(
        src.as_ref(),
        &name,
        "VMDK grain directory",
        h.gd_offset.saturating_mul(SECTOR),
        gd_entries * 4,
    )
    .await?;
    let gd: Vec<u32> = gd_raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let descriptor = if h.descriptor_size > 0 && h.descriptor_offset > 0 {
        let len = h.descriptor_size.saturating_mul(SECTOR).min(MAX_DESCRIPTOR);
        let raw = read_vec(
            src.as_ref(),
            &name,
            "VMDK embedded descriptor",
            h.descriptor_offset.saturating_mul(SECTOR),
            len,
        )
        .await?;
        let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
        Some(String::from_utf8_lossy(&raw[..end]).into_owned())
    } else {
        None
    };
    let sparse = Sparse {
        file,
        name: name.clone(),
        file_len,
        grain,
        gtes: h.gtes_per_gt as u64,
        gd,
        compressed: h.flags & FLAG_COMPRESSED != 0,
        zero_grain: h.flags & FLAG_ZERO_GRAIN != 0 && !h.cowd,
        tables: Mutex::new(HashMap::new()),
        grains: Mutex::new(VecDeque::new()),
    };
    Ok((sparse, h, descriptor))
}

/// True if `head` (the first bytes of a file) looks like a VMDK text descriptor.
pub(crate) fn looks_like_descriptor(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head);
    text.trim_start().starts_with("# Disk DescriptorFile")
        || (text.contains("createType") && text.contains("version="))
}

fn parent_of(name: &str, d: &Descriptor) -> Result<Option<ParentRef>, ImageError> {
    match (&d.parent_hint, d.parent_cid) {
        (Some(hint), cid) => Ok(Some(ParentRef {
            candidates: vec![hint.clone()],
            expect: cid.map_or(Identity::None, Identity::VmdkCid),
        })),
        (None, Some(cid)) => Err(ImageError::corrupt(
            name,
            "VMDK descriptor",
            format!("parentCID {cid:08x} without parentFileNameHint"),
        )),
        (None, None) => Ok(None),
    }
}

/// Opens a VMDK whose first file is `src` (a sparse extent or a text descriptor).
pub(crate) async fn open(
    src: Arc<dyn BlockSource>,
    resolver: &dyn Resolver,
) -> Result<Level, ImageError> {
    let name = src.name();
    let head = read_vec(src.as_ref(), &name, "VMDK header", 0, src.size().min(4)).await?;
    if head == b"KDMV" || head == b"COWD" {
        let (sparse, h, text) = open_sparse(&src, 0).await?;
        let d = match &text {
            Some(t) => parse_descriptor(&name, t)?,
            None => Descriptor::default(),
        };
        let parent = parent_of(&name, &d)?;
        let size = h.capacity * SECTOR;
        let sub = if d.create_type.is_empty() {
            if h.cowd {
                "vmfsSparse".into()
            } else if sparse.compressed {
                "streamOptimized".into()
            } else {
                "monolithicSparse".into()
            }
        } else {
            d.create_type.clone()
        };
        let grain = sparse.grain;
        return Ok(Level {
            format: Format::Vmdk,
            subformat: sub,
            size,
            block_size: grain,
            mapper: Box::new(VmdkMapper {
                name: name.clone(),
                extents: vec![Extent {
                    start: 0,
                    len: size,
                    kind: Kind::Sparse(Box::new(sparse)),
                }],
                has_parent: parent.is_some(),
            }),
            files: vec![src],
            parent,
            identity: d.cid.map_or(Identity::None, Identity::VmdkCid),
        });
    }
    if src.size() > MAX_DESCRIPTOR {
        return Err(ImageError::corrupt(
            &name,
            "VMDK descriptor",
            "a text descriptor larger than 1 MiB",
        ));
    }
    let raw = read_vec(src.as_ref(), &name, "VMDK descriptor", 0, src.size()).await?;
    let d = parse_descriptor(&name, &String::from_utf8_lossy(&raw))?;
    if d.extents.is_empty() {
        return Err(ImageError::corrupt(&name, "VMDK descriptor", "no extents"));
    }
    let parent = parent_of(&name, &d)?;
    let mut files: Vec<Arc<dyn BlockSource>> = Vec::new();
    let mut extents = Vec::new();
    let mut start = 0u64;
    let mut block = 0;
    for (i, x) in d.extents.iter().enumerate() {
        let what = format!("VMDK descriptor extent {}", i + 1);
        let len = x
            .sectors
            .checked_mul(SECTOR)
            .filter(|l| start.checked_add(*l).is_some_and(|e| e <= MAX_SIZE));
        let Some(len) = len else {
            return Err(ImageError::corrupt(
                &name,
                what,
                "extents add up to an absurd size",
            ));
        };
        let kind = match x.kind.as_str() {
            "ZERO" => Kind::Zero,
            _ if x.access == "NOACCESS" => Kind::Zero,
            "FLAT" | "VMFS" | "VMFSRAW" | "VMFSRDM" => {
                let f = resolver.open(&name, &x.file).await?;
                let off = x.offset.saturating_mul(SECTOR);
                if off.checked_add(len).is_none_or(|e| e > f.size()) {
                    return Err(ImageError::corrupt(
                        &name,
                        what,
                        format!(
                            "flat extent `{}` is {} bytes, shorter than {len} bytes at offset {off}",
                            x.file,
                            f.size()
                        ),
                    ));
                }
                files.push(f);
                Kind::Flat {
                    file: files.len() - 1,
                    offset: off,
                }
            }
            "SPARSE" | "VMFSSPARSE" => {
                let f = resolver.open(&name, &x.file).await?;
                files.push(f.clone());
                let (sparse, h, _) = open_sparse(&f, files.len() - 1).await?;
                if h.capacity < x.sectors {
                    return Err(ImageError::corrupt(
                        &name,
                        what,
                        format!(
                            "sparse extent `{}` holds {} sectors, the descriptor says {}",
                            x.file, h.capacity, x.sectors
                        ),
                    ));
                }
                block = sparse.grain;
                Kind::Sparse(Box::new(sparse))
            }
            other => {
                return Err(ImageError::unsupported(
                    &name,
                    format!("VMDK extent type {other} ({what})"),
                ));
            }
        };
        if len > 0 {
            extents.push(Extent { start, len, kind });
        }
        start += len;
    }
    Ok(Level {
        format: Format::Vmdk,
        subformat: if d.create_type.is_empty() {
            "descriptor".into()
        } else {
            d.create_type.clone()
        },
        size: start,
        block_size: block,
        mapper: Box::new(VmdkMapper {
            name: name.clone(),
            extents,
            has_parent: parent.is_some(),
        }),
        files,
        parent,
        identity: d.cid.map_or(Identity::None, Identity::VmdkCid),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_parses_extents_and_chain() {
        let text = "# Disk DescriptorFile\nversion=1\nCID=1a2b3c4d\nparentCID=deadbeef\ncreateType=\"twoGbMaxExtentSparse\"\nparentFileNameHint=\"base disk.vmdk\"\n\nRW 4192256 SPARSE \"a b-s001.vmdk\"\nRW 100 FLAT \"flat.vmdk\" 7\nRDONLY 8 ZERO\n";
        let d = parse_descriptor("d", text).unwrap();
        assert_eq!(d.cid, Some(0x1a2b3c4d));
        assert_eq!(d.parent_cid, Some(0xdeadbeef));
        assert_eq!(d.parent_hint.as_deref(), Some("base disk.vmdk"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file, "a b-s001.vmdk");
        assert_eq!(d.extents[1].offset, 7);
        assert_eq!(d.extents[2].kind, "ZERO");
        let err = parse_descriptor("d.vmdk", "RW x SPARSE \"f\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("d.vmdk") && err.contains("line 1"), "{err}");
    }
}
