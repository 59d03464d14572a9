//! Writers for restore: raw (sparse), VHD fixed/dynamic/differencing, VHDX
//! dynamic/differencing, VMDK monolithicSparse/streamOptimized.
//!
//! Data arrives in ascending offset order (gaps read as zeros, or as the parent's data for a
//! differencing child). Blocks are allocated at the end of the file as the first non-zero byte
//! for them arrives; all-zero blocks are never stored. Metadata (BAT, grain tables, footers,
//! headers) is written by [`ImageWriter::finish`], which then renames the temporary file into
//! place: until then nothing at the final path looks like an image. Writers are blocking
//! (`std::fs`); async callers run them on the blocking pool.

use crate::bytes::{
    Guid, crc32c_without, fresh_id, is_zero, put_be16, put_be32, put_be64, put_le16, put_le32,
    put_le64, to_utf16,
};
use crate::error::ImageError;
use crate::{vhd, vhdx, vmdk};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputFormat {
    /// A sparse raw file.
    Raw,
    /// VHD with all data in place and a footer (what Azure takes).
    VhdFixed,
    /// Dynamic VHD (or differencing, with [`WriterOptions::parent`]).
    VhdDynamic,
    /// Dynamic VHDX (or differencing `.avhdx`, with [`WriterOptions::parent`]).
    Vhdx,
    /// VMDK monolithicSparse (or a snapshot delta, with [`WriterOptions::parent`]).
    VmdkSparse,
    /// VMDK streamOptimized (what OVA and HttpNfc take); written strictly sequentially.
    VmdkStream,
}

impl std::fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Raw => "raw",
            Self::VhdFixed => "vhd-fixed",
            Self::VhdDynamic => "vhd-dynamic",
            Self::Vhdx => "vhdx",
            Self::VmdkSparse => "vmdk-sparse",
            Self::VmdkStream => "vmdk-stream",
        })
    }
}

impl std::str::FromStr for OutputFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "raw" => Self::Raw,
            "vhd-fixed" => Self::VhdFixed,
            "vhd" | "vhd-dynamic" => Self::VhdDynamic,
            "vhdx" => Self::Vhdx,
            "vmdk" | "vmdk-sparse" => Self::VmdkSparse,
            "vmdk-stream" => Self::VmdkStream,
            other => {
                return Err(format!(
                    "unknown output format `{other}` (raw, vhd-fixed, vhd, vhdx, vmdk, vmdk-stream)"
                ));
            }
        })
    }
}

/// Optional writer settings.
#[derive(Debug, Clone, Default)]
pub struct WriterOptions {
    /// Block (VHD/VHDX) or grain (VMDK) size in bytes; the format's default if `None`.
    pub block_size: Option<u64>,
    /// Makes a differencing child of this image (VHD dynamic, VHDX, VMDK sparse only). The path
    /// is recorded relative to the child's directory when possible. Ranges never written read
    /// from the parent; writes must then be 512-byte aligned, and for VMDK cover whole grains.
    pub parent: Option<PathBuf>,
}

/// Fixed identity and time for reproducible images (appliance builds): the same input and the
/// same settings give the same bytes. Unset fields are fresh (random ids, the current time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reproducible {
    /// Seed of every identity field: VHD unique id, VHDX file, data-write and page-83 GUIDs, VMDK
    /// CID. Each field is the seed with its own purpose byte mixed in, so they differ from each
    /// other; give each image its own seed (e.g. a name-based UUID of product, version and format).
    pub id_seed: Option<[u8; 16]>,
    /// Time stamps (VHD footer and header) in seconds since 1970, e.g. `SOURCE_DATE_EPOCH`.
    pub unix_time: Option<u64>,
}

impl Reproducible {
    /// The identity field for `purpose`, derived from the seed, or fresh without one.
    fn id(&self, purpose: u8) -> [u8; 16] {
        let Some(seed) = self.id_seed else {
            return fresh_id();
        };
        let mut id = seed;
        for (i, b) in id.iter_mut().enumerate() {
            // A purpose-dependent byte pattern: distinct purposes give distinct ids.
            *b ^= purpose.wrapping_mul(0x9d).rotate_left(i as u32 % 8) ^ purpose;
        }
        // RFC 4122 version 4 / variant bits, as fresh ids have.
        id[7] = (id[7] & 0x0f) | 0x40;
        id[8] = (id[8] & 0x3f) | 0x80;
        id
    }

    /// Seconds since 2000-01-01 UTC, as VHD stores time.
    fn vhd_time(&self) -> u32 {
        let unix = self.unix_time.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
        unix.saturating_sub(946_684_800) as u32
    }
}

// Purpose bytes of the identity fields (see `Reproducible::id`).
const ID_VHD: u8 = 1;
const ID_VHDX_PAGE83: u8 = 2;
const ID_VHDX_DATA_WRITE: u8 = 3;
const ID_VMDK_CID: u8 = 4;
const ID_VHDX_FILE_WRITE: u8 = 5;

/// A sequential image writer. See the module docs.
pub struct ImageWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    name: String,
    size: u64,
    pos: u64,
    inner: Inner,
    fixed: Reproducible,
}

impl std::fmt::Debug for ImageWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageWriter")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("pos", &self.pos)
            .finish()
    }
}

enum Inner {
    Raw,
    VhdFixed,
    Blocks(Blocks),
    Grains(Grains),
}

