//! Ferry's host agent for Hyper-V: the *network* data path.
//!
//! The agent runs on a Hyper-V host and serves the VHDX/AVHDX chain of a checkpoint read-only
//! over NBD with TLS, so the Linux appliance reads a VM's disks without SMB and without a
//! Windows proxy. The export name is the disk's path as the host knows it
//! (`C:\ClusterStorage\Volume1\vm\disk_1234.avhdx`); the agent opens the chain with
//! `ferry-image` (structured replies and `base:allocation` come from `ferry-nbd`'s server, so
//! the appliance skips unallocated blocks).
//!
//! * [`config`]: typed configuration (listen address, roots, path maps, certificate, pinned
//!   client certificates).
//! * [`paths`]: which host paths may be served: only files under the configured roots, after
//!   `..` and symlinks are resolved; `--map` translates Windows paths for labs and tests.
//! * [`export`]: opens an export by name — path policy, the image chain (parents under the
//!   roots too), and a guard that fails reads once a file changes under an open export.
//! * [`server`]: the listener with mutual TLS (ADR 0125).
//! * [`client`]: what the Hyper-V driver calls on the appliance: [`client::open`].
//! * [`restore`]: restore requests (ADR 0169): new folders and VHDX files under the restore
//!   roots, written over NBD; [`restore_client`] is the appliance's side.
//!
//! The core is portable Rust built and tested on Linux; the Windows-only part (case-insensitive
//! drive paths, the service wrapper) is a thin layer behind `cfg(windows)`.

pub mod client;
pub mod config;
pub mod export;
pub mod paths;
pub mod restore;
pub mod restore_children;
pub mod restore_client;
pub mod server;

pub use config::{AgentConfig, PathMap};
pub use server::{RunningAgent, start, start_with_pins};

/// Default TCP port of the agent (the IANA NBD port; the agent speaks nothing else).
pub const DEFAULT_PORT: u16 = 10809;

/// Why the agent cannot start or the client cannot connect.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is unusable.
    #[error("agent configuration: {0}")]
    Config(String),
    /// TLS material is unusable.
    #[error("agent TLS: {0}")]
    Tls(#[from] ferry_tls::TlsError),
    /// A local file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent refused the appliance's client certificate during the TLS handshake.
    #[error(
        "the agent at {agent} refused this appliance's client certificate {fingerprint}: add it to the agent's client_pins (--client-pin)"
    )]
    ClientRefused {
        /// The agent's address.
        agent: String,
        /// The certificate presented.
        fingerprint: String,
    },
    /// The agent refused a restore request (ADR 0169).
    #[error("the agent at {agent} refused `{request}`: {message}")]
    RestoreRefused {
        /// The agent's address.
        agent: String,
        /// What was asked (`mkdir C:\…`).
        request: String,
        /// The agent's reason.
        message: String,
    },
    /// The NBD connection to an agent failed.
    #[error(transparent)]
    Nbd(Box<ferry_nbd::NbdError>),
}

impl From<ferry_nbd::NbdError> for AgentError {
    fn from(e: ferry_nbd::NbdError) -> Self {
        Self::Nbd(Box::new(e))
    }
}

impl AgentError {
    /// Whether a restore request was refused because its folder or file exists already.
    pub fn already_exists(&self) -> bool {
        matches!(self, Self::RestoreRefused { message, .. } if message.contains("already exists"))
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
