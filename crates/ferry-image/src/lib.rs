//! Disk image formats as Ferry block sources, and writers for restore.
//!
//! # Reading
//! [`open_image`] opens a file of any supported format — raw, VHD (fixed, dynamic,
//! differencing), VHDX (dynamic, fixed, differencing `.avhdx`), VMDK (descriptor with flat /
//! sparse / VMFS extents, monolithicSparse, streamOptimized, vmfsSparse deltas) — detected by
//! content, never by name, and follows differencing chains relative to the file's directory.
//! A name is only used to refuse: a `.vhd`, `.vhdx`, `.avhdx` or `.vmdk` file with no image
//! signature at all is an error, not a raw disk, unless the caller forces the format
//! ([`open_image_with`]).
//! The result is a [`BlockSource`](ferry_core::BlockSource) of the *virtual* disk whose
//! `allocated()` reports what the allocation tables say is present, so zero and unallocated
//! ranges cost nothing downstream. [`open_source`] does the same over any `BlockSource` (an NBD
//! export, a block device, bytes in memory) with a caller-chosen [`Resolver`] for the files an
//! image refers to.
//!
//! Every reader is two halves: a sans-I/O decoder of headers and tables from byte slices
//! (the `vhd`, `vhdx` and `vmdk` modules) and a generic layout engine that turns its address
//! translation into positional reads of the underlying source. Tables are read once at open
//! (BAT, grain directory) or on first use and cached (grain tables, sector bitmaps). Every
//! table size is checked against the file size before anything is allocated, so hostile input
//! cannot make us allocate more than the file it came in.
//!
//! # Writing
//! [`ImageWriter`] writes raw (sparse), VHD fixed/dynamic/differencing, VHDX
//! dynamic/differencing and VMDK monolithicSparse/streamOptimized from data fed in ascending
//! offset order. Output goes to a temporary name and is renamed into place by `finish()`, so
//! a half-written image never looks complete.
//!
//! # Updating in place
//! [`VhdxUpdater`] writes whole payload blocks into an existing VHDX (a replica standby's
//! current disk), crash-ordered (data, fsync, BAT entry, fsync); [`create_vhdx_child`] makes an
//! empty differencing `.avhdx` over a VHDX, as a Hyper-V checkpoint does.
//!
//! # Local files
//! [`FileSource`] and [`FileTarget`] are the raw `BlockSource`/`BlockTarget` for files and
//! block devices (`SEEK_DATA`/`SEEK_HOLE`, hole punching).

mod bytes;
mod error;
mod file;
mod layout;
mod open;
mod vhd;
mod vhdx;
mod vhdx_update;
mod vmdk;
mod writer;

pub mod fuzzing;

pub use error::ImageError;
pub use file::{FileSource, FileTarget};
pub use open::{
    DirResolver, MAX_CHAIN_DEPTH, NoFiles, OpenOptions, OpenedImage, Resolver, detect,
    format_named_by, open_image, open_image_direct, open_image_with, open_source,
};
pub use vhdx_update::{
    VhdxBlockState, VhdxUpdater, create_vhdx_child, merge_vhdx_child, set_vhdx_parent,
    vhdx_parent_locator,
};
pub use writer::{ImageWriter, OutputFormat, Reproducible, WriterOptions};

use serde::Serialize;

/// A disk image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Plain bytes (a file or block device).
    Raw,
    /// Virtual PC / Xen / Azure VHD.
    Vhd,
    /// Hyper-V VHDX.
    Vhdx,
    /// VMware VMDK.
    Vmdk,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Raw => "raw",
            Self::Vhd => "vhd",
            Self::Vhdx => "vhdx",
            Self::Vmdk => "vmdk",
        })
    }
}

/// What an opened image is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    /// The file (or descriptor) opened.
    pub file: String,
    /// Its format.
    pub format: Format,
    /// Subformat: `fixed`, `dynamic`, `differencing`, or the VMDK `createType`.
    pub subformat: String,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
    /// Allocation granularity (block or grain size) in bytes, 0 for flat layouts.
    pub block_size: u64,
    /// The files holding data (VMDK extents; otherwise the file itself).
    pub files: Vec<String>,
    /// The parent, for differencing images.
    pub parent: Option<Box<ImageInfo>>,
}

impl ImageInfo {
    /// The chain from this image down to its base, this image first.
    pub fn chain(&self) -> Vec<&ImageInfo> {
        let mut out = vec![self];
        while let Some(p) = out.last().and_then(|i| i.parent.as_deref()) {
            out.push(p);
        }
        out
    }
}
