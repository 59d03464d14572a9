//! Physical extents of a file on ext2/3/4, for excluding swap files at backup. `ext4-view` reads
//! files but does not say where their blocks lie, so this module decodes just enough itself:
//! superblock, group descriptor, inode, extent tree and linear directory entries (htree
//! directories are read through their leaf blocks, which hold ordinary entries). Decoding is
//! sans-I/O ([`Superblock::parse`], [`parse_inode`], [`parse_extent_node`], [`parse_dirents`]);
//! [`map_file`] drives it over a [`Slice`].

use crate::error::{FsError, Result};
use crate::reader::Slice;
use std::ops::Range;

const EXTENT_MAGIC: u16 = 0xF30A;
const EXTENTS_FL: u32 = 0x0008_0000;
const INLINE_DATA_FL: u32 = 0x1000_0000;
const INCOMPAT_64BIT: u32 = 0x80;
const MAX_DEPTH: u16 = 5;
/// Most directory blocks scanned per directory (a 256 MiB directory at 4 KiB blocks).
const MAX_DIR_BLOCKS: u64 = 65_536;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// What is needed of the superblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Block size in bytes.
    pub block_size: u64,
    /// Blocks in the file system.
    pub blocks: u64,
    /// Inodes per block group.
    pub inodes_per_group: u32,
    /// Total inodes.
    pub inodes: u32,
    /// Bytes per inode record.
    pub inode_size: u32,
    /// Bytes per group descriptor.
    pub desc_size: u32,
    /// Block of the first group descriptor table.
    pub gdt_block: u64,
}

impl Superblock {
    /// Decodes the 1024-byte superblock (the bytes at offset 1024 of the file system).
    pub fn parse(sb: &[u8]) -> Result<Self> {
        let what = "ext4 superblock";
        if sb.len() < 1024 || le16(sb, 56) != 0xEF53 {
            return Err(FsError::corrupt(what, "no 0xEF53 magic"));
        }
        let log = le32(sb, 24);
        if log > 6 {
            return Err(FsError::corrupt(what, format!("block size 1024 << {log}")));
        }
        let block_size = 1024u64 << log;
        let incompat = le32(sb, 96);
        let blocks_hi = if incompat & INCOMPAT_64BIT != 0 {
            u64::from(le32(sb, 0x150))
        } else {
            0
        };
        let inode_size = if le32(sb, 76) == 0 {
            128
        } else {
            u32::from(le16(sb, 88))
        };
        if inode_size < 128 || u64::from(inode_size) > block_size || !inode_size.is_power_of_two() {
            return Err(FsError::corrupt(what, format!("inode size {inode_size}")));
        }
        let desc_size = if incompat & INCOMPAT_64BIT != 0 {
            u32::from(le16(sb, 254))
        } else {
            32
        };
        if !(32..=1024).contains(&desc_size) {
            return Err(FsError::corrupt(
                what,
                format!("group descriptor size {desc_size}"),
            ));
        }
        let inodes_per_group = le32(sb, 40);
        if inodes_per_group == 0 {
            return Err(FsError::corrupt(what, "0 inodes per group"));
        }
        Ok(Self {
            block_size,
            blocks: u64::from(le32(sb, 4)) | blocks_hi << 32,
            inodes_per_group,
            inodes: le32(sb, 0),
            inode_size,
            desc_size,
            gdt_block: u64::from(le32(sb, 20)) + 1,
        })
    }
}

/// What is needed of an inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    /// Type and permissions.
    pub mode: u16,
    /// Size in bytes.
    pub size: u64,
    /// Flags.
    pub flags: u32,
    /// `i_block`: the extent tree root (60 bytes).
    pub block: [u8; 60],
}

impl Inode {
    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        self.mode & 0xF000 == 0x4000
    }
    /// True for a regular file.
    pub fn is_file(&self) -> bool {
        self.mode & 0xF000 == 0x8000
    }
}

