//! In-place updates of an existing dynamic, fixed or differencing VHDX (the current disk of a
//! Hyper-V replica standby, ADR 0174).
//!
//! Only whole payload blocks are written: the caller widens each extent to the block size and
//! supplies the block's full content, so a written block is FULLY_PRESENT and no sector bitmap
//! is needed, on a differencing disk as on a dynamic one. New blocks go to the 1 MiB aligned end
//! of the file. Crash order: block data, fsync, then the BAT entry (an aligned 8-byte write),
//! fsync — a block is either still the old one (or absent, reading through to the parent) or
//! wholly the new one. An overwrite of a present block is in place (a replica writes into a
//! checkpoint's child, so the point it holds stays intact). The log is never used: a file with
//! a non-empty log is refused, and the header written before the first change (new
//! FileWriteGuid and DataWriteGuid, as MS-VHDX asks) leaves the LogGuid zero.

use crate::bytes::{crc32c_without, fresh_id, is_zero, le64, put_le32, put_le64};
use crate::error::ImageError;
use crate::vhdx::{self, Geometry, MIB};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What a payload block of the file holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhdxBlockState {
    /// Not stored: zeros on a disk without parent, the parent's data on a differencing disk.
    Absent,
    /// Defined as zeros (PAYLOAD_BLOCK_ZERO / UNMAPPED).
    Zero,
    /// Stored in the file (fully or partially present).
    Present,
}

/// The parsed layout of a VHDX: everything an update needs, read without I/O from the caller.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub geo: Geometry,
    pub virtual_size: u64,
    pub differencing: bool,
    pub bat_offset: u64,
    pub bat: Vec<u64>,
    /// The metadata region: offset and length.
    pub md: (u64, u32),
    /// The parent locator's key/value pairs (differencing disks).
    pub parent: Vec<(String, String)>,
    /// The valid header with the higher sequence number: (slot, raw 4 KiB).
    pub header: (usize, Vec<u8>),
}

/// Reads the layout of the VHDX through `read(offset, len)` (positional reads of a file of
/// `file_len` bytes). Sans-I/O, so the fuzz target runs it on memory.
pub(crate) fn load_layout(
    name: &str,
    file_len: u64,
    mut read: impl FnMut(u64, usize) -> Result<Vec<u8>, ImageError>,
) -> Result<Layout, ImageError> {
    let mut checked = |what: &str, off: u64, len: u64| -> Result<Vec<u8>, ImageError> {
        if off.checked_add(len).is_none_or(|e| e > file_len) {
            return Err(ImageError::corrupt(
                name,
                what,
                format!(
                    "{len} bytes at offset {off} reach past the end of the file ({file_len} bytes)"
                ),
            ));
        }
        read(off, len as usize)
    };
    if checked("VHDX file identifier", 0, 8)? != b"vhdxfile" {
        return Err(ImageError::corrupt(
            name,
            "VHDX file identifier",
            "no `vhdxfile` signature",
        ));
    }
    let copies = vhdx::HEADER_OFFSETS
        .iter()
        .map(|off| checked("VHDX header", *off, vhdx::HEADER_LEN as u64))
        .collect();
    let (slot, header, raw_header) = vhdx::pick_header(name, copies)?;
    if !header.log_guid.is_zero() {
        return Err(ImageError::unsupported(
            name,
            format!(
                "VHDX log is not empty (log GUID {}): the disk was not closed cleanly; let Hyper-V \
                 replay it (attach the disk once) before Ferry writes into it",
                header.log_guid
            ),
        ));
    }
    let copies = vhdx::REGION_OFFSETS
        .iter()
        .map(|off| checked("VHDX region table", *off, vhdx::REGION_LEN as u64))
        .collect();
    let ((bat_off, bat_len), (md_off, md_len)) = vhdx::locate_regions(name, copies)?;
    let md = vhdx::parse_metadata(
        name,
        &checked("VHDX metadata region", md_off, md_len as u64)?,
    )?;
    let geo = Geometry::new(
        md.virtual_size,
        md.block_size as u64,
        md.logical_sector as u64,
        md.has_parent,
    );
    let need = geo.total_entries * 8;
    if (bat_len as u64) < need || bat_off % 8 != 0 {
        return Err(ImageError::corrupt(
            name,
            "VHDX BAT region",
            format!("{bat_len} bytes at offset {bat_off}, the disk needs {need} (8-byte aligned)"),
        ));
    }
    let raw = checked("VHDX BAT", bat_off, need)?;
    let bat: Vec<u64> = (0..geo.total_entries as usize)
        .map(|i| le64(&raw, i * 8))
        .collect();
    Ok(Layout {
        geo,
        virtual_size: md.virtual_size,
        differencing: md.has_parent,
        bat_offset: bat_off,
        bat,
        md: (md_off, md_len),
        parent: md.parent,
        header: (slot, raw_header),
    })
}

