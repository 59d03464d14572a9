//! Microsoft Hyper-V driver, from a Linux appliance.
//!
//! - [`xml`], [`wsman`], [`cim`]: the WS-Management wire format, sans I/O, from `ferry-wsman`
//!   (shared with the simulator, as `ferry-nbd` is for NBD).
//! - [`client`]: a WS-Man client on `ferry_http::HttpClient`: WMI Enumerate/Pull/Get/Invoke,
//!   `Msvm_ConcreteJob` polling, the WinRS command cycle.
//!
//! - [`auth`]: NTLM with message encryption, Basic.
//!
//! Decisions: ADR 0110 (WS-Man on quick-xml), ADR 0112 (NTLM and message encryption), docs/drivers.md (Hyper-V section).

pub mod auth;
pub mod client;
pub mod error;

pub use ferry_wsman::envelope as wsman;
pub use ferry_wsman::{cim, xml};

pub use auth::AuthMethod;
pub use cim::{Epr, Instance, Param, Value};
pub use client::{CommandOutput, Credentials, WsmanClient};
pub use error::{FaultKind, HypervError};
