//! The engine's error type: every message names the disk (and offset or object) at fault.

use ferry_core::BlockError;
use ferry_repo::RepoError;

/// Result alias for this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// What went wrong in a backup, restore or export.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// Reading the source disk failed.
    #[error("backup of disk `{disk}`: reading the source failed")]
    Source {
        /// The disk being backed up.
        disk: String,
        /// The cause (names the source, offset and length).
        #[source]
        source: BlockError,
    },
    /// Writing the restore target failed.
    #[error("restore of disk `{disk}` to {target}: writing failed")]
    Target {
        /// The disk being restored.
        disk: String,
        /// The target (path or NBD URI).
        target: String,
        /// The cause.
        #[source]
        source: BlockError,
    },
    /// The repository failed (names the object key).
    #[error("disk `{disk}`: repository operation failed")]
    Repo {
        /// The disk being worked on, or `-` for repository-wide steps.
        disk: String,
        /// The cause.
        #[source]
        source: RepoError,
    },
    /// An image file could not be opened or written.
    #[error("{what}")]
    Image {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: Box<ferry_image::ImageError>,
    },
    /// An NBD source or target could not be reached.
    #[error("{what}")]
    Nbd {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: Box<ferry_nbd::NbdError>,
    },
    /// A copy job could not read a chunk (or index) of the source repository.
    #[error(
        "copy of restore point `{snapshot}`, disk `{disk}`: reading the source repository failed"
    )]
    CopySource {
        /// The restore point being copied.
        snapshot: String,
        /// Its disk.
        disk: String,
        /// The cause (names the object key).
        #[source]
        source: RepoError,
    },
    /// A restore target cannot hold the disk.
    #[error(
        "restore of disk `{disk}`: target {target} holds {target_size} bytes, the disk needs {disk_size}"
    )]
    TargetTooSmall {
        /// The disk.
        disk: String,
        /// The target.
        target: String,
        /// Bytes the target holds.
        target_size: u64,
        /// Bytes the disk needs.
        disk_size: u64,
    },
    /// The caller asked for something impossible (unknown disk or snapshot, bad option).
    #[error("{0}")]
    Usage(String),
    /// The operation was cancelled (Ctrl-C); nothing was committed.
    #[error("cancelled: no restore point was written")]
    Cancelled,
    /// A worker task failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
}

impl EngineError {
    /// Whether running the same operation again may succeed (a dropped connection, a timeout).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Source { source, .. } | Self::Target { source, .. } => source.is_retryable(),
            Self::Repo { source, .. } | Self::CopySource { source, .. } => source.is_retryable(),
            Self::Nbd { source, .. } => source.is_retryable(),
            _ => false,
        }
    }

    pub(crate) fn repo(disk: &str, source: RepoError) -> Self {
        Self::Repo {
            disk: disk.to_string(),
            source,
        }
    }
}
