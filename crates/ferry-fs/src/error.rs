//! Errors of file-level access: each names the structure or path at fault.

/// What went wrong reading a partition table or a file system.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Reading the underlying disk failed.
    #[error("reading {what}: {source}")]
    Read {
        /// What was being read (`partition 2 of disk0, 4096 bytes at 1048576`).
        what: String,
        /// The cause.
        #[source]
        source: ferry_core::BlockError,
    },
    /// A partition table or file-system structure is malformed.
    #[error("{what}: {message}")]
    Corrupt {
        /// Which structure (`GPT header`, `MBR`, `ext4 on partition 1`).
        what: String,
        /// What is wrong.
        message: String,
    },
    /// No file system this build reads.
    #[error("{what}: {message}")]
    Unsupported {
        /// Where.
        what: String,
        /// What was found instead.
        message: String,
    },
    /// The path or partition does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A usage problem (a file where a directory was expected, …).
    #[error("{0}")]
    Usage(String),
    /// Writing the output failed.
    #[error("writing {what}: {source}")]
    Write {
        /// The output.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl FsError {
    pub(crate) fn corrupt(what: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Corrupt {
            what: what.into(),
            message: message.into(),
        }
    }
}

/// Result of this crate.
pub type Result<T, E = FsError> = std::result::Result<T, E>;