impl Layout {
    /// The state of payload block `block` (in range).
    pub(crate) fn state(&self, block: u64) -> VhdxBlockState {
        match self.bat[self.geo.payload_index(block) as usize] & 7 {
            vhdx::PAYLOAD_FULLY_PRESENT | vhdx::PAYLOAD_PARTIALLY_PRESENT => {
                VhdxBlockState::Present
            }
            vhdx::PAYLOAD_ZERO | vhdx::PAYLOAD_UNMAPPED | vhdx::PAYLOAD_UNMAPPED_QEMU => {
                VhdxBlockState::Zero
            }
            _ => VhdxBlockState::Absent,
        }
    }

    /// The header that supersedes the current one: the other slot, sequence + 1, fresh file
    /// write GUID (and data write GUID when `data` changes), log GUID zero.
    pub(crate) fn next_header(&self, data: bool) -> (u64, Vec<u8>) {
        let (slot, raw) = &self.header;
        let mut h = raw.clone();
        let seq = le64(&h, 8).wrapping_add(1);
        put_le64(&mut h, 8, seq);
        h[16..32].copy_from_slice(&fresh_id());
        if data {
            h[32..48].copy_from_slice(&fresh_id());
        }
        h[48..64].fill(0);
        let crc = crc32c_without(&h[..vhdx::HEADER_LEN], 4);
        put_le32(&mut h, 4, crc);
        (vhdx::HEADER_OFFSETS[1 - slot], h)
    }
}

/// An existing VHDX opened for whole-block writes. Blocking (`std::fs`); async callers run it
/// on the blocking pool.
#[derive(Debug)]
pub struct VhdxUpdater {
    file: File,
    name: String,
    layout: Layout,
    /// The next free 1 MiB aligned offset for new blocks.
    end: u64,
    /// Whether the header has been renewed (done once, before the first change).
    touched: bool,
}

fn io(file: &str, op: &str) -> impl FnOnce(std::io::Error) -> ImageError {
    let (file, op) = (file.to_string(), op.to_string());
    move |e| ImageError::io(file, op, e)
}

