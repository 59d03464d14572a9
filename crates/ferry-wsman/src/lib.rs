//! The WS-Management wire format, sans I/O, shared by the Hyper-V driver (client side) and the
//! Hyper-V simulator (server side), as `ferry-nbd` is for NBD:
//!
//! - [`xml`]: a bounded element tree that keeps every attribute.
//! - [`envelope`]: SOAP 1.2 / WS-Addressing envelopes, replies and faults (MS-WSMV).
//! - [`cim`]: WMI objects on the wire: instances, endpoint references, method inputs, embedded
//!   CIM-XML instances.
//!
//! - [`cbt`]: channel binding (`tls-server-end-point`) for NTLM over HTTPS (ADR 0172).
//! - [`sealed`]: WinRM message encryption framing (`multipart/encrypted`).
//! - [`ntlm`]: NTLM client and acceptor and its sealing session, through `sspi`.
//! - [`kerberos`]: Kerberos client (KDC exchanges sans I/O) and acceptor (keytab), and its
//!   sealing session, through `sspi` (ADR 0159).
//!
//! Decisions: ADR 0110, 0112.

pub mod cbt;
pub mod cim;
pub mod envelope;
pub mod kerberos;
pub mod ntlm;
pub mod sealed;
pub mod xml;
