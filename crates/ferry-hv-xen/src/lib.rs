//! The Citrix Hypervisor / XCP-ng driver.
//!
//! * Control: XenAPI JSON-RPC over HTTPS ([`client`]), TLS pinned by fingerprint; `Async.*`
//!   calls are polled through their task, which is always destroyed.
//! * Backup ([`XenDriver::begin_backup`]): enable CBT where it is off (and say that this backup
//!   is full), `Async.VM.snapshot`, then per disk the changed blocks since the previous
//!   restore point's CBT anchor (`VDI.list_changed_blocks`, decoded by [`cbt`]) or a logged
//!   full read with the reason, and a transport chosen in the configured order: **SAN** (the
//!   snapshot's VHD chain read off the SR mount with `ferry-image`), **hot-add** (a read-only
//!   VBD plugged into the proxy VM, always unplugged and destroyed) or **network**
//!   (`VDI.get_nbd_info`, NBD over TLS pinned to the certificate in the answer). Every
//!   fallback to a less preferred transport is a warning naming why the better ones were
//!   refused; a transport not listed is never used.
//! * Commit: `VDI.data_destroy` on the snapshot's VDIs (they stay as `cbt_metadata` anchors),
//!   destroy the snapshot VM and the previous anchors. Abort: destroy the snapshot and its VDIs.
//!   Every temporary object is written to the crash journal first, so a killed run is cleaned
//!   up by the next one ([`HypervisorDriver::recover`](ferry_hv::HypervisorDriver::recover)).
//! * Restore ([`restore`]): VM from the captured record, VDIs uploaded by `PUT /import_raw_vdi`,
//!   VBDs and VIFs.

pub mod cbt;
pub mod client;
mod driver;
pub mod instant;
pub mod replica;
mod restore;

pub use driver::{SNAPSHOT_MARKER, VBD_MARKER, XenDriver, XenSession};
