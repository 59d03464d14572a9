//! rustls configuration for `NBD_OPT_STARTTLS`: the client verifies the server by CA or by a
//! pinned SHA-256 certificate fingerprint (through `ferry-tls`, shared with every other
//! connection Ferry makes); the server loads a PEM certificate chain and key.

use crate::uri::TlsVerify;
use std::sync::Arc;

pub use ferry_tls::fingerprint_of;

/// Builds the rustls client configuration for `verify`.
pub fn client_config(verify: &TlsVerify) -> Result<Arc<rustls::ClientConfig>, String> {
    client_config_with_identity(verify, None)
}

/// [`client_config`] presenting `identity` when the server asks for a client certificate.
pub fn client_config_with_identity(
    verify: &TlsVerify,
    identity: Option<&ferry_tls::ClientIdentity>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let trust = match verify {
        TlsVerify::CaPem(pem) => ferry_tls::Trust::CaPem(pem.clone()),
        TlsVerify::Fingerprint(d) => ferry_tls::Trust::Fingerprint(*d),
    };
    ferry_tls::client_config_with_identity(&trust, identity).map_err(|e| e.to_string())
}

/// Builds a rustls server configuration from a PEM certificate chain and a PEM private key.
pub fn server_config(
    cert_chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, String> {
    ferry_tls::server_config(cert_chain_pem, key_pem).map_err(|e| e.to_string())
}
