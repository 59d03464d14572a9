//! The one error type of the repository. Every message names the operation and the object
//! (object key, snapshot, disk, chunk index) and [`RepoError::is_retryable`] says whether trying
//! again can help.

/// Result alias for this crate.
pub type Result<T, E = RepoError> = std::result::Result<T, E>;

/// What went wrong in the repository.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// The object store failed an operation on an object.
    #[error("{op} of `{key}` failed")]
    Backend {
        /// What was being done (`get`, `put`, `list`, `delete`, `head`).
        op: &'static str,
        /// The object key (or prefix for listings), relative to the repository root.
        key: String,
        /// The object store's error.
        #[source]
        source: object_store::Error,
    },
    /// An object the repository needs is missing.
    #[error("object `{key}` is missing")]
    Missing {
        /// The object key.
        key: String,
    },
    /// An object is malformed, truncated or fails authentication.
    #[error("object `{key}` is corrupt: {reason}")]
    Corrupt {
        /// The object key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No key slot opens with the given password.
    #[error("wrong password for repository {location}")]
    WrongPassword {
        /// The repository location.
        location: String,
    },
    /// The repository is encrypted and no password was given.
    #[error(
        "repository {location} is encrypted: a password is required (FERRY_PASSWORD or --password-file)"
    )]
    PasswordRequired {
        /// The repository location.
        location: String,
    },
    /// An object was written by a newer (or unknown) format version.
    #[error(
        "object `{key}` has format version {found}; this build of ferry supports version {supported} only (upgrade ferry)"
    )]
    UnsupportedVersion {
        /// The object key.
        key: String,
        /// The version found.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// There is no repository at the location.
    #[error("no ferry repository at {location} (object `config` not found; run `ferry repo init`)")]
    NotARepository {
        /// The location.
        location: String,
    },
    /// `init` found an existing repository.
    #[error("a repository already exists at {location}")]
    AlreadyInitialized {
        /// The location.
        location: String,
    },
    /// The repository location cannot be parsed or opened.
    #[error("repository location `{location}`: {reason}")]
    InvalidLocation {
        /// The location as given.
        location: String,
        /// Why it is not usable.
        reason: String,
    },
    /// A cloud location has no credentials configured, and asking the cloud's instance
    /// metadata service for them was not opted into.
    #[error("no {cloud} credentials found: {help}")]
    NoCredentials {
        /// `S3` or `Azure`.
        cloud: &'static str,
        /// Which settings provide credentials.
        help: String,
    },
    /// A lock is held by someone else.
    #[error("lock `{key}` is held by {holder} until {expires}; {hint}")]
    Locked {
        /// The lock object key.
        key: String,
        /// Who holds it.
        holder: String,
        /// When the lease expires (RFC 3339).
        expires: String,
        /// What to do.
        hint: &'static str,
    },
    /// No restore point with this id.
    #[error("restore point `{id}` not found")]
    SnapshotNotFound {
        /// The id asked for.
        id: String,
    },
    /// The restore point has no disk with this name.
    #[error("restore point `{snapshot}` has no disk `{disk}`")]
    DiskNotFound {
        /// The restore point.
        snapshot: String,
        /// The disk name asked for.
        disk: String,
    },
    /// Immutability cannot be set up or kept (no Object Lock, unsupported store).
    #[error("repository {location}: {reason}")]
    Immutability {
        /// Where.
        location: String,
        /// Why.
        reason: String,
    },
    /// A KMS key slot cannot be created or opened (KMS unreachable, access denied, key
    /// disabled, ciphertext refused). Never carries key material.
    #[error("KMS key slot `{slot}` (key {key_id}): {reason}")]
    Kms {
        /// The slot object key (`keys/…`).
        slot: String,
        /// The KMS key as the slot names it.
        key_id: String,
        /// What went wrong and what to do.
        reason: String,
    },
    /// The caller broke the API contract (an index out of range, a chunk never written).
    #[error("{0}")]
    Usage(String),
}

impl RepoError {
    /// Whether the same operation may succeed if tried again (throttling, a dropped connection,
    /// a lock that will expire). Corruption, wrong passwords and missing objects are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Backend { source, .. } => matches!(
                source,
                object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
            ),
            Self::Locked { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn corrupt(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn backend(
        op: &'static str,
        key: impl Into<String>,
        source: object_store::Error,
    ) -> Self {
        let key = key.into();
        match source {
            object_store::Error::NotFound { .. } => Self::Missing { key },
            source => Self::Backend { op, key, source },
        }
    }
}