/// Block-allocating formats written in place: VHD dynamic/differencing and VHDX.
struct Blocks {
    vhdx: bool,
    block: u64,
    /// File offset of each block's data, 0 = not stored.
    offsets: Vec<u64>,
    data_end: u64,
    /// VHD: bytes of sector bitmap before each block's data.
    bitmap_len: u64,
    differencing: Option<ParentInfo>,
    /// Differencing: the block being written and its per-sector presence.
    current: Option<(u64, Vec<bool>)>,
    /// VHDX differencing: per-block state (6 full / 7 partial) and per-chunk sector bitmaps.
    vhdx_state: Vec<u64>,
    vhdx_chunk: Option<(u64, Vec<u8>)>,
    vhdx_bitmaps: Vec<(u64, u64)>,
}

struct Grains {
    stream: bool,
    grain: u64,
    gtes: u64,
    gt: Vec<u32>,
    data_start: u64,
    data_end: u64,
    buf: Vec<u8>,
    buf_grain: Option<u64>,
    /// Bytes written into the buffered grain (deltas must fill whole grains).
    buf_written: u64,
    disk_size: u64,
    differencing: Option<ParentInfo>,
    cid: u32,
}

#[derive(Clone)]
pub(crate) struct ParentInfo {
    /// How the child names the parent (relative when possible).
    pub(crate) name: String,
    pub(crate) absolute: String,
    vhd_id: [u8; 16],
    pub(crate) vhdx_guid: Guid,
    vmdk_cid: u32,
}

fn io(file: &str, op: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let op = op.into();
    let file = file.to_string();
    move |e| ImageError::io(file, op, e)
}

pub(crate) fn read_parent(
    child: &Path,
    parent: &Path,
    format: OutputFormat,
) -> Result<ParentInfo, ImageError> {
    let pname = parent.display().to_string();
    let f = File::open(parent).map_err(io(&pname, "open parent"))?;
    let len = f.metadata().map_err(io(&pname, "stat parent"))?.len();
    let rel = match (child.parent(), parent.parent()) {
        (Some(a), Some(b)) if a.canonicalize().ok() == b.canonicalize().ok() => {
            parent.file_name().map(|n| n.to_string_lossy().into_owned())
        }
        _ => None,
    }
    .unwrap_or_else(|| pname.clone());
    let absolute = parent
        .canonicalize()
        .map_or(pname.clone(), |p| p.display().to_string());
    let mut info = ParentInfo {
        name: rel,
        absolute,
        vhd_id: [0; 16],
        vhdx_guid: Guid::default(),
        vmdk_cid: 0,
    };
    match format {
        OutputFormat::VhdDynamic => {
            let mut b = [0u8; 512];
            f.read_exact_at(&mut b, len.saturating_sub(512))
                .map_err(io(&pname, "read parent footer"))?;
            info.vhd_id = vhd::parse_footer(&pname, &b)?.unique_id;
        }
        OutputFormat::Vhdx => {
            let mut best: Option<vhdx::Header> = None;
            for (i, off) in vhdx::HEADER_OFFSETS.iter().enumerate() {
                let mut b = vec![0u8; vhdx::HEADER_LEN];
                if f.read_exact_at(&mut b, *off).is_ok() {
                    if let Ok(h) = vhdx::parse_header(&pname, i, &b) {
                        if best.as_ref().is_none_or(|x| h.seq > x.seq) {
                            best = Some(h);
                        }
                    }
                }
            }
            info.vhdx_guid = best
                .ok_or_else(|| {
                    ImageError::corrupt(&pname, "VHDX headers", "parent has no valid header")
                })?
                .data_write_guid;
        }
        OutputFormat::VmdkSparse => {
            let mut b = vec![0u8; 512];
            f.read_exact_at(&mut b, 0)
                .map_err(io(&pname, "read parent header"))?;
            let text = if &b[..4] == b"KDMV" {
                let h = vmdk::parse_sparse_header(&pname, &b)?;
                let mut t = vec![0u8; (h.descriptor_size * 512).min(1 << 20) as usize];
                f.read_exact_at(&mut t, h.descriptor_offset * 512)
                    .map_err(io(&pname, "read parent descriptor"))?;
                t
            } else {
                let mut t = vec![0u8; len.min(1 << 20) as usize];
                f.read_exact_at(&mut t, 0)
                    .map_err(io(&pname, "read parent descriptor"))?;
                t
            };
            let end = text.iter().position(|c| *c == 0).unwrap_or(text.len());
            let d = vmdk::parse_descriptor(&pname, &String::from_utf8_lossy(&text[..end]))?;
            info.vmdk_cid = d.cid.ok_or_else(|| {
                ImageError::corrupt(&pname, "VMDK descriptor", "parent has no CID")
            })?;
        }
        _ => {
            return Err(ImageError::unsupported(
                &pname,
                format!("{format} cannot have a parent"),
            ));
        }
    }
    Ok(info)
}

impl ImageWriter {
    /// Starts writing an image of `virtual_size` bytes to `path` with default options.
    pub fn create(
        path: impl AsRef<Path>,
        format: OutputFormat,
        virtual_size: u64,
    ) -> Result<Self, ImageError> {
        Self::create_with(path, format, virtual_size, &WriterOptions::default())
    }

