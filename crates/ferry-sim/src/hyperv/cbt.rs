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
//! acceptor is also given the expected binding, so both agree. On a cluster each node's listener
//! has its own certificate: the binding of any of them is admitted (the connection does not say
//! which listener it came in on).

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
    /// The listeners' `tls-server-end-point` bindings.
    bindings: Vec<Vec<u8>>,
}

impl CbtCheck {
    /// The check at `level` for the listener whose certificate is `cert_der`; `None` when
    /// nothing is checked.
    pub(super) fn new(level: Cbt, cert_der: &[u8]) -> Result<Option<Self>, String> {
        if level == Cbt::None {
            return Ok(None);
        }
        let mut c = Self {
            level,
            bindings: Vec::new(),
        };
        c.add(cert_der)?;
        Ok(Some(c))
    }

    /// Admits the binding of another listener's certificate too.
    pub(super) fn add(&mut self, cert_der: &[u8]) -> Result<(), String> {
        let b = cbt::tls_server_end_point(cert_der).map_err(|e| e.to_string())?;
        self.bindings.push(b);
        Ok(())
    }

    /// Whether AUTHENTICATE `token` may go on, with the binding it carries (for the acceptor):
    /// `Err(why)` is a 401.
    pub(super) fn check(&self, token: &[u8]) -> Result<Option<Vec<u8>>, String> {
        match cbt::authenticate_bindings(token).map_err(|e| e.to_string())? {
            Some(h) => self
                .bindings
                .iter()
                .find(|b| cbt::bindings_hash(b) == h)
                .cloned()
                .map(Some)
                .ok_or_else(|| {
                    "the channel binding does not match the listener's certificate".into()
                }),
            None if self.level == Cbt::Strict => {
                Err("no channel binding (CbtHardeningLevel = Strict)".into())
            }
            None => Ok(None),
        }
    }
}
