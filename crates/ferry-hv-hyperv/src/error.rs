//! Errors of the Hyper-V driver. Messages name the source and the call, never a password.

use crate::wsman::WsmanFault;
use crate::xml::XmlError;
use ferry_http::HttpError;

/// What kind of fault the WS-Man service (or WMI behind it) reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// Credentials refused (HTTP 401) or `w:AccessDenied`.
    AccessDenied,
    /// The object is not there (`w:InvalidSelectors`, WMI "not found").
    NotFound,
    /// The operation timed out on the server (a Receive with no output yet: retry).
    TimedOut,
    /// The class or method is unknown (`w:ActionNotSupported`, `w:DestinationUnreachable`).
    NotSupported,
    /// Anything else, by subcode.
    Other(String),
}

impl FaultKind {
    /// Classifies a fault.
    pub fn of(f: &WsmanFault) -> Self {
        match f.subcode.as_str() {
            "AccessDenied" => Self::AccessDenied,
            "InvalidSelectors" => Self::NotFound,
            "TimedOut" => Self::TimedOut,
            "ActionNotSupported" | "DestinationUnreachable" => Self::NotSupported,
            other => Self::Other(other.to_string()),
        }
    }
}

/// An error of the Hyper-V driver.
#[derive(Debug, thiserror::Error)]
pub enum HypervError {
    /// Transport (connect, TLS, timeouts, HTTP status).
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The host refused the credentials.
    #[error(
        "source `{source_name}`: {call}: the Hyper-V host refused the credentials of user `{user}`"
    )]
    Login {
        /// The source.
        source_name: String,
        /// The call.
        call: String,
        /// The user name (never the password).
        user: String,
    },
    /// A SOAP fault.
    #[error("source `{source_name}`: {call}: {fault}")]
    Fault {
        /// The source.
        source_name: String,
        /// The call.
        call: String,
        /// Its kind.
        kind: FaultKind,
        /// The fault (boxed: errors stay small on the happy path).
        fault: Box<WsmanFault>,
    },
    /// A WMI method returned an error code, or its job failed.
    #[error("source `{source_name}`: {call}: {message}")]
    Wmi {
        /// The source.
        source_name: String,
        /// The call.
        call: String,
        /// The return value or job error code.
        code: u64,
        /// What WMI said.
        message: String,
    },
    /// A reply that does not follow the protocol.
    #[error("source `{source_name}`: {call}: {message}")]
    Protocol {
        /// The source.
        source_name: String,
        /// The call.
        call: String,
        /// What is wrong.
        message: String,
    },
}

impl HypervError {
    /// A protocol error.
    pub fn protocol(source: &str, call: &str, message: impl Into<String>) -> Self {
        Self::Protocol {
            source_name: source.into(),
            call: call.into(),
            message: message.into(),
        }
    }

    /// A malformed reply.
    pub fn xml(source: &str, call: &str, e: XmlError) -> Self {
        Self::protocol(source, call, e.to_string())
    }

    /// The fault kind, when this is a fault.
    pub fn fault_kind(&self) -> Option<&FaultKind> {
        match self {
            Self::Fault { kind, .. } => Some(kind),
            Self::Login { .. } => Some(&FaultKind::AccessDenied),
            _ => None,
        }
    }
}
