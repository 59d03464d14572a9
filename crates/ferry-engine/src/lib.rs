//! Ferry's backup engine: joins a [`BlockSource`](ferry_core::BlockSource) and its allocated or
//! changed extents to the repository (backup), and a restore point back to a file, image or
//! NBD target (restore), or to NBD clients (export).
//!
//! # Design
//! * **Backup** ([`backup()`]): per disk, every chunk of the repository's fixed grid takes the
//!   cheapest path that is still correct — unchanged per change tracking (reuse the previous
//!   id, no I/O), unallocated (zero sentinel, no I/O), all-zero after reading (zero sentinel,
//!   no hashing), known hash (reuse, no compression), or new (compress, encrypt, upload). Reads,
//!   CPU work and uploads of different chunks overlap; CPU work runs on a bounded pool of
//!   blocking threads; read buffers are pooled; memory is bounded by chunks in flight.
//!   Changed-block backups re-read a random sample of the chunks change tracking calls
//!   unchanged (**trust but verify**); a mismatch makes this and the next backup of the disk
//!   read everything.
//! * **Restore** ([`restore::restore_disk`]): chunks are fetched and authenticated (decrypt,
//!   decompress, re-hash) several at a time and written to a sparse raw file (all-zero runs
//!   stay holes), a block device or NBD export (zero chunks as WRITE_ZEROES), or fed in order
//!   to a `ferry-image` writer. Files are written under a temporary name and renamed when
//!   complete, so a failed restore never leaves something that looks like a disk.
//! * **Export** ([`export`]): a restore point's disk served over NBD, read-only or through a
//!   copy-on-write overlay.
//! * **Copy** ([`copy::copy`]): restore points from one repository into another with its own
//!   keys: only chunks the destination lacks are sent, each read back before the manifest.
//! * **Sources** ([`source`]): a file or block device (raw, VHD, VHDX, VMDK detected by
//!   content) or an NBD URI, with dirty-bitmap extents for changed-block backups.
//!
//! Progress is a set of counters ([`Progress`]) the caller polls; stage timing gives the
//! Veeam-style "where did the time go" split ([`TimeSplit`]).

// Errors are the cold path and keep their causes inline (RepoError, BlockError are large).
#![allow(clippy::result_large_err)]

pub mod backup;
pub mod boot;
pub mod calibrate;
pub mod copy;
mod cpu;
mod error;
pub mod exclude;
pub mod export;
mod progress;
pub mod restore;
pub mod source;
mod tasks;

pub use backup::{
    BackupDisk, BackupMode, BackupOptions, BackupReport, DiskReport, UNTRUSTED_TOKEN,
    VerifyOutcome, backup,
};
pub use error::{EngineError, Result};
pub use progress::{DiskTime, Progress, ProgressSnapshot, RateLimiter, TimeSplit};
pub use restore::{RestoreOptions, RestoreReport, RestoreTo, restore_disk};