    /// Starts writing an image of `virtual_size` bytes to `path`.
    pub fn create_with(
        path: impl AsRef<Path>,
        format: OutputFormat,
        virtual_size: u64,
        opts: &WriterOptions,
    ) -> Result<Self, ImageError> {
        let path = path.as_ref().to_path_buf();
        let name = path.display().to_string();
        let usage = |m: String| ImageError::Usage {
            file: name.clone(),
            message: m,
        };
        let max = match format {
            OutputFormat::Raw => u64::MAX / 2,
            OutputFormat::VhdFixed | OutputFormat::VhdDynamic => vhd::MAX_SIZE,
            OutputFormat::Vhdx => vhdx::MAX_SIZE,
            OutputFormat::VmdkSparse | OutputFormat::VmdkStream => vmdk::MAX_SIZE,
        };
        if format != OutputFormat::Raw
            && (virtual_size == 0 || virtual_size % 512 != 0 || virtual_size > max)
        {
            return Err(usage(format!(
                "{format} needs a virtual size that is a non-zero multiple of 512 up to {max}, not {virtual_size}"
            )));
        }
        let differencing = match &opts.parent {
            Some(p) => Some(read_parent(&path, p, format)?),
            None => None,
        };
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{file_name}.ferry-part"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(&tmp.display().to_string(), "create"))?;
        let block_opt = |default: u64, min: u64, max: u64| -> Result<u64, ImageError> {
            let b = opts.block_size.unwrap_or(default);
            if !b.is_power_of_two() || b < min || b > max {
                return Err(usage(format!(
                    "block size {b} must be a power of two from {min} to {max}"
                )));
            }
            Ok(b)
        };
        let inner = match format {
            OutputFormat::Raw => {
                file.set_len(virtual_size)
                    .map_err(io(&name, "set length"))?;
                Inner::Raw
            }
            OutputFormat::VhdFixed => {
                file.set_len(virtual_size)
                    .map_err(io(&name, "set length"))?;
                Inner::VhdFixed
            }
            OutputFormat::VhdDynamic => {
                let block = block_opt(2 << 20, 512 * 8, 256 << 20)?;
                let blocks = virtual_size.div_ceil(block);
                let bitmap_len = (block / 512).div_ceil(8).div_ceil(512) * 512;
                let bat_end = 1536 + (blocks * 4).div_ceil(512) * 512;
                // Differencing: two 512-byte parent locator areas (relative, absolute) after the BAT.
                let locators = if differencing.is_some() {
                    2 * locator_space(&differencing)
                } else {
                    0
                };
                Inner::Blocks(Blocks::new(
                    false,
                    block,
                    blocks,
                    bat_end + locators,
                    bitmap_len,
                    differencing,
                ))
            }
            OutputFormat::Vhdx => {
                let block = block_opt(32 << 20, 1 << 20, 256 << 20)?;
                let geo = vhdx::Geometry::new(virtual_size, block, 512, differencing.is_some());
                let bat_len = (geo.total_entries * 8).div_ceil(vhdx::MIB) * vhdx::MIB;
                Inner::Blocks(Blocks::new(
                    true,
                    block,
                    geo.data_blocks,
                    3 * vhdx::MIB + bat_len,
                    0,
                    differencing,
                ))
            }
            OutputFormat::VmdkSparse | OutputFormat::VmdkStream => {
                let stream = format == OutputFormat::VmdkStream;
                if stream && differencing.is_some() {
                    return Err(usage("a streamOptimized VMDK cannot have a parent".into()));
                }
                let grain = block_opt(64 * 1024, 4096, 1 << 20)?;
                let gtes = 512u64;
                let grains = (virtual_size / 512).div_ceil(grain / 512);
                let gd_entries = grains.div_ceil(gtes);
                // Layout (sectors): header, descriptor (1..21), then for monolithicSparse the
                // redundant and primary grain directories with their tables; grains after.
                let meta = if stream {
                    0
                } else {
                    2 * (gd_entries * 4).div_ceil(512) + 2 * gd_entries * (gtes * 4 / 512)
                };
                let overhead = (21 + meta).div_ceil(grain / 512) * (grain / 512);
                Inner::Grains(Grains {
                    stream,
                    grain,
                    gtes,
                    gt: vec![0; (gd_entries * gtes) as usize],
                    data_start: overhead * 512,
                    data_end: overhead * 512,
                    buf: vec![0; grain as usize],
                    buf_grain: None,
                    buf_written: 0,
                    disk_size: virtual_size,
                    differencing,
                    cid: cid_of(Reproducible::default().id(ID_VMDK_CID)),
                })
            }
        };
        let w = Self {
            path,
            tmp,
            file: Some(file),
            name,
            size: virtual_size,
            pos: 0,
            inner,
            fixed: Reproducible::default(),
        };
        if let Inner::Grains(g) = &w.inner {
            if g.stream {
                // The stream's header goes first and is never rewritten: GD at end.
                let head = w.vmdk_header(g, vmdk::GD_AT_END, 0);
                w.file()?
                    .write_all_at(&head, 0)
                    .map_err(io(&w.name, "write VMDK header"))?;
            }
        }
        Ok(w)
    }

