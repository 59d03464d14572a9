//! Extended Protection for Authentication on the simulated host's HTTPS listener
//! (`ferry sim hyperv --cbt strict|relaxed`, ADR 0172), as WinRM's `CbtHardeningLevel`:
//!
//! - `strict`: an NTLM AUTHENTICATE over HTTPS must carry the `MsvAvChannelBindings` of the
//!   listener's certificate (RFC 5929 `tls-server-end-point`); one without it, or with another,
//!   is a 401;
//! - `relaxed`: a binding that is there must match; a login without one is let in;
//! - `none` (default): bindings are not looked at.
//!
//! `sspi`'s acceptor checks a binding only when the client sent one, so whether one is there is
//! read from the AUTHENTICATE message itself ([`ferry_wsman::cbt::authenticate_bindings`]); the
//! acceptor is also given the expected binding, so both agree. The bindings are those of the
//! first listener (a cluster's other nodes are not checked).

use ferry_wsman::cbt;

/// `CbtHardeningLevel`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Cbt {
    /// Bindings are not checked.
    #[default]
    None,
    /// A binding that is sent must match.
    Relaxed,
    /// Every NTLM login over HTTPS must carry the matching binding.
    Strict,
}

impl std::str::FromStr for Cbt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "relaxed" => Ok(Self::Relaxed),
            "strict" => Ok(Self::Strict),
            o => Err(format!("unknown --cbt `{o}` (none, relaxed or strict)")),
        }
    }
}

/// The check of one listener.
#[derive(Debug, Clone)]
pub(super) struct CbtCheck {
    level: Cbt,
    /// The listener's `tls-server-end-point` binding.
    pub(super) binding: Vec<u8>,
}

impl CbtCheck {
    /// The check at `level` for the listener whose certificate is `cert_der`; `None` when
    /// nothing is checked.
    pub(super) fn new(level: Cbt, cert_der: &[u8]) -> Result<Option<Self>, String> {
        if level == Cbt::None {
            return Ok(None);
        }
        let binding = cbt::tls_server_end_point(cert_der).map_err(|e| e.to_string())?;
        Ok(Some(Self { level, binding }))
    }

    /// Whether AUTHENTICATE `token` may go on: `Err(why)` is a 401.
    pub(super) fn check(&self, token: &[u8]) -> Result<(), String> {
        let sent = cbt::authenticate_bindings(token).map_err(|e| e.to_string())?;
        match sent {
            Some(h) if h != cbt::bindings_hash(&self.binding) => {
                Err("the channel binding does not match this listener's certificate".into())
            }
            None if self.level == Cbt::Strict => {
                Err("no channel binding (CbtHardeningLevel = Strict)".into())
            }
            _ => Ok(()),
        }
    }
}