impl VhdxUpdater {
    /// Opens the VHDX at `path` for writing. Refuses anything but a valid VHDX with an empty log.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io(&name, "open for update"))?;
        let len = file.metadata().map_err(io(&name, "stat"))?.len();
        let layout = load_layout(&name, len, |off, n| {
            let mut b = vec![0u8; n];
            file.read_exact_at(&mut b, off)
                .map_err(io(&name, "read"))
                .map(|_| b)
        })?;
        let bs = layout.geo.block_size;
        let mut end = len.div_ceil(MIB) * MIB;
        for block in 0..layout.geo.data_blocks {
            let e = layout.bat[layout.geo.payload_index(block) as usize];
            if matches!(
                e & 7,
                vhdx::PAYLOAD_FULLY_PRESENT | vhdx::PAYLOAD_PARTIALLY_PRESENT
            ) {
                let off = (e >> 20) << 20;
                if off < MIB {
                    return Err(ImageError::corrupt(
                        &name,
                        format!("VHDX BAT entry for block {block}"),
                        format!("block at offset {off} overlaps the header area"),
                    ));
                }
                end = end.max(off + bs);
            }
        }
        // Sector bitmaps and the BAT itself must stay below new blocks.
        end = end.max((layout.bat_offset + layout.bat.len() as u64 * 8).div_ceil(MIB) * MIB);
        Ok(Self {
            file,
            name,
            layout,
            end,
            touched: false,
        })
    }

    /// The virtual size.
    pub fn size(&self) -> u64 {
        self.layout.virtual_size
    }

    /// The payload block size: writes are whole blocks of it.
    pub fn block_size(&self) -> u64 {
        self.layout.geo.block_size
    }

    /// Whether the file is a differencing disk (absent blocks read the parent).
    pub fn is_differencing(&self) -> bool {
        self.layout.differencing
    }

    /// The number of payload blocks.
    pub fn blocks(&self) -> u64 {
        self.layout.geo.data_blocks
    }

    /// What block `block` holds now.
    pub fn state(&self, block: u64) -> Result<VhdxBlockState, ImageError> {
        self.check_block(block)?;
        Ok(self.layout.state(block))
    }

    /// The length of block `block` (the last one may be short).
    pub fn block_len(&self, block: u64) -> u64 {
        let bs = self.layout.geo.block_size;
        bs.min(self.layout.virtual_size.saturating_sub(block * bs))
    }

    fn check_block(&self, block: u64) -> Result<(), ImageError> {
        if block >= self.layout.geo.data_blocks {
            return Err(ImageError::Usage {
                file: self.name.clone(),
                message: format!(
                    "block {block} is beyond the disk's {} blocks",
                    self.layout.geo.data_blocks
                ),
            });
        }
        Ok(())
    }

    fn touch(&mut self) -> Result<(), ImageError> {
        if self.touched {
            return Ok(());
        }
        let (off, h) = self.layout.next_header(true);
        self.file
            .write_all_at(&h, off)
            .map_err(io(&self.name, "write VHDX header"))?;
        self.file
            .sync_data()
            .map_err(io(&self.name, "fsync VHDX header"))?;
        self.layout.header = (if off == vhdx::HEADER_OFFSETS[0] { 0 } else { 1 }, h);
        self.touched = true;
        Ok(())
    }

    fn set_entry(&mut self, block: u64, entry: u64) -> Result<(), ImageError> {
        let idx = self.layout.geo.payload_index(block);
        self.file
            .write_all_at(&entry.to_le_bytes(), self.layout.bat_offset + idx * 8)
            .map_err(io(&self.name, "write VHDX BAT entry"))?;
        self.file
            .sync_data()
            .map_err(io(&self.name, "fsync VHDX BAT"))?;
        self.layout.bat[idx as usize] = entry;
        Ok(())
    }

    /// Writes the whole content of block `block` (`data.len()` must be [`Self::block_len`]).
    /// An all-zero block is stored as nothing where the file reads zeros already, as
    /// PAYLOAD_BLOCK_ZERO where it would read the parent, and in place where it is stored.
    /// Returns the payload bytes written into the file.
    pub fn write_block(&mut self, block: u64, data: &[u8]) -> Result<u64, ImageError> {
        self.check_block(block)?;
        let want = self.block_len(block);
        if data.len() as u64 != want {
            return Err(ImageError::Usage {
                file: self.name.clone(),
                message: format!(
                    "block {block} takes {want} bytes, not {} (writes are whole blocks)",
                    data.len()
                ),
            });
        }
        let state = self.layout.state(block);
        let zero = is_zero(data);
        if zero && state != VhdxBlockState::Present {
            if state == VhdxBlockState::Zero || !self.layout.differencing {
                return Ok(0);
            }
            self.touch()?;
            self.set_entry(block, vhdx::PAYLOAD_ZERO)?;
            return Ok(0);
        }
        self.touch()?;
        let entry = self.layout.bat[self.layout.geo.payload_index(block) as usize];
        if state == VhdxBlockState::Present {
            let off = (entry >> 20) << 20;
            self.file
                .write_all_at(data, off)
                .map_err(io(&self.name, "write VHDX block"))?;
            self.file
                .sync_data()
                .map_err(io(&self.name, "fsync VHDX block"))?;
            if entry & 7 != vhdx::PAYLOAD_FULLY_PRESENT {
                // Partially present before: every sector is now this file's.
                self.set_entry(block, off | vhdx::PAYLOAD_FULLY_PRESENT)?;
            }
            return Ok(want);
        }
        let off = self.end;
        let bs = self.layout.geo.block_size;
        self.file
            .write_all_at(data, off)
            .map_err(io(&self.name, "write VHDX block"))?;
        // The whole block lies inside the file even when the last one is short.
        self.file
            .set_len(off + bs)
            .map_err(io(&self.name, "extend"))?;
        self.file
            .sync_data()
            .map_err(io(&self.name, "fsync VHDX block"))?;
        self.end = off + bs;
        self.set_entry(block, off | vhdx::PAYLOAD_FULLY_PRESENT)?;
        Ok(want)
    }

    /// Flushes everything (each write already did; this also syncs the file's metadata).
    pub fn finish(self) -> Result<(), ImageError> {
        self.file.sync_all().map_err(io(&self.name, "fsync"))
    }
}

/// Creates an empty differencing VHDX at `path` whose parent is the VHDX at `parent` (parent
/// locator with relative and absolute paths, `parent_linkage` = the parent's DataWriteGuid), as
/// Hyper-V makes for a checkpoint (`.avhdx`). The block size is `block_size`, else the parent's
/// (Hyper-V makes differencing disks with 2 MiB blocks).
pub fn create_vhdx_child(
    path: &Path,
    parent: &Path,
    block_size: Option<u64>,
) -> Result<(), ImageError> {
    let p = VhdxUpdater::open_read_only(parent)?;
    let opts = crate::WriterOptions {
        block_size: Some(block_size.unwrap_or(p.geo.block_size)),
        parent: Some(parent.to_path_buf()),
    };
    let w =
        crate::ImageWriter::create_with(path, crate::OutputFormat::Vhdx, p.virtual_size, &opts)?;
    w.finish().map(|_| ())
}