    /// Takes identity fields and time stamps from `fixed` instead of fresh ones, so the output is
    /// byte-for-byte reproducible. Call before the first write.
    pub fn reproducible(mut self, fixed: Reproducible) -> Self {
        self.fixed = fixed;
        if let Inner::Grains(g) = &mut self.inner {
            g.cid = cid_of(fixed.id(ID_VMDK_CID));
        }
        self
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn file(&self) -> Result<&File, ImageError> {
        self.file.as_ref().ok_or_else(|| ImageError::Usage {
            file: self.name.clone(),
            message: "writer already finished".into(),
        })
    }

    /// Writes `data` at virtual `offset`, which must not lie before the end of the previous write.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= self.size);
        let Some(end) = end else {
            return Err(ImageError::Usage {
                file: self.name.clone(),
                message: format!(
                    "{} bytes at offset {offset} reach past the end ({} bytes)",
                    data.len(),
                    self.size
                ),
            });
        };
        if offset < self.pos {
            return Err(ImageError::Usage {
                file: self.name.clone(),
                message: format!(
                    "write at offset {offset} goes backwards (previous write ended at {})",
                    self.pos
                ),
            });
        }
        let diff = match &self.inner {
            Inner::Blocks(b) => b.differencing.is_some(),
            Inner::Grains(g) => g.differencing.is_some(),
            _ => false,
        };
        if diff && (offset % 512 != 0 || data.len() % 512 != 0) {
            return Err(ImageError::Usage {
                file: self.name.clone(),
                message: format!(
                    "differencing writes must be 512-byte aligned ({} bytes at {offset})",
                    data.len()
                ),
            });
        }
        self.pos = end;
        let file = self.file.take().ok_or_else(|| ImageError::Usage {
            file: self.name.clone(),
            message: "writer already finished".into(),
        })?;
        let r = match &mut self.inner {
            Inner::Raw | Inner::VhdFixed => {
                if is_zero(data) {
                    Ok(())
                } else {
                    file.write_all_at(data, offset)
                        .map_err(io(&self.name, format!("write at offset {offset}")))
                }
            }
            Inner::Blocks(b) => b.write(&file, &self.name, offset, data),
            Inner::Grains(g) => g.write(&file, &self.name, offset, data),
        };
        self.file = Some(file);
        r
    }

    /// Writes the metadata, syncs, and renames the file into place.
    pub fn finish(mut self) -> Result<PathBuf, ImageError> {
        let r = self.finish_inner();
        if r.is_err() {
            // Nothing half-written may stay behind, not even under the temporary name.
            let _ = std::fs::remove_file(&self.tmp);
        }
        r
    }

    fn finish_inner(&mut self) -> Result<PathBuf, ImageError> {
        let file = self.file.take().ok_or_else(|| ImageError::Usage {
            file: self.name.clone(),
            message: "writer already finished".into(),
        })?;
        let inner = std::mem::replace(&mut self.inner, Inner::Raw);
        match inner {
            Inner::Raw => {}
            Inner::VhdFixed => {
                let footer = vhd_footer(
                    self.size,
                    vhd::DISK_FIXED,
                    u64::MAX,
                    self.fixed.id(ID_VHD),
                    self.fixed.vhd_time(),
                );
                file.write_all_at(&footer, self.size)
                    .map_err(io(&self.name, "write VHD footer"))?;
            }
            Inner::Blocks(mut b) => {
                b.close_current(&file, &self.name)?;
                b.flush_chunk(&file, &self.name)?;
                if b.vhdx {
                    self.finish_vhdx(&file, &b)?;
                } else {
                    self.finish_vhd(&file, &b)?;
                }
            }
            Inner::Grains(mut g) => {
                g.flush(&file, &self.name)?;
                if g.stream {
                    self.finish_stream(&file, &g)?;
                } else {
                    self.finish_sparse(&file, &g)?;
                }
            }
        }
        file.sync_all().map_err(io(&self.name, "sync"))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(io(
            &self.name,
            format!("rename from {}", self.tmp.display()),
        ))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the rename durable; a failure here loses nothing already written.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        tracing::debug!(path = %self.path.display(), size = self.size, "image written");
        Ok(self.path.clone())
    }

    fn finish_vhd(&self, file: &File, b: &Blocks) -> Result<(), ImageError> {
        let blocks = b.offsets.len() as u64;
        let mut bat = vec![0xFFu8; ((blocks * 4).div_ceil(512) * 512) as usize];
        for (i, off) in b.offsets.iter().enumerate() {
            if *off != 0 {
                put_be32(&mut bat, i * 4, ((*off - b.bitmap_len) / 512) as u32);
            }
        }
        file.write_all_at(&bat, 1536)
            .map_err(io(&self.name, "write VHD BAT"))?;
        let mut dh = vec![0u8; vhd::DYN_HEADER_LEN];
        dh[..8].copy_from_slice(b"cxsparse");
        put_be64(&mut dh, 8, u64::MAX);
        put_be64(&mut dh, 16, 1536);
        put_be32(&mut dh, 24, 0x0001_0000);
        put_be32(&mut dh, 28, blocks as u32);
        put_be32(&mut dh, 32, b.block as u32);
        let disk_type = if let Some(p) = &b.differencing {
            dh[40..56].copy_from_slice(&p.vhd_id);
            put_be32(&mut dh, 56, self.fixed.vhd_time());
            let uname = to_utf16(&p.name, true);
            let n = uname.len().min(512);
            dh[64..64 + n].copy_from_slice(&uname[..n]);
            let space = locator_space(&b.differencing);
            let mut at = 1536 + bat.len() as u64;
            for (i, (code, path)) in [
                (b"W2ru", format!(".\\{}", p.name.replace('/', "\\"))),
                (b"W2ku", p.absolute.clone()),
            ]
            .iter()
            .enumerate()
            {
                let data = to_utf16(path, false);
                let o = 576 + i * 24;
                dh[o..o + 4].copy_from_slice(*code);
                put_be32(&mut dh, o + 4, space as u32);
                put_be32(&mut dh, o + 8, data.len().min(space as usize) as u32);
                put_be64(&mut dh, o + 16, at);
                let mut area = vec![0u8; space as usize];
                let n = data.len().min(area.len());
                area[..n].copy_from_slice(&data[..n]);
                file.write_all_at(&area, at)
                    .map_err(io(&self.name, "write VHD parent locator"))?;
                at += space;
            }
            vhd::DISK_DIFFERENCING
        } else {
            vhd::DISK_DYNAMIC
        };
        let sum = vhd::checksum(&dh, 36);
        put_be32(&mut dh, 36, sum);
        file.write_all_at(&dh, 512)
            .map_err(io(&self.name, "write VHD dynamic header"))?;
        let footer = vhd_footer(
            self.size,
            disk_type,
            512,
            self.fixed.id(ID_VHD),
            self.fixed.vhd_time(),
        );
        file.write_all_at(&footer, 0)
            .map_err(io(&self.name, "write VHD footer copy"))?;
        file.write_all_at(&footer, b.data_end)
            .map_err(io(&self.name, "write VHD footer"))?;
        Ok(())
    }

