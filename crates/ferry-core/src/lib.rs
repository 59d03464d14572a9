//! Ferry's shared vocabulary, used by every other crate and dependent on none of them.
//!
//! * [`extent`]: byte ranges of a disk ([`Extent`], [`ExtentMap`]) — allocated data, changed blocks,
//!   the chunk grid.
//! * [`block`]: the [`BlockSource`] / [`BlockTarget`] boundary traits through which disks flow
//!   (files, block devices, NBD exports, image formats, restore points) and their error type.
//! * [`vm`]: the hypervisor-neutral VM model stored in restore points.
//! * [`secret`]: a string that never prints.
//! * [`size`]: human-readable byte counts.
//! * [`aligned`]: block-aligned bounce buffers for callers doing `O_DIRECT` I/O.
//!
//! This crate does no I/O; the one in-memory source ([`block::MemSource`]) exists for tests,
//! fuzzing and small fixtures.

pub mod aligned;
pub mod block;
pub mod extent;
pub mod qemu;
pub mod secret;
pub mod size;
pub mod vm;

pub use block::{BlockError, BlockSource, BlockTarget, MemSource};
pub use extent::{Extent, ExtentMap};
pub use secret::Secret;
