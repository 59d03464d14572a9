//! Errors from opening, reading and writing disk images.

use ferry_core::BlockError;

/// Why an image could not be opened, read or written. Every message names the file and the
/// structure at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// Reading or writing the underlying file failed.
    #[error("{file}: {op} failed")]
    Io {
        /// Which file.
        file: String,
        /// What was being done.
        op: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A structure is malformed: bad magic, bad checksum, a field out of range, a table entry
    /// pointing past the end of the file.
    #[error("{file}: corrupt {structure}: {message}")]
    Corrupt {
        /// Which file.
        file: String,
        /// The structure at fault, e.g. `VHDX header 1`, `VHD BAT entry 17`.
        structure: String,
        /// What is wrong.
        message: String,
    },
    /// The image is valid but uses something this reader or writer does not handle.
    #[error("{file}: unsupported: {message}")]
    Unsupported {
        /// Which file.
        file: String,
        /// What is not supported.
        message: String,
    },
    /// A differencing chain cannot be resolved: a missing parent, a loop, a parent whose
    /// identity does not match what the child expects.
    #[error("{file}: parent chain: {message}")]
    Chain {
        /// The child whose parent is at fault.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// The file's name says it is an image of some format, but its content has no signature of
    /// that (or any) format: reading it as a raw disk would back up garbage.
    #[error(
        "{file}: the name says {} but no {} signature was found (expected {signature}; found {found})",
        named.to_string().to_uppercase(),
        named.to_string().to_uppercase()
    )]
    NotTheNamedFormat {
        /// Which file.
        file: String,
        /// The format its name claims.
        named: crate::Format,
        /// The signature looked for, and where.
        signature: String,
        /// What the file holds instead.
        found: String,
    },
    /// The block source under the image failed.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A writer was used out of order (offsets going backwards, writing past the end).
    #[error("{file}: {message}")]
    Usage {
        /// Which file.
        file: String,
        /// What was wrong with the call.
        message: String,
    },
}

impl ImageError {
    /// Shorthand for [`ImageError::Corrupt`].
    pub fn corrupt(file: &str, structure: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Corrupt {
            file: file.to_string(),
            structure: structure.into(),
            message: message.into(),
        }
    }

    /// Shorthand for [`ImageError::Unsupported`].
    pub fn unsupported(file: &str, message: impl Into<String>) -> Self {
        Self::Unsupported {
            file: file.to_string(),
            message: message.into(),
        }
    }

    /// Shorthand for [`ImageError::Io`].
    pub fn io(file: impl std::fmt::Display, op: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            file: file.to_string(),
            op: op.into(),
            source,
        }
    }

    /// Whether the same operation may succeed if tried again (only transient I/O can).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Block(e) => e.is_retryable(),
            Self::Io { source, .. } => {
                BlockError::io("", "", std::io::Error::from(source.kind())).is_retryable()
            }
            _ => false,
        }
    }
}

impl From<ImageError> for BlockError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::Block(b) => b,
            ImageError::Io { file, op, source } => BlockError::Io {
                disk: file,
                op,
                source,
            },
            ImageError::Unsupported { file, message } => BlockError::Unsupported {
                disk: file,
                message,
            },
            other @ (ImageError::Corrupt { .. }
            | ImageError::Chain { .. }
            | ImageError::Usage { .. }
            | ImageError::NotTheNamedFormat { .. }) => {
                let disk = match &other {
                    ImageError::Corrupt { file, .. }
                    | ImageError::Chain { file, .. }
                    | ImageError::Usage { file, .. }
                    | ImageError::NotTheNamedFormat { file, .. } => file.clone(),
                    _ => String::new(),
                };
                let full = other.to_string();
                let message = full
                    .strip_prefix(&format!("{disk}: "))
                    .unwrap_or(&full)
                    .to_string();
                BlockError::Corrupt { disk, message }
            }
        }
    }
}