    fn finish_vhdx(&self, file: &File, b: &Blocks) -> Result<(), ImageError> {
        let mib = vhdx::MIB;
        let geo = vhdx::Geometry::new(self.size, b.block, 512, b.differencing.is_some());
        // File identifier.
        let mut ident = vec![0u8; 64 * 1024];
        ident[..8].copy_from_slice(b"vhdxfile");
        let creator = to_utf16("Ferry", false);
        ident[8..8 + creator.len()].copy_from_slice(&creator);
        file.write_all_at(&ident, 0)
            .map_err(io(&self.name, "write VHDX file identifier"))?;
        // BAT.
        let bat_len = (geo.total_entries * 8).div_ceil(mib) * mib;
        let mut bat = vec![0u8; bat_len as usize];
        for (i, off) in b.offsets.iter().enumerate() {
            if *off != 0 {
                let state = if b.differencing.is_some() {
                    b.vhdx_state[i]
                } else {
                    vhdx::PAYLOAD_FULLY_PRESENT
                };
                put_le64(
                    &mut bat,
                    geo.payload_index(i as u64) as usize * 8,
                    *off | state,
                );
            }
        }
        for (chunk, off) in &b.vhdx_bitmaps {
            put_le64(
                &mut bat,
                geo.bitmap_index(*chunk) as usize * 8,
                *off | vhdx::SB_PRESENT,
            );
        }
        file.write_all_at(&bat, 3 * mib)
            .map_err(io(&self.name, "write VHDX BAT"))?;
        // Metadata region.
        let mut md = vec![0u8; mib as usize];
        md[..8].copy_from_slice(b"metadata");
        let mut items: Vec<(Guid, Vec<u8>, u32)> = Vec::new();
        let mut params = vec![0u8; 8];
        put_le32(&mut params, 0, b.block as u32);
        put_le32(&mut params, 4, if b.differencing.is_some() { 2 } else { 0 });
        items.push((vhdx::FILE_PARAMS, params, 4));
        items.push((vhdx::VIRTUAL_SIZE, self.size.to_le_bytes().to_vec(), 6));
        items.push((vhdx::PAGE83, self.fixed.id(ID_VHDX_PAGE83).to_vec(), 6));
        items.push((vhdx::LOGICAL_SECTOR, 512u32.to_le_bytes().to_vec(), 6));
        items.push((vhdx::PHYSICAL_SECTOR, 4096u32.to_le_bytes().to_vec(), 6));
        if let Some(p) = &b.differencing {
            let loc = parent_locator(p.vhdx_guid, &p.name, &p.absolute);
            items.push((vhdx::PARENT_LOCATOR, loc, 4));
        }
        put_le16(&mut md, 10, items.len() as u16);
        let mut at = 64 * 1024;
        for (i, (id, data, flags)) in items.iter().enumerate() {
            let e = 32 + i * 32;
            md[e..e + 16].copy_from_slice(&id.0);
            put_le32(&mut md, e + 16, at as u32);
            put_le32(&mut md, e + 20, data.len() as u32);
            put_le32(&mut md, e + 24, *flags);
            md[at..at + data.len()].copy_from_slice(data);
            at += data.len().div_ceil(8) * 8;
        }
        file.write_all_at(&md, 2 * mib)
            .map_err(io(&self.name, "write VHDX metadata"))?;
        // Region tables (both copies).
        let mut rt = vec![0u8; vhdx::REGION_LEN];
        rt[..4].copy_from_slice(b"regi");
        put_le32(&mut rt, 8, 2);
        for (i, (id, off, len)) in [
            (vhdx::BAT_GUID, 3 * mib, bat_len),
            (vhdx::METADATA_GUID, 2 * mib, mib),
        ]
        .iter()
        .enumerate()
        {
            let e = 16 + i * 32;
            rt[e..e + 16].copy_from_slice(&id.0);
            put_le64(&mut rt, e + 16, *off);
            put_le32(&mut rt, e + 24, *len as u32);
            put_le32(&mut rt, e + 28, 1);
        }
        let crc = crc32c_without(&rt, 4);
        put_le32(&mut rt, 4, crc);
        for off in vhdx::REGION_OFFSETS {
            file.write_all_at(&rt, off)
                .map_err(io(&self.name, "write VHDX region table"))?;
        }
        // Empty log region; make sure the file covers it and the last block.
        file.set_len(b.data_end.max(3 * mib + bat_len))
            .map_err(io(&self.name, "set length"))?;
        // Headers last: until both are written the file is not a valid VHDX.
        let data_guid = self.fixed.id(ID_VHDX_DATA_WRITE);
        let file_guid = self.fixed.id(ID_VHDX_FILE_WRITE);
        for (i, off) in vhdx::HEADER_OFFSETS.iter().enumerate() {
            let mut h = vec![0u8; vhdx::HEADER_LEN];
            h[..4].copy_from_slice(b"head");
            put_le64(&mut h, 8, i as u64 + 1);
            h[16..32].copy_from_slice(&file_guid);
            h[32..48].copy_from_slice(&data_guid);
            put_le16(&mut h, 66, 1);
            put_le32(&mut h, 68, mib as u32);
            put_le64(&mut h, 72, mib);
            let crc = crc32c_without(&h, 4);
            put_le32(&mut h, 4, crc);
            file.write_all_at(&h, *off)
                .map_err(io(&self.name, "write VHDX header"))?;
        }
        Ok(())
    }

