//! Channel binding of WinRM logins over HTTPS (Extended Protection for Authentication, ADR
//! 0172): the NTLM AUTHENTICATE carries the `tls-server-end-point` binding of the certificate
//! the host presented ([`ferry_wsman::cbt`]), so a host with `CbtHardeningLevel = Strict`
//! admits it and a relayed login (a man in the middle with another certificate) fails.
//! `channel-binding = false` in the source turns it off; the refusal a strict host then gives
//! says so. Kerberos logins are not bound yet (see ADR 0172).

use crate::error::HypervError;

/// The binding to send in an NTLM login to `url` (HTTPS, on unless `setting` is false), from
/// the server certificate `cert` (DER) the first leg saw.
pub(crate) fn for_login(
    source: &str,
    url: &url::Url,
    setting: Option<bool>,
    cert: Option<&[u8]>,
) -> Option<Vec<u8>> {
    if url.scheme() != "https" || setting == Some(false) {
        return None;
    }
    let Some(cert) = cert else {
        tracing::warn!(
            source,
            "channel binding: the HTTPS reply carried no server certificate; logging in without"
        );
        return None;
    };
    match ferry_wsman::cbt::tls_server_end_point(cert) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!(source, error = %e, "logging in without channel binding");
            None
        }
    }
}

/// A strict host's 401 to an unbound NTLM login over HTTPS.
pub(crate) fn refused_unbound(source: &str, call: &str, user: &str) -> HypervError {
    HypervError::protocol(
        source,
        call,
        format!(
            "the Hyper-V host refused the login of user `{user}` sent without channel binding: either the password is wrong, or the host requires channel binding (WinRM Extended Protection, CbtHardeningLevel = Strict) — remove `channel-binding = false` from the source"
        ),
    )
}