impl VhdxUpdater {
    fn open_read_only(path: &Path) -> Result<Layout, ImageError> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(io(&name, "open"))?;
        let len = file.metadata().map_err(io(&name, "stat"))?.len();
        load_layout(&name, len, |off, n| {
            let mut b = vec![0u8; n];
            file.read_exact_at(&mut b, off)
                .map_err(io(&name, "read"))
                .map(|_| b)
        })
    }
}

/// Points the differencing VHDX `child` at the VHDX `parent`: its parent locator (linkage to
/// the parent's DataWriteGuid, relative and absolute paths) is rewritten in place in its
/// metadata region. Its own DataWriteGuid stays, so its children still match it. Used after
/// a merge removed the child's old parent (the simulator's checkpoint deletion, ADR 0174).
pub fn set_vhdx_parent(child: &Path, parent: &Path) -> Result<(), ImageError> {
    let info = crate::writer::read_parent(child, parent, crate::OutputFormat::Vhdx)?;
    let mut u = VhdxUpdater::open(child)?;
    if !u.layout.differencing {
        return Err(ImageError::Usage {
            file: u.name.clone(),
            message: "not a differencing VHDX: it has no parent to change".into(),
        });
    }
    let (md_off, md_len) = u.layout.md;
    let mut old = vec![0u8; md_len as usize];
    u.file
        .read_exact_at(&mut old, md_off)
        .map_err(io(&u.name, "read VHDX metadata"))?;
    let count = crate::bytes::le16(&old, 10) as usize;
    let mut items: Vec<([u8; 16], Vec<u8>, u32)> = Vec::new();
    for i in 0..count.min(2047) {
        let e = 32 + i * 32;
        let id = vhdx_guid_at(&old, e);
        let (off, len) = (
            crate::bytes::le32(&old, e + 16) as usize,
            crate::bytes::le32(&old, e + 20) as usize,
        );
        let flags = crate::bytes::le32(&old, e + 24);
        if id == crate::vhdx::PARENT_LOCATOR.0 || len == 0 {
            continue;
        }
        let data = off
            .checked_add(len)
            .and_then(|end| old.get(off..end))
            .ok_or_else(|| {
                ImageError::corrupt(
                    &u.name,
                    "VHDX metadata table",
                    "an item lies outside the region",
                )
            })?;
        items.push((id, data.to_vec(), flags));
    }
    items.push((
        crate::vhdx::PARENT_LOCATOR.0,
        crate::writer::parent_locator(info.vhdx_guid, &info.name, &info.absolute),
        4,
    ));
    let mut md = vec![0u8; md_len as usize];
    md[..8].copy_from_slice(b"metadata");
    crate::bytes::put_le16(&mut md, 10, items.len() as u16);
    let mut at = 64 * 1024;
    for (i, (id, data, flags)) in items.iter().enumerate() {
        let e = 32 + i * 32;
        if at + data.len() > md.len() {
            return Err(ImageError::unsupported(
                &u.name,
                "the new parent locator does not fit in the metadata region",
            ));
        }
        md[e..e + 16].copy_from_slice(id);
        put_le32(&mut md, e + 16, at as u32);
        put_le32(&mut md, e + 20, data.len() as u32);
        put_le32(&mut md, e + 24, *flags);
        md[at..at + data.len()].copy_from_slice(data);
        at += data.len().div_ceil(8) * 8;
    }
    let (hoff, h) = u.layout.next_header(false);
    u.file
        .write_all_at(&h, hoff)
        .map_err(io(&u.name, "write VHDX header"))?;
    u.file
        .write_all_at(&md, md_off)
        .map_err(io(&u.name, "write VHDX metadata"))?;
    u.touched = true;
    u.finish()
}

fn vhdx_guid_at(b: &[u8], off: usize) -> [u8; 16] {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[off..off + 16]);
    g
}