    fn vmdk_header(&self, g: &Grains, gd_offset: u64, rgd_offset: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"KDMV");
        put_le32(&mut h, 4, if g.stream { 3 } else { 1 });
        let mut flags = vmdk::FLAG_NL_DETECT;
        if g.stream {
            flags |= vmdk::FLAG_COMPRESSED | vmdk::FLAG_MARKERS;
        } else {
            flags |= 2; // redundant grain directory present
        }
        put_le32(&mut h, 8, flags);
        put_le64(&mut h, 12, self.size / 512);
        put_le64(&mut h, 20, g.grain / 512);
        put_le64(&mut h, 28, 1);
        put_le64(&mut h, 36, 20);
        put_le32(&mut h, 44, g.gtes as u32);
        put_le64(&mut h, 48, rgd_offset);
        put_le64(&mut h, 56, gd_offset);
        put_le64(&mut h, 64, g.data_start / 512);
        h[73..77].copy_from_slice(b"\n \r\n");
        put_le16(&mut h, 77, if g.stream { 1 } else { 0 });
        h
    }

    fn vmdk_descriptor(&self, g: &Grains) -> Vec<u8> {
        let base = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let sectors = self.size / 512;
        let (parent_cid, hint) = match &g.differencing {
            Some(p) => (
                format!("{:08x}", p.vmdk_cid),
                format!("parentFileNameHint=\"{}\"\n", p.name),
            ),
            None => ("ffffffff".to_string(), String::new()),
        };
        let create = if g.stream {
            "streamOptimized"
        } else {
            "monolithicSparse"
        };
        let cyl = (sectors / (16 * 63)).clamp(1, 16383);
        let text = format!(
            "# Disk DescriptorFile\nversion=1\nCID={:08x}\nparentCID={parent_cid}\ncreateType=\"{create}\"\n{hint}\n# Extent description\nRW {sectors} SPARSE \"{base}\"\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cyl}\"\nddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"lsilogic\"\nddb.toolsInstallType = \"4\"\n",
            g.cid
        );
        let mut d = text.into_bytes();
        d.resize(20 * 512, 0);
        d
    }

    fn finish_sparse(&self, file: &File, g: &Grains) -> Result<(), ImageError> {
        let gd_entries = g.gt.len() as u64 / g.gtes;
        let gd_sectors = (gd_entries * 4).div_ceil(512);
        let gt_sectors = g.gtes * 4 / 512;
        let rgd = 21u64;
        let gd = rgd + gd_sectors + gd_entries * gt_sectors;
        for dir in [rgd, gd] {
            let mut gdv = vec![0u8; (gd_sectors * 512) as usize];
            let mut tables = vec![0u8; (gd_entries * gt_sectors * 512) as usize];
            for t in 0..gd_entries {
                put_le32(
                    &mut gdv,
                    t as usize * 4,
                    (dir + gd_sectors + t * gt_sectors) as u32,
                );
            }
            for (i, gte) in g.gt.iter().enumerate() {
                put_le32(&mut tables, i * 4, *gte);
            }
            file.write_all_at(&gdv, dir * 512)
                .map_err(io(&self.name, "write VMDK grain directory"))?;
            file.write_all_at(&tables, (dir + gd_sectors) * 512)
                .map_err(io(&self.name, "write VMDK grain tables"))?;
        }
        file.write_all_at(&self.vmdk_descriptor(g), 512)
            .map_err(io(&self.name, "write VMDK descriptor"))?;
        file.set_len(g.data_end.max(g.data_start))
            .map_err(io(&self.name, "set length"))?;
        file.write_all_at(&self.vmdk_header(g, gd, rgd), 0)
            .map_err(io(&self.name, "write VMDK header"))?;
        Ok(())
    }

    fn finish_stream(&self, file: &File, g: &Grains) -> Result<(), ImageError> {
        let marker = |val: u64, kind: u32| {
            let mut m = vec![0u8; 512];
            put_le64(&mut m, 0, val);
            put_le32(&mut m, 12, kind);
            m
        };
        let mut at = g.data_end;
        let mut out = Vec::new();
        let gd_entries = g.gt.len() as u64 / g.gtes;
        let gt_sectors = g.gtes * 4 / 512;
        let mut gd = vec![0u8; ((gd_entries * 4).div_ceil(512) * 512) as usize];
        for t in 0..gd_entries as usize {
            let table = &g.gt[t * g.gtes as usize..(t + 1) * g.gtes as usize];
            if table.iter().all(|e| *e == 0) {
                continue;
            }
            out.extend_from_slice(&marker(gt_sectors, 1));
            put_le32(&mut gd, t * 4, ((at + out.len() as u64) / 512) as u32);
            for e in table {
                out.extend_from_slice(&e.to_le_bytes());
            }
        }
        out.extend_from_slice(&marker(gd.len() as u64 / 512, 2));
        let gd_sector = (at + out.len() as u64) / 512;
        out.extend_from_slice(&gd);
        out.extend_from_slice(&marker(1, 3));
        out.extend_from_slice(&self.vmdk_header(g, gd_sector, 0));
        out.extend_from_slice(&marker(0, 0));
        file.write_all_at(&out, at)
            .map_err(io(&self.name, "write VMDK stream tail"))?;
        at += out.len() as u64;
        file.set_len(at).map_err(io(&self.name, "set length"))?;
        file.write_all_at(&self.vmdk_descriptor(g), 512)
            .map_err(io(&self.name, "write VMDK descriptor"))?;
        Ok(())
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // Abandoned before finish: leave nothing behind that could be mistaken for an image.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A VHDX parent locator item: `parent_linkage` (the parent's DataWriteGuid), the parent's
/// path relative to the child (`name`) and absolute.
pub(crate) fn parent_locator(linkage: Guid, name: &str, absolute: &str) -> Vec<u8> {
    let pairs = [
        ("parent_linkage", format!("{{{linkage}}}")),
        ("relative_path", format!(".\\{}", name.replace('/', "\\"))),
        ("absolute_win32_path", absolute.to_string()),
    ];
    let mut loc = vec![0u8; 20 + pairs.len() * 12];
    loc[..16].copy_from_slice(&vhdx::LOCATOR_TYPE.0);
    put_le16(&mut loc, 18, pairs.len() as u16);
    for (i, (k, v)) in pairs.iter().enumerate() {
        let (k, v) = (to_utf16(k, false), to_utf16(v, false));
        let e = 20 + i * 12;
        let ko = loc.len();
        loc.extend_from_slice(&k);
        let vo = loc.len();
        loc.extend_from_slice(&v);
        put_le32(&mut loc, e, ko as u32);
        put_le32(&mut loc, e + 4, vo as u32);
        put_le16(&mut loc, e + 8, k.len() as u16);
        put_le16(&mut loc, e + 10, v.len() as u16);
    }
    loc
}

fn locator_space(p: &Option<ParentInfo>) -> u64 {
    p.as_ref().map_or(0, |p| {
        ((p.absolute.len().max(p.name.len()) as u64 + 2) * 2).div_ceil(512) * 512
    })
}

fn cid_of(id: [u8; 16]) -> u32 {
    u32::from_le_bytes([id[0], id[1], id[2], id[3]])
}

/// CHS geometry as the VHD specification computes it.
fn vhd_geometry(size: u64) -> (u16, u8, u8) {
    let mut total = (size / 512).min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        spt = s;
        heads = h;
        cth = c;
    }
    total = cth / heads;
    (total as u16, heads as u8, spt as u8)
}

