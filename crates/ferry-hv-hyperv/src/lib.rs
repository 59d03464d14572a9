//! Microsoft Hyper-V driver, from a Linux appliance.
//!
//! - [`xml`], [`wsman`], [`cim`]: the WS-Management wire format, sans I/O, from `ferry-wsman`
//!   (shared with the simulator, as `ferry-nbd` is for NBD).
//! - [`client`]: a WS-Man client on `ferry_http::HttpClient`: WMI Enumerate/Pull/Get/Invoke,
//!   `Msvm_ConcreteJob` polling, the WinRS command cycle.
//! - [`wmi`]: the backup's WMI calls, typed (inventory, recovery checkpoints, reference points,
//!   RCT's `GetVirtualDiskChanges`).
//! - [`driver`]: [`HypervDriver`], the `kind = "hyperv"` driver: child-VM or saved-state method
//!   per VM, RCT incrementals, crash journal and cleanup.
//! - [`transport`]: the data-path seam (checkpoint image on the host → block source); `san`
//!   reads the `.avhdx` chain with `ferry-image`.
//!
//! - [`agent`]: the `network` transport per owner node (`[sources.NAME.agent]`).
//! - [`restore`]: whole-VM restore (VHDX through `san-paths`, `DefineSystem`, devices).
//! - [`auth`]: NTLM with message encryption and channel binding over HTTPS (ADR 0172), Basic.
//! - [`kerberos`]: Kerberos logins (tickets from the KDC, the AP-REQ/AP-REP leg), sealing as NTLM.
//! - [`cluster`]: failover clusters: the node that owns a VM now, a client per node (ADR 0153).
//! - [`controllers`]: each disk's controller and location (`ide0:0`, `scsi1:3`; ADR 0166).
//! - [`inventory`]: the failover cluster's name for the inventory.
//! - [`replica`]: Hyper-V as a replica target (standard checkpoints, in-place VHDX writes).
//!
//! Decisions: ADR 0110 (WS-Man on quick-xml), ADR 0112 (NTLM and message encryption), ADR 0159 (Kerberos), docs/drivers.md (Hyper-V section).

pub mod agent;
pub mod auth;
mod binding;
pub mod client;
pub mod cluster;
pub mod config;
pub mod controllers;
pub mod driver;
pub mod error;
pub mod inventory;
pub mod isolated;
pub mod kerberos;
pub mod port;
pub mod replica;
pub mod restore;
pub mod restore_agent;
pub mod shutdown;
pub mod transport;
pub mod wmi;

pub use ferry_wsman::envelope as wsman;
pub use ferry_wsman::{cim, xml};

pub use auth::AuthMethod;
pub use cim::{Epr, Instance, Param, Value};
pub use client::{CommandOutput, Credentials, WsmanClient};
pub use driver::HypervDriver;
pub use error::{FaultKind, HypervError};
pub use kerberos::KerberosOptions;
