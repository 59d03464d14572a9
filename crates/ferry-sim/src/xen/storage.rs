//! Where simulated VDIs keep their bytes.
//!
//! A *live* VDI (one a running guest writes to) is a sparse raw file, and every guest write
//! stamps the 64 KiB CBT blocks it touches with a global generation number. A *snapshot* VDI is
//! a VHD written with `ferry-image`'s writer when the snapshot is taken: a differencing VHD on
//! top of the previous snapshot of the same disk while that one still holds data (the chain a
//! VHD SR builds), otherwise a dynamic VHD. It keeps a copy of the generation stamps, which is
//! all `VDI.list_changed_blocks` needs: a block changed between snapshots A and B exactly when
//! B's stamp is newer than A's snapshot generation.

use ferry_core::{BlockSource, Extent, ExtentMap};
use ferry_image::{FileSource, ImageWriter, OutputFormat, WriterOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// CBT granularity: one bit of `list_changed_blocks` covers this many bytes.
pub const CBT_BLOCK: u64 = 64 * 1024;

/// Storage of one VDI.
#[derive(Debug, Clone)]
pub struct DiskData {
    /// The live VDI this one descends from (itself for a live VDI).
    pub lineage: String,
    /// Raw file (live) or VHD (snapshot); `None` once the data was destroyed.
    pub file: Option<PathBuf>,
    /// True for a live VDI (raw file).
    pub live: bool,
    /// Virtual size in bytes.
    pub size: u64,
    /// Per 64 KiB block, the generation of the last write (a copy, for snapshots).
    pub gens: Vec<u64>,
    /// Generation at which the snapshot was taken (0 for live VDIs).
    pub snap_gen: u64,
    /// CBT epoch: bumped whenever CBT is disabled, re-enabled or reset.
    pub cbt_epoch: u64,
    /// For snapshots: whether CBT was running on the disk when the snapshot was taken.
    pub cbt_valid: bool,
    /// The VDI whose VHD this snapshot's VHD differences against.
    pub parent: Option<String>,
}

impl DiskData {
    /// Number of CBT blocks of a disk of `size` bytes.
    pub fn blocks(size: u64) -> usize {
        size.div_ceil(CBT_BLOCK) as usize
    }

    /// The extents of blocks whose stamp is newer than `gen`.
    pub fn changed_since(&self, generation: u64) -> ExtentMap {
        ExtentMap::from_extents(
            self.gens
                .iter()
                .enumerate()
                .filter(|(_, g)| **g > generation)
                .map(|(i, _)| {
                    let off = i as u64 * CBT_BLOCK;
                    Extent::new(off, CBT_BLOCK.min(self.size - off))
                }),
        )
    }
}

/// Creates the (sparse, all-zero) raw file of a new live VDI.
pub fn create_live(path: &Path, size: u64) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)
}

/// Writes guest data into a live VDI's raw file.
pub fn write_live(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, offset)
}

/// Writes the VHD of a snapshot of the live file `live` (whose stamps are `gens`) to `out`:
/// differencing against `parent` (whose snapshot generation is `parent_gen`), or dynamic.
pub fn write_snapshot_vhd(
    live: &Path,
    size: u64,
    gens: &[u64],
    out: &Path,
    parent: Option<(&Path, u64)>,
) -> Result<(), String> {
    let src = std::fs::File::open(live).map_err(|e| format!("open {}: {e}", live.display()))?;
    let opts = WriterOptions {
        block_size: None,
        parent: parent.map(|(p, _)| p.to_path_buf()),
    };
    // VHD sizes are whole sectors; the simulator only creates such disks.
    let mut w = ImageWriter::create_with(out, OutputFormat::VhdDynamic, size, &opts)
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; CBT_BLOCK as usize];
    for (i, g) in gens.iter().enumerate() {
        let off = i as u64 * CBT_BLOCK;
        let n = CBT_BLOCK.min(size - off) as usize;
        let chunk = &mut buf[..n];
        match parent {
            // Differencing: exactly the blocks written since the parent, zeros included.
            Some((_, pg)) if *g <= pg => continue,
            Some(_) => {}
            None if *g == 0 => continue,
            None => {}
        }
        src.read_exact_at(chunk, off)
            .map_err(|e| format!("read {} at {off}: {e}", live.display()))?;
        if parent.is_none() && chunk.iter().all(|b| *b == 0) {
            continue;
        }
        w.write(off, chunk).map_err(|e| e.to_string())?;
    }
    w.finish().map_err(|e| e.to_string())?;
    Ok(())
}

/// Opens a VDI's data as a block source (raw for live VDIs, the VHD chain for snapshots).
pub async fn open(file: &Path, live: bool) -> Result<Arc<dyn BlockSource>, String> {
    if live {
        Ok(Arc::new(FileSource::open(file).map_err(|e| e.to_string())?))
    } else {
        Ok(ferry_image::open_image(file)
            .await
            .map_err(|e| e.to_string())?
            .source)
    }
}

/// Copies a VDI's content into a sparse raw file (a hot-plugged "block device").
pub async fn materialize(src: &dyn BlockSource, out: &Path) -> Result<(), String> {
    let f = std::fs::File::create(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    f.set_len(src.size()).map_err(|e| e.to_string())?;
    let alloc = src
        .allocated(0..src.size())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    for e in alloc.iter() {
        let mut pos = e.offset;
        while pos < e.end() {
            let n = (e.end() - pos).min(buf.len() as u64) as usize;
            src.read_at(pos, &mut buf[..n])
                .await
                .map_err(|e| e.to_string())?;
            f.write_all_at(&buf[..n], pos).map_err(|e| e.to_string())?;
            pos += n as u64;
        }
    }
    Ok(())
}