fn vhd_footer(size: u64, disk_type: u32, data_offset: u64, id: [u8; 16], time: u32) -> Vec<u8> {
    let mut f = vec![0u8; vhd::FOOTER_LEN];
    f[..8].copy_from_slice(b"conectix");
    put_be32(&mut f, 8, 2);
    put_be32(&mut f, 12, 0x0001_0000);
    put_be64(&mut f, 16, data_offset);
    put_be32(&mut f, 24, time);
    f[28..32].copy_from_slice(vhd::CREATOR);
    put_be32(&mut f, 32, 0x0001_0000);
    f[36..40].copy_from_slice(b"Wi2k");
    put_be64(&mut f, 40, size);
    put_be64(&mut f, 48, size);
    let (c, h, s) = vhd_geometry(size);
    put_be16(&mut f, 56, c);
    f[58] = h;
    f[59] = s;
    put_be32(&mut f, 60, disk_type);
    f[68..84].copy_from_slice(&id);
    let sum = vhd::checksum(&f, 64);
    put_be32(&mut f, 64, sum);
    f
}

impl Blocks {
    fn new(
        vhdx: bool,
        block: u64,
        blocks: u64,
        data_start: u64,
        bitmap_len: u64,
        differencing: Option<ParentInfo>,
    ) -> Self {
        Self {
            vhdx,
            block,
            offsets: vec![0; blocks as usize],
            data_end: data_start,
            bitmap_len,
            differencing,
            current: None,
            vhdx_state: vec![0; if vhdx { blocks as usize } else { 0 }],
            vhdx_chunk: None,
            vhdx_bitmaps: Vec::new(),
        }
    }

    fn allocate(&mut self, file: &File, name: &str, block: u64) -> Result<u64, ImageError> {
        let existing = self.offsets[block as usize];
        if existing != 0 {
            return Ok(existing);
        }
        let off = if self.vhdx {
            let start = self.data_end.div_ceil(vhdx::MIB) * vhdx::MIB;
            self.data_end = start + self.block;
            start
        } else {
            let start = self.data_end;
            if self.differencing.is_none() {
                // Dynamic disks: every sector of an allocated block is present.
                file.write_all_at(&vec![0xFF; self.bitmap_len as usize], start)
                    .map_err(io(name, "write VHD sector bitmap"))?;
            }
            self.data_end = start + self.bitmap_len + self.block;
            start + self.bitmap_len
        };
        // Extend the file so the block's unwritten tail reads as zeros.
        file.set_len(self.data_end).map_err(io(name, "extend"))?;
        self.offsets[block as usize] = off;
        Ok(off)
    }

