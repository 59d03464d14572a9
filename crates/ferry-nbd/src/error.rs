//! Errors of the NBD client and server. Every client error names the server and the export
//! (with secrets in the export name redacted, see [`crate::uri::redact_export`]).

use crate::proto;
use ferry_core::BlockError;

/// Error from the NBD client or server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// The URI or configuration is invalid.
    #[error("invalid NBD address {uri:?}: {message}")]
    Config {
        /// The offending input (redacted).
        uri: String,
        /// What is wrong.
        message: String,
    },
    /// Connecting or a socket operation failed.
    #[error("NBD server {server}, export `{export}`: {op}: {source}")]
    Io {
        /// Server address.
        server: String,
        /// Export name (redacted).
        export: String,
        /// What was being done.
        op: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A step took longer than its timeout (a stalled server).
    #[error("NBD server {server}, export `{export}`: {op} timed out after {secs:.1} s")]
    Timeout {
        /// Server address.
        server: String,
        /// Export name (redacted).
        export: String,
        /// What was being done.
        op: String,
        /// The timeout in seconds.
        secs: f64,
    },
    /// The server broke the protocol (bad magic, wrong cookie, overlong length, chunk outside
    /// the request, …). The connection is dropped.
    #[error("NBD server {server}, export `{export}`: protocol violation: {message}")]
    Protocol {
        /// Server address.
        server: String,
        /// Export name (redacted).
        export: String,
        /// What was wrong.
        message: String,
    },
    /// The server refused an option during negotiation.
    #[error("NBD server {server}, export `{export}`: {option} refused: {reply} {message}")]
    Refused {
        /// Server address.
        server: String,
        /// Export name (redacted).
        export: String,
        /// Option name.
        option: &'static str,
        /// `NBD_REP_ERR_*` name.
        reply: &'static str,
        /// The server's text, if any.
        message: String,
        /// Raw reply type.
        code: u32,
    },
    /// TLS setup or handshake failed (refused STARTTLS, bad certificate, wrong fingerprint).
    #[error("NBD server {server}, export `{export}`: TLS: {message}")]
    Tls {
        /// Server address.
        server: String,
        /// Export name (redacted).
        export: String,
        /// What failed.
        message: String,
    },
    /// The server answered a request with an error.
    #[error(
        "NBD server {server}, export `{export}`: {cmd} of {len} bytes at offset {offset} failed: \
         {errno_name} ({errno}){}", if message.is_empty() { String::new() } else { format!(": {message}") }
    )]
    Command {
        /// Server address.
        server: String,
        /// Export name (redacted).
        export: String,
        /// Command name.
        cmd: &'static str,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Errno from the server.
        errno: u32,
        /// Errno name.
        errno_name: &'static str,
        /// Server message.
        message: String,
    },
    /// The export cannot do what was asked (read-only, no block status, …).
    #[error("NBD server {server}, export `{export}`: {message}")]
    Unsupported {
        /// Server address.
        server: String,
        /// Export name (redacted).
        export: String,
        /// What is not supported.
        message: String,
    },
    /// The connection was lost earlier; requests on it fail with the original cause.
    #[error("NBD server {server}, export `{export}`: connection lost: {message}")]
    Disconnected {
        /// Server address.
        server: String,
        /// Export name (redacted).
        export: String,
        /// The cause.
        message: String,
        /// Whether the cause was transient (I/O, timeout) rather than a protocol violation.
        transient: bool,
    },
}

impl NbdError {
    /// Whether a retry (on a new connection) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Io { .. } | Self::Timeout { .. } => true,
            Self::Disconnected { transient, .. } => *transient,
            Self::Command { errno, .. } => *errno == proto::errno::EIO,
            Self::Refused { code, .. } => *code == proto::rep::ERR_SHUTDOWN,
            _ => false,
        }
    }

    /// Converts into the block-layer error for disk `disk`.
    pub fn into_block_error(self, disk: &str) -> BlockError {
        match self {
            Self::Protocol { .. } => BlockError::Corrupt {
                disk: disk.to_string(),
                message: self.to_string(),
            },
            Self::Unsupported { .. } => BlockError::Unsupported {
                disk: disk.to_string(),
                message: self.to_string(),
            },
            other => BlockError::Other {
                disk: disk.to_string(),
                message: other.to_string(),
                retryable: other.is_retryable(),
                source: Some(Box::new(other)),
            },
        }
    }
}
