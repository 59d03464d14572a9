//! The simulator as a Kerberos acceptor (ADR 0159): the service principal's key from a keytab
//! that the realm's KDC wrote (`kadmin ktadd HTTP/<host>`), as a domain-joined host holds it.
//! The AP-REQ is checked by `ferry_wsman::kerberos` (sspi's acceptor): the ticket, the
//! authenticator, the clock (`max_skew`) and replays; then the client principal's account must
//! be the simulator's user.

use std::path::PathBuf;
use std::time::Duration;

/// Kerberos settings of the simulator.
#[derive(Debug, Clone)]
pub struct HypervKerberos {
    /// The keytab with the service's key.
    pub keytab: PathBuf,
    /// The service principal, without realm (`HTTP/127.0.0.1`).
    pub service: String,
    /// How far client and host clocks may differ.
    pub max_skew: Duration,
}

impl HypervKerberos {
    /// `service` from `keytab`, with Kerberos' usual five minutes of clock skew.
    pub fn new(keytab: impl Into<PathBuf>, service: &str) -> Self {
        Self {
            keytab: keytab.into(),
            service: service.into(),
            max_skew: Duration::from_secs(300),
        }
    }

    /// The acceptor (reads the keytab).
    pub(super) fn acceptor(&self) -> Result<ferry_wsman::kerberos::KerberosServer, String> {
        let data = std::fs::read(&self.keytab)
            .map_err(|e| format!("cannot read keytab {}: {e}", self.keytab.display()))?;
        let keys = ferry_wsman::kerberos::parse_keytab(&data).map_err(|e| e.to_string())?;
        ferry_wsman::kerberos::KerberosServer::new(&self.service, &keys, self.max_skew)
            .map_err(|e| e.to_string())
    }
}