    fn write(
        &mut self,
        file: &File,
        name: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ImageError> {
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            let block = at / self.block;
            let within = at % self.block;
            let n = ((self.block - within) as usize).min(data.len() - pos);
            let piece = &data[pos..pos + n];
            if self.differencing.is_some() {
                if self.current.as_ref().is_some_and(|(b, _)| *b != block) {
                    self.close_current(file, name)?;
                }
                let sectors = (self.block / 512) as usize;
                let cur = self
                    .current
                    .get_or_insert_with(|| (block, vec![false; sectors]));
                for s in within / 512..(within + n as u64) / 512 {
                    cur.1[s as usize] = true;
                }
                let off = self.allocate(file, name, block)?;
                file.write_all_at(piece, off + within)
                    .map_err(io(name, format!("write block {block}")))?;
            } else if !is_zero(piece) {
                let off = self.allocate(file, name, block)?;
                file.write_all_at(piece, off + within)
                    .map_err(io(name, format!("write block {block}")))?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Differencing: records which sectors of the finished block are present.
    fn close_current(&mut self, file: &File, name: &str) -> Result<(), ImageError> {
        let Some((block, present)) = self.current.take() else {
            return Ok(());
        };
        let off = self.offsets[block as usize];
        if !self.vhdx {
            let mut bm = vec![0u8; self.bitmap_len as usize];
            for (s, p) in present.iter().enumerate() {
                if *p {
                    bm[s / 8] |= 0x80 >> (s % 8);
                }
            }
            file.write_all_at(&bm, off - self.bitmap_len)
                .map_err(io(name, "write VHD sector bitmap"))?;
            return Ok(());
        }
        let geo_ratio = (1u64 << 23) * 512 / self.block;
        let chunk = block / geo_ratio;
        if self.vhdx_chunk.as_ref().is_some_and(|(c, _)| *c != chunk) {
            self.flush_chunk(file, name)?;
        }
        if present.iter().all(|p| *p) {
            self.vhdx_state[block as usize] = vhdx::PAYLOAD_FULLY_PRESENT;
        } else {
            self.vhdx_state[block as usize] = vhdx::PAYLOAD_PARTIALLY_PRESENT;
            let (_, bm) = self
                .vhdx_chunk
                .get_or_insert_with(|| (chunk, vec![0u8; vhdx::MIB as usize]));
            let first = (block % geo_ratio) * (self.block / 512);
            for (s, p) in present.iter().enumerate() {
                if *p {
                    let bit = first as usize + s;
                    bm[bit / 8] |= 1 << (bit % 8);
                }
            }
        }
        Ok(())
    }

    fn flush_chunk(&mut self, file: &File, name: &str) -> Result<(), ImageError> {
        if let Some((chunk, bm)) = self.vhdx_chunk.take() {
            let start = self.data_end.div_ceil(vhdx::MIB) * vhdx::MIB;
            file.write_all_at(&bm, start)
                .map_err(io(name, "write VHDX sector bitmap"))?;
            self.data_end = start + vhdx::MIB;
            self.vhdx_bitmaps.push((chunk, start));
        }
        Ok(())
    }
}

impl Grains {
    fn write(
        &mut self,
        file: &File,
        name: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ImageError> {
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            let grain = at / self.grain;
            let within = (at % self.grain) as usize;
            let n = (self.grain as usize - within).min(data.len() - pos);
            if self.buf_grain != Some(grain) {
                self.flush(file, name)?;
                self.buf_grain = Some(grain);
            }
            self.buf[within..within + n].copy_from_slice(&data[pos..pos + n]);
            self.buf_written += n as u64;
            pos += n;
        }
        Ok(())
    }

    fn flush(&mut self, file: &File, name: &str) -> Result<(), ImageError> {
        let Some(grain) = self.buf_grain.take() else {
            return Ok(());
        };
        let written = std::mem::take(&mut self.buf_written);
        if self.differencing.is_some() {
            // VMDK deltas have no sector bitmap: a grain present in the delta hides all of the
            // parent's grain, so a partly written grain would silently zero parent data.
            let whole = self.grain.min(self.disk_size - grain * self.grain);
            if written < whole {
                return Err(ImageError::Usage {
                    file: name.to_string(),
                    message: format!(
                        "VMDK deltas store whole grains: grain {grain} ({} bytes at offset {}) was only {written} bytes written",
                        self.grain,
                        grain * self.grain
                    ),
                });
            }
        } else if is_zero(&self.buf) {
            return Ok(());
        }
        let sector = self.data_end / 512;
        if self.stream {
            let mut enc = flate2::write::ZlibEncoder::new(
                Vec::with_capacity(self.buf.len() / 2),
                flate2::Compression::fast(),
            );
            enc.write_all(&self.buf)
                .map_err(io(name, "compress grain"))?;
            let z = enc.finish().map_err(io(name, "compress grain"))?;
            let mut rec = Vec::with_capacity(12 + z.len() + 512);
            rec.extend_from_slice(&(grain * self.grain / 512).to_le_bytes());
            rec.extend_from_slice(&(z.len() as u32).to_le_bytes());
            rec.extend_from_slice(&z);
            rec.resize(rec.len().div_ceil(512) * 512, 0);
            file.write_all_at(&rec, self.data_end)
                .map_err(io(name, format!("write grain {grain}")))?;
            self.data_end += rec.len() as u64;
        } else {
            file.write_all_at(&self.buf, self.data_end)
                .map_err(io(name, format!("write grain {grain}")))?;
            self.data_end += self.grain;
        }
        self.gt[grain as usize] = sector as u32;
        self.buf.fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_the_spec_examples() {
        // 16 MiB: 32768 sectors -> 17 spt path
        let (c, h, s) = vhd_geometry(16 << 20);
        assert!(c as u64 * h as u64 * s as u64 <= 32768);
        assert_eq!(vhd_geometry(1 << 40).2, 255);
    }
}