/// Merges the differencing VHDX `child` into its parent `parent` in place, whole blocks: the
/// blocks `child` holds (data or zero) are written into `parent`, which then reads as `child`
/// did. The caller deletes `child` and re-points its children ([`set_vhdx_parent`]): the
/// parent's DataWriteGuid changes. Returns the payload bytes written.
pub async fn merge_vhdx_child(child: &Path, parent: &Path) -> Result<u64, ImageError> {
    let layout = VhdxUpdater::open_read_only(child)?;
    let name = child.display().to_string();
    if !layout.differencing {
        return Err(ImageError::Usage {
            file: name,
            message: "not a differencing VHDX: nothing to merge".into(),
        });
    }
    let img = crate::open_image(child).await?;
    let mut u = VhdxUpdater::open(parent)?;
    if u.size() != layout.virtual_size {
        return Err(ImageError::unsupported(
            &name,
            format!(
                "virtual size {} differs from the parent's ({})",
                layout.virtual_size,
                u.size()
            ),
        ));
    }
    // Parent block by parent block: where any child block overlapping it holds something,
    // the child's view of the whole parent block is written (block sizes may differ).
    let (pbs, cbs) = (u.block_size(), layout.geo.block_size);
    let mut written = 0;
    let mut buf = Vec::new();
    for b in 0..u.blocks() {
        let n = u.block_len(b);
        let start = b * pbs;
        let held = (start / cbs..=(start + n - 1) / cbs)
            .filter(|c| *c < layout.geo.data_blocks)
            .any(|c| layout.state(c) != VhdxBlockState::Absent);
        if !held {
            continue;
        }
        buf.resize(n as usize, 0);
        img.source
            .read_at(start, &mut buf)
            .await
            .map_err(ImageError::from)?;
        written += u.write_block(b, &buf)?;
    }
    u.finish()?;
    Ok(written)
}

/// The parent a differencing VHDX names, as its locator holds it (`relative_path` first, then
/// `absolute_win32_path`), without opening the parent; empty for a disk without parent.
pub fn vhdx_parent_locator(path: &Path) -> Result<Vec<String>, ImageError> {
    let l = VhdxUpdater::open_read_only(path)?;
    if !l.differencing {
        return Ok(Vec::new());
    }
    Ok(["relative_path", "absolute_win32_path"]
        .iter()
        .filter_map(|k| l.parent.iter().find(|(key, _)| key == k))
        .map(|(_, v)| v.clone())
        .collect())
}

/// The layout's data write GUID (what a child's `parent_linkage` names).
#[cfg(test)]
pub(crate) fn data_write_guid(l: &Layout) -> crate::bytes::Guid {
    crate::bytes::Guid::from_slice(&l.header.1, 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ImageWriter, OutputFormat, WriterOptions};

    fn dynamic(dir: &Path, size: u64, block: u64) -> std::path::PathBuf {
        let p = dir.join("d.vhdx");
        let mut w = ImageWriter::create_with(
            &p,
            OutputFormat::Vhdx,
            size,
            &WriterOptions {
                block_size: Some(block),
                parent: None,
            },
        )
        .expect("create");
        w.write(0, &[7u8; 4096]).expect("write");
        w.finish().expect("finish");
        p
    }

    #[test]
    fn header_is_renewed_once_and_blocks_append() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = dynamic(d.path(), 5 << 20, 1 << 20);
        let before = VhdxUpdater::open_read_only(&p).expect("layout");
        let mut u = VhdxUpdater::open(&p).expect("open");
        assert_eq!(u.blocks(), 5);
        assert_eq!(u.state(0).expect("state"), VhdxBlockState::Present);
        assert_eq!(u.state(3).expect("state"), VhdxBlockState::Absent);
        assert_eq!(u.write_block(3, &vec![1u8; 1 << 20]).expect("w"), 1 << 20);
        assert_eq!(u.write_block(4, &vec![0u8; 1 << 20]).expect("w"), 0);
        assert!(u.write_block(2, &[1u8; 512]).is_err());
        assert!(u.write_block(5, &vec![1u8; 1 << 20]).is_err());
        u.finish().expect("finish");
        let after = VhdxUpdater::open_read_only(&p).expect("layout");
        assert_ne!(data_write_guid(&before), data_write_guid(&after));
        assert_ne!(before.header.0, after.header.0);
        assert_eq!(after.state(3), VhdxBlockState::Present);
        assert_eq!(after.state(4), VhdxBlockState::Absent);
        assert_eq!((after.bat[3] >> 20) << 20 & (MIB - 1), 0);
    }

    #[test]
    fn garbage_is_refused_not_a_panic() {
        for data in [vec![], b"vhdxfile".to_vec(), vec![0u8; 4 << 20]] {
            let len = data.len() as u64;
            let r = load_layout("x", len, |off, n| {
                Ok(data[off as usize..off as usize + n].to_vec())
            });
            assert!(r.is_err());
        }
    }
}
