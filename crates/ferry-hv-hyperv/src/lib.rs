//! Microsoft Hyper-V driver, from a Linux appliance.
//!
//! - [`xml`]: a bounded element tree for WS-Man messages (attributes kept), sans I/O.
//! - [`wsman`]: WS-Management envelopes and replies (MS-WSMV), faults with WinRM's codes.
//! - [`cim`]: WMI objects on the wire: instances, endpoint references, method inputs,
//!   embedded CIM-XML instances.
//! - [`client`]: a WS-Man client on `ferry_http::HttpClient`: WMI Enumerate/Pull/Get/Invoke,
//!   `Msvm_ConcreteJob` polling, the WinRS command cycle.
//!
//! Decisions: ADR 0110 (WS-Man on quick-xml, Basic first), docs/drivers.md (Hyper-V section).

pub mod cim;
pub mod client;
pub mod error;
pub mod wsman;
pub mod xml;

pub use cim::{Epr, Instance, Param, Value};
pub use client::{CommandOutput, Credentials, WsmanClient};
pub use error::{FaultKind, HypervError};
