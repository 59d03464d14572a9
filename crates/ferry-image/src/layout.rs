//! The generic half of every reader: a [`Mapper`] (format-specific, holding the decoded
//! tables) says where each virtual byte lives, and [`MappedImage`] turns that into reads of the
//! underlying files, parent reads and zero fills, coalescing pieces that are contiguous in the
//! file so a 4 MiB read over 64 KiB grains is one read, not 64.

use async_trait::async_trait;
use ferry_core::{BlockError, BlockSource, ExtentMap};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// Where a run of virtual bytes lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Reads as zeros; nothing is stored.
    Zero,
    /// Not in this image: read from the parent (zeros if there is none or it is shorter).
    Parent,
    /// Stored uncompressed in `files[file]` at byte `offset`.
    Data { file: usize, offset: u64 },
    /// Inside a compressed grain stored in `files[file]` at `offset` whose first virtual byte is
    /// `grain_start`.
    Compressed {
        file: usize,
        offset: u64,
        grain_start: u64,
    },
}

/// Format-specific address translation. `map` returns the piece holding `offset` and how many
/// bytes (at least 1, at most `max`) from `offset` it covers.
#[async_trait]
pub(crate) trait Mapper: Send + Sync + fmt::Debug {
    async fn map(
        &self,
        files: &[Arc<dyn BlockSource>],
        offset: u64,
        max: u64,
    ) -> Result<(Piece, u64), BlockError>;

    /// The decompressed bytes of the grain at `offset` in `files[file]` (streamOptimized VMDK).
    async fn grain(
        &self,
        files: &[Arc<dyn BlockSource>],
        file: usize,
        offset: u64,
        grain_start: u64,
    ) -> Result<Arc<Vec<u8>>, BlockError> {
        let _ = (files, offset, grain_start);
        Err(BlockError::Unsupported {
            disk: format!("file #{file}"),
            message: "compressed grains in a format without them".into(),
        })
    }
}

/// A virtual disk assembled from a [`Mapper`], its files and an optional parent.
pub(crate) struct MappedImage {
    pub name: String,
    pub size: u64,
    pub mapper: Box<dyn Mapper>,
    pub files: Vec<Arc<dyn BlockSource>>,
    pub parent: Option<Arc<dyn BlockSource>>,
    pub preferred: u64,
}

impl fmt::Debug for MappedImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedImage")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("mapper", &self.mapper)
            .field("parent", &self.parent.as_ref().map(|p| p.name()))
            .finish()
    }
}

/// Pieces of `range`, with adjacent compatible pieces merged.
struct Runs<'a> {
    img: &'a MappedImage,
    pos: u64,
    end: u64,
    pending: Option<(Piece, u64, u64)>,
}

impl Runs<'_> {
    async fn next(&mut self) -> Result<Option<(Piece, u64, u64)>, BlockError> {
        loop {
            if self.pos >= self.end {
                return Ok(self.pending.take());
            }
            let (piece, n) = self
                .img
                .mapper
                .map(&self.img.files, self.pos, self.end - self.pos)
                .await?;
            let n = n.min(self.end - self.pos);
            if n == 0 {
                return Err(BlockError::corrupt(
                    &self.img.name,
                    format!("address translation stalled at offset {}", self.pos),
                ));
            }
            let start = self.pos;
            self.pos += n;
            match &mut self.pending {
                Some((prev, _, len)) if mergeable(prev, *len, &piece) => *len += n,
                slot => {
                    if let Some(done) = slot.replace((piece, start, n)) {
                        return Ok(Some(done));
                    }
                }
            }
        }
    }
}

fn mergeable(prev: &Piece, prev_len: u64, next: &Piece) -> bool {
    match (prev, next) {
        (Piece::Zero, Piece::Zero) | (Piece::Parent, Piece::Parent) => true,
        (
            Piece::Data {
                file: f1,
                offset: o1,
            },
            Piece::Data {
                file: f2,
                offset: o2,
            },
        ) => f1 == f2 && o1.checked_add(prev_len) == Some(*o2),
        _ => false,
    }
}

impl MappedImage {
    fn runs(&self, range: Range<u64>) -> Runs<'_> {
        Runs {
            img: self,
            pos: range.start,
            end: range.end,
            pending: None,
        }
    }

    fn file(&self, idx: usize) -> Result<&Arc<dyn BlockSource>, BlockError> {
        self.files.get(idx).ok_or_else(|| {
            BlockError::corrupt(&self.name, format!("extent file #{idx} does not exist"))
        })
    }
}

#[async_trait]
impl BlockSource for MappedImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn preferred_read_size(&self) -> u64 {
        self.preferred
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        BlockError::check_range(&self.name, offset, buf.len() as u64, self.size)?;
        let mut runs = self.runs(offset..offset + buf.len() as u64);
        while let Some((piece, start, len)) = runs.next().await? {
            let at = (start - offset) as usize;
            let out = &mut buf[at..at + len as usize];
            match piece {
                Piece::Zero => out.fill(0),
                Piece::Parent => match &self.parent {
                    Some(p) => {
                        let have = p.size().saturating_sub(start).min(len) as usize;
                        if have > 0 {
                            p.read_at(start, &mut out[..have]).await?;
                        }
                        out[have..].fill(0);
                    }
                    None => out.fill(0),
                },
                Piece::Data { file, offset } => self.file(file)?.read_at(offset, out).await?,
                Piece::Compressed {
                    file,
                    offset,
                    grain_start,
                } => {
                    let grain = self
                        .mapper
                        .grain(&self.files, file, offset, grain_start)
                        .await?;
                    let from = (start - grain_start) as usize;
                    let src = grain.get(from..from + out.len()).ok_or_else(|| {
                        BlockError::corrupt(&self.name, format!("compressed grain at file offset {offset} is shorter than the grain size"))
                    })?;
                    out.copy_from_slice(src);
                }
            }
        }
        Ok(())
    }

    async fn allocated(&self, range: Range<u64>) -> Result<ExtentMap, BlockError> {
        let range = range.start.min(self.size)..range.end.min(self.size);
        let mut out = ExtentMap::new();
        let mut runs = self.runs(range);
        while let Some((piece, start, len)) = runs.next().await? {
            match piece {
                Piece::Zero => {}
                Piece::Parent => {
                    if let Some(p) = &self.parent {
                        let end = (start + len).min(p.size());
                        if end > start {
                            for e in p.allocated(start..end).await?.iter() {
                                out.insert(e.range());
                            }
                        }
                    }
                }
                Piece::Data { file, offset } => {
                    // A flat extent or fixed VHD may itself be a sparse file: keep its holes.
                    for e in self
                        .file(file)?
                        .allocated(offset..offset + len)
                        .await?
                        .iter()
                    {
                        let s = start + (e.offset - offset);
                        out.insert(s..s + e.length);
                    }
                }
                Piece::Compressed { .. } => out.insert(start..start + len),
            }
        }
        Ok(out)
    }
}