/// Decodes an inode record.
pub fn parse_inode(b: &[u8]) -> Result<Inode> {
    if b.len() < 128 {
        return Err(FsError::corrupt("ext4 inode", "shorter than 128 bytes"));
    }
    let mut block = [0u8; 60];
    block.copy_from_slice(&b[40..100]);
    Ok(Inode {
        mode: le16(b, 0),
        size: u64::from(le32(b, 4)) | u64::from(le32(b, 108)) << 32,
        flags: le32(b, 32),
        block,
    })
}

/// One node of an extent tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtentNode {
    /// Leaf: (first logical block, blocks, first physical block).
    Leaf(Vec<(u32, u32, u64)>),
    /// Index: (first logical block, child node's physical block).
    Index(Vec<(u32, u64)>),
}

/// Decodes an extent tree node (`i_block` or a tree block); `depth` is the header's depth.
pub fn parse_extent_node(b: &[u8]) -> Result<(u16, ExtentNode)> {
    let what = "ext4 extent tree node";
    if b.len() < 12 || le16(b, 0) != EXTENT_MAGIC {
        return Err(FsError::corrupt(what, "no 0xF30A magic"));
    }
    let n = usize::from(le16(b, 2));
    let depth = le16(b, 6);
    if 12 + n * 12 > b.len() {
        return Err(FsError::corrupt(
            what,
            format!("{n} entries do not fit {} bytes", b.len()),
        ));
    }
    if depth > MAX_DEPTH {
        return Err(FsError::corrupt(what, format!("depth {depth}")));
    }
    let entries = (0..n).map(|i| &b[12 + 12 * i..24 + 12 * i]);
    let node = if depth == 0 {
        ExtentNode::Leaf(
            entries
                .map(|e| {
                    let len = u32::from(le16(e, 4));
                    let len = if len > 32_768 { len - 32_768 } else { len };
                    let start = u64::from(le16(e, 6)) << 32 | u64::from(le32(e, 8));
                    (le32(e, 0), len, start)
                })
                .collect(),
        )
    } else {
        ExtentNode::Index(
            entries
                .map(|e| {
                    (
                        le32(e, 0),
                        u64::from(le16(e, 8)) << 32 | u64::from(le32(e, 4)),
                    )
                })
                .collect(),
        )
    };
    Ok((depth, node))
}

/// Decodes the entries of a directory block: (inode, name).
pub fn parse_dirents(b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 8 <= b.len() {
        let ino = le32(b, at);
        let rec = usize::from(le16(b, at + 4));
        let nlen = usize::from(b[at + 6]);
        if rec < 8 || at + rec > b.len() {
            break;
        }
        if ino != 0 && 8 + nlen <= rec {
            out.push((ino, b[at + 8..at + 8 + nlen].to_vec()));
        }
        at += rec;
    }
    out
}

/// A file system opened for mapping.
pub struct Mapper<'a> {
    vol: &'a Slice,
    sb: Superblock,
}

impl<'a> Mapper<'a> {
    /// Reads the superblock of the ext2/3/4 file system in `vol`.
    pub fn new(vol: &'a Slice) -> Result<Self> {
        let mut sb = vec![0u8; 1024];
        vol.read_exact_at(1024, &mut sb)?;
        Ok(Self {
            vol,
            sb: Superblock::parse(&sb)?,
        })
    }

    fn inode(&self, n: u32) -> Result<Inode> {
        if n == 0 || n > self.sb.inodes {
            return Err(FsError::corrupt(
                "ext4",
                format!("inode number {n} out of range"),
            ));
        }
        let g = u64::from((n - 1) / self.sb.inodes_per_group);
        let i = u64::from((n - 1) % self.sb.inodes_per_group);
        let mut d = vec![0u8; self.sb.desc_size as usize];
        self.vol.read_exact_at(
            self.sb.gdt_block * self.sb.block_size + g * u64::from(self.sb.desc_size),
            &mut d,
        )?;
        let hi = if d.len() >= 64 {
            u64::from(le32(&d, 0x28))
        } else {
            0
        };
        let table = u64::from(le32(&d, 8)) | hi << 32;
        let mut b = vec![0u8; self.sb.inode_size as usize];
        self.vol.read_exact_at(
            table * self.sb.block_size + i * u64::from(self.sb.inode_size),
            &mut b,
        )?;
        parse_inode(&b)
    }

