//! vSphere errors: SOAP faults mapped to the kinds an operator (and the driver) acts on.

use crate::xml::{Fault, XmlError};
use ferry_hv::HvError;

/// The vim25 faults Ferry tells apart; everything else keeps its vim25 name in [`FaultKind::Other`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// Wrong user name or password.
    InvalidLogin,
    /// The session expired or was never established.
    NotAuthenticated,
    /// The user lacks a privilege.
    NoPermission,
    /// A datastore file problem (`FileFault` and its subtypes such as `FileNotFound`); for
    /// QueryChangedDiskAreas: the changeId is no longer valid.
    FileFault(String),
    /// Another task is running on the object.
    TaskInProgress,
    /// The object does not exist (`ManagedObjectNotFound`, `NotFound`).
    NotFound,
    /// The server does not implement the method.
    MethodNotFound,
    /// The object is in the wrong state (`InvalidState`, `InvalidPowerState`, `SnapshotFault`…).
    InvalidState(String),
    /// An argument was refused (`InvalidArgument`, `InvalidRequest`).
    InvalidArgument(String),
    /// Quiescing the guest failed (VMware Tools / VSS).
    ApplicationQuiesceFault,
    /// Any other fault, by its vim25 type name (or the SOAP fault code when it had none).
    Other(String),
}

impl FaultKind {
    /// Maps a vim25 fault type name.
    pub fn from_name(name: &str) -> Self {
        match name {
            "InvalidLogin" => Self::InvalidLogin,
            "NotAuthenticated" => Self::NotAuthenticated,
            "NoPermission" => Self::NoPermission,
            "TaskInProgress" | "ConcurrentAccess" => Self::TaskInProgress,
            "ManagedObjectNotFound" | "NotFound" => Self::NotFound,
            "MethodNotFound" | "NotImplemented" | "NotSupported" => Self::MethodNotFound,
            "ApplicationQuiesceFault" => Self::ApplicationQuiesceFault,
            "InvalidArgument" | "InvalidRequest" | "InvalidType" => {
                Self::InvalidArgument(name.into())
            }
            n if n == "FileFault" || n.starts_with("File") || n.ends_with("FileFault") => {
                Self::FileFault(n.into())
            }
            n if n.starts_with("Invalid") || n.contains("Snapshot") => Self::InvalidState(n.into()),
            n => Self::Other(n.into()),
        }
    }

    /// The vim25 name.
    pub fn name(&self) -> &str {
        match self {
            Self::InvalidLogin => "InvalidLogin",
            Self::NotAuthenticated => "NotAuthenticated",
            Self::NoPermission => "NoPermission",
            Self::TaskInProgress => "TaskInProgress",
            Self::NotFound => "ManagedObjectNotFound",
            Self::MethodNotFound => "MethodNotFound",
            Self::ApplicationQuiesceFault => "ApplicationQuiesceFault",
            Self::FileFault(n)
            | Self::InvalidState(n)
            | Self::InvalidArgument(n)
            | Self::Other(n) => n,
        }
    }

    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::TaskInProgress | Self::NotAuthenticated)
    }
}

/// A failed vSphere call.
#[derive(Debug, thiserror::Error)]
pub enum VimError {
    /// The server answered a SOAP fault (directly or as a task's error).
    #[error("{source_name}: {call} failed: {}: {message}", kind.name())]
    Fault {
        /// The configured source.
        source_name: String,
        /// The method and its object.
        call: String,
        /// What kind of fault.
        kind: FaultKind,
        /// The server's message.
        message: String,
    },
    /// The answer could not be understood.
    #[error("{source_name}: {call}: {message}")]
    Protocol {
        /// The configured source.
        source_name: String,
        /// The method.
        call: String,
        /// What was wrong.
        message: String,
    },
    /// The HTTP transport failed.
    #[error(transparent)]
    Http(#[from] ferry_http::HttpError),
}

impl VimError {
    /// Whether the call broke in transit (connection, timeout, 5xx without a fault), so
    /// repeating a read-only call may succeed.
    pub fn is_transport_retryable(&self) -> bool {
        matches!(self, Self::Http(h) if h.is_retryable())
    }

    /// The fault kind, when the server answered one.
    pub fn fault(&self) -> Option<&FaultKind> {
        match self {
            Self::Fault { kind, .. } => Some(kind),
            _ => None,
        }
    }

    pub(crate) fn from_fault(source: &str, call: &str, f: Fault) -> Self {
        let kind = FaultKind::from_name(f.kind.as_deref().unwrap_or(&f.code));
        let message = if f.message.is_empty() {
            "(no message)".into()
        } else {
            f.message
        };
        Self::Fault {
            source_name: source.into(),
            call: call.into(),
            kind,
            message,
        }
    }

    pub(crate) fn protocol(source: &str, call: &str, message: impl Into<String>) -> Self {
        Self::Protocol {
            source_name: source.into(),
            call: call.into(),
            message: message.into(),
        }
    }

    pub(crate) fn xml(source: &str, call: &str, e: XmlError) -> Self {
        Self::protocol(source, call, e.to_string())
    }
}

impl From<VimError> for HvError {
    fn from(e: VimError) -> Self {
        match e {
            VimError::Fault {
                source_name,
                call,
                ref kind,
                ref message,
            } => HvError::Api {
                retryable: kind.is_retryable(),
                message: format!("{}: {message}", kind.name()),
                source_name,
                call,
            },
            VimError::Protocol {
                source_name,
                call,
                message,
            } => HvError::Api {
                source_name,
                call,
                message,
                retryable: false,
            },
            VimError::Http(h) => HvError::Http(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_names_map_to_kinds() {
        assert_eq!(
            FaultKind::from_name("InvalidLogin"),
            FaultKind::InvalidLogin
        );
        assert_eq!(
            FaultKind::from_name("FileNotFound"),
            FaultKind::FileFault("FileNotFound".into())
        );
        assert_eq!(
            FaultKind::from_name("TaskInProgress"),
            FaultKind::TaskInProgress
        );
        assert_eq!(
            FaultKind::from_name("ManagedObjectNotFound"),
            FaultKind::NotFound
        );
        assert_eq!(
            FaultKind::from_name("MethodNotFound"),
            FaultKind::MethodNotFound
        );
        assert_eq!(
            FaultKind::from_name("InvalidPowerState"),
            FaultKind::InvalidState("InvalidPowerState".into())
        );
        assert_eq!(
            FaultKind::from_name("Weird"),
            FaultKind::Other("Weird".into())
        );
        assert!(FaultKind::TaskInProgress.is_retryable());
        assert!(!FaultKind::InvalidLogin.is_retryable());
    }
}
