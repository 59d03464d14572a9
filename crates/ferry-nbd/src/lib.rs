//! Ferry's NBD (Network Block Device) client and server, on tokio and rustls.
//!
//! NBD is Ferry's network data path: XenServer serves snapshot VDIs over NBD with TLS, nbdkit's
//! vddk plugin serves VMware disks, QEMU exposes dirty bitmaps, and restore points are served
//! back over NBD for instant recovery. Why an in-house codec rather than the `nbd` crate:
//! `docs/adr/0020-own-async-nbd-codec.md`.
//!
//! # Layout
//! * [`codec`]: sans-I/O encoders and hostile-input decoders (option replies, reply frames with
//!   per-request reassembly, server-side request checks). Fuzzed via [`fuzzing`].
//! * [`client`]: negotiation (fixed newstyle, `STARTTLS`, structured replies,
//!   `SET_META_CONTEXT`, `GO` with fallback to `EXPORT_NAME`), pipelined connections with a
//!   reader task matching replies by cookie, and [`NbdClient`], a multi-conn pool that
//!   reconnects and retries idempotent requests. [`NbdClient`] is a [`ferry_core::BlockSource`]
//!   and a [`ferry_core::BlockTarget`].
//! * [`server`]: [`NbdServer`] exporting any `BlockSource`, read-only or through a
//!   [`CowOverlay`], with `base:allocation`, structured replies, TLS and multi-conn.
//! * [`uri`]: NBD URIs and [`NbdConfig`]; export names are redacted after `?` in every message
//!   (XenServer puts a session id there).
//!
//! # Failure model
//! Every step has a timeout. Every reply is validated against the request it claims to answer:
//! unknown cookies, bad magics, lengths over the limit, chunks outside the request, overlapping
//! or missing data, and truncated frames drop the connection with [`NbdError::Protocol`] or
//! [`NbdError::Disconnected`], naming the server and export. Reads and block-status queries are
//! retried on a fresh connection when the error is transient; writes never are.

pub mod client;
pub mod codec;
pub mod error;
pub mod fuzzing;
pub mod overlay;
pub mod proto;
pub mod server;
mod source;
pub mod tls;
pub mod uri;

pub use client::{ExportInfo, NbdClient, list_exports};
pub use error::NbdError;
pub use overlay::CowOverlay;
pub use server::{
    ExportProvider, ExportRefused, NbdExport, NbdListener, NbdServer, NbdStream, ServerTls,
};
pub use uri::{Address, NbdConfig, TlsOptions, TlsVerify};

/// The standard allocation metadata context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The metadata context of qemu dirty bitmap `name`.
pub fn dirty_bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}