    /// The file's extents: (first logical block, blocks, first physical block), sorted.
    fn extents(&self, ino: &Inode, what: &str) -> Result<Vec<(u32, u32, u64)>> {
        if ino.flags & INLINE_DATA_FL != 0 {
            return Ok(Vec::new());
        }
        if ino.flags & EXTENTS_FL == 0 {
            return Err(FsError::Unsupported {
                what: what.into(),
                message: "uses block maps, not extents (ext2/ext3 layout)".into(),
            });
        }
        let mut out = Vec::new();
        let mut todo = vec![(ino.block.to_vec(), MAX_DEPTH + 1)];
        let mut visited = 0u32;
        while let Some((node, parent_depth)) = todo.pop() {
            visited += 1;
            if visited > 1 << 20 {
                return Err(FsError::corrupt(what, "extent tree too large"));
            }
            let (depth, n) = parse_extent_node(&node)?;
            if depth >= parent_depth {
                return Err(FsError::corrupt(
                    what,
                    "extent tree depth does not decrease",
                ));
            }
            match n {
                ExtentNode::Leaf(v) => out.extend(v),
                ExtentNode::Index(v) => {
                    for (_, child) in v.into_iter().rev() {
                        if child >= self.sb.blocks {
                            return Err(FsError::corrupt(
                                what,
                                format!("extent tree block {child} beyond the file system"),
                            ));
                        }
                        let mut b = vec![0u8; self.sb.block_size as usize];
                        self.vol.read_exact_at(child * self.sb.block_size, &mut b)?;
                        todo.push((b, depth));
                    }
                }
            }
        }
        for &(_, len, start) in &out {
            if start
                .checked_add(u64::from(len))
                .is_none_or(|e| e > self.sb.blocks)
            {
                return Err(FsError::corrupt(
                    what,
                    format!("extent at block {start} (+{len}) beyond the file system"),
                ));
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn lookup(&self, dir: u32, name: &[u8], what: &str) -> Result<Option<u32>> {
        let ino = self.inode(dir)?;
        if !ino.is_dir() {
            return Err(FsError::NotFound(format!(
                "{what}: a parent is not a directory"
            )));
        }
        let bs = self.sb.block_size;
        let mut blocks = 0u64;
        for (_, len, start) in self.extents(&ino, what)? {
            for b in 0..u64::from(len) {
                blocks += 1;
                if blocks > MAX_DIR_BLOCKS {
                    return Err(FsError::corrupt(what, "directory too large"));
                }
                let mut buf = vec![0u8; bs as usize];
                self.vol.read_exact_at((start + b) * bs, &mut buf)?;
                if let Some((i, _)) = parse_dirents(&buf).into_iter().find(|(_, n)| n == name) {
                    return Ok(Some(i));
                }
            }
        }
        Ok(None)
    }

    /// The byte ranges (within the volume) holding bytes `from..` of regular file `path`, and
    /// its size; `None` when the path does not exist.
    pub fn map_file(&self, path: &str, from: u64) -> Result<Option<(Vec<Range<u64>>, u64)>> {
        let what = format!("ext4 file {path}");
        let mut ino_n = 2u32;
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            match self.lookup(ino_n, comp.as_bytes(), &what)? {
                Some(n) => ino_n = n,
                None => return Ok(None),
            }
        }
        let ino = self.inode(ino_n)?;
        if !ino.is_file() {
            return Ok(None);
        }
        let bs = self.sb.block_size;
        let end_block = ino.size.div_ceil(bs);
        let mut out: Vec<Range<u64>> = Vec::new();
        for (lblk, len, start) in self.extents(&ino, &what)? {
            let l0 = u64::from(lblk);
            let l1 = (l0 + u64::from(len)).min(end_block);
            let lo = l0.max(from.div_ceil(bs));
            if lo >= l1 {
                continue;
            }
            let r = (start + (lo - l0)) * bs..(start + (l1 - l0)) * bs;
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        Ok(Some((out, ino.size)))
    }
}
