//! VMware vSphere driver.
//!
//! - [`xml`]: the vim25 SOAP wire format, sans I/O (envelopes, a bounded response parser, faults).
//! - [`client`]: a vim25 client on `ferry_http::HttpClient` (session cookie, pinned TLS):
//!   service content, login, PropertyCollector inventory paging, tasks, snapshots, CBT.
//! - [`model`]: VMs, disks and NICs read from `VirtualMachine` properties.
//! - [`restore`]: whole-VM restore (CreateVM_Task, disks over the NBD write path).
//! - [`replica`]: replica targets (standby VMs, recovery points as snapshots, test copies).
//!
//! Decisions: ADR 0080 (SOAP client), docs/drivers.md (vSphere section).

pub mod client;
pub mod cluster;
pub mod driver;
pub mod error;
mod hotadd;
pub mod model;
pub mod replica;
pub mod restore;
pub mod xml;

pub use client::{Area, ObjectContent, ServiceContent, VimClient};
pub use driver::VmwareDriver;
pub use error::{FaultKind, VimError};
pub use xml::MoRef;
