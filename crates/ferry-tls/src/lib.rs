//! TLS trust for every connection Ferry makes or serves: NBD, hypervisor control planes
//! (XenAPI, vSphere, WS-Management) and, later, the appliance's API.
//!
//! A client trusts a server in one of four ways ([`Trust`]): exactly one certificate, named by
//! its SHA-256 fingerprint (hypervisors hand out self-signed certificates whose names rarely
//! match the address used, so the pin is the trust decision); a CA bundle; the system's roots;
//! or — labs only, warned by the caller — anything. A pin that does not match fails with
//! [`PinMismatch`], which names both fingerprints.
//!
//! Servers load a PEM chain and key ([`server_config`]) or generate a self-signed pair
//! ([`SelfSigned`]). Everything uses the `ring` provider explicitly, so no process-wide default
//! provider has to be installed.

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::Arc;

/// Why a TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM text holds no usable certificate or key.
    #[error("{0}")]
    Pem(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(String),
    /// The system's root certificates cannot be loaded.
    #[error("cannot load the system's root certificates: {0}")]
    SystemRoots(String),
}

/// How a client decides to trust a server certificate.
#[derive(Clone, PartialEq, Eq)]
pub enum Trust {
    /// Exactly the certificate with this SHA-256 digest (name and expiry are not checked).
    Fingerprint([u8; 32]),
    /// Certificates issued by one of the CAs of this PEM text (names are checked).
    CaPem(String),
    /// Certificates issued by one of the system's root CAs (names are checked).
    System,
    /// Any certificate (labs only: the caller warns at every connection).
    Insecure,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fingerprint(d) => write!(f, "Fingerprint({})", format_fingerprint(d)),
            Self::CaPem(_) => f.write_str("CaPem(..)"),
            Self::System => f.write_str("System"),
            Self::Insecure => f.write_str("Insecure"),
        }
    }
}

/// Parses `sha256:AB:CD:…`, `AB:CD:…` or plain hex (64 digits, either case).
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    let s = s
        .strip_prefix("sha256:")
        .or_else(|| s.strip_prefix("SHA256:"))
        .unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, byte) in d.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(d)
}

/// Formats a digest as `sha256:AB:CD:…`.
pub fn format_fingerprint(d: &[u8; 32]) -> String {
    let hex: Vec<String> = d.iter().map(|b| format!("{b:02X}")).collect();
    format!("sha256:{}", hex.join(":"))
}

/// SHA-256 fingerprint of a DER certificate, formatted `sha256:AB:CD:…`.
pub fn fingerprint_of(cert_der: &[u8]) -> String {
    format_fingerprint(&Sha256::digest(cert_der).into())
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client configuration for `trust`. No ALPN protocols are offered; callers
/// that speak a protocol over TLS add their own.
pub fn client_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_with_identity(trust, None)
}

/// A certificate and key a client presents for mutual TLS (the appliance to a host agent).
#[derive(Clone)]
pub struct ClientIdentity {
    /// Certificate chain, PEM (the first certificate is the client's own).
    pub cert_pem: String,
    /// Private key, PEM (a secret: never printed).
    pub key_pem: String,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fp = parse_certs(&self.cert_pem)
            .ok()
            .and_then(|c| c.first().map(|c| fingerprint_of(c.as_ref())));
        f.debug_struct("ClientIdentity")
            .field("certificate", &fp)
            .finish_non_exhaustive()
    }
}

impl ClientIdentity {
    /// `sha256:AB:CD:…` of the client's own certificate (what a server pins).
    pub fn fingerprint(&self) -> Result<String, TlsError> {
        certificate_fingerprint(&self.cert_pem)
    }
}

/// `sha256:AB:CD:…` of the first certificate of a PEM chain.
pub fn certificate_fingerprint(cert_chain_pem: &str) -> Result<String, TlsError> {
    let certs = parse_certs(cert_chain_pem)?;
    let first = certs
        .first()
        .ok_or_else(|| TlsError::Pem("the certificate PEM holds no certificate".into()))?;
    Ok(fingerprint_of(first.as_ref()))
}

/// [`client_config`] that also presents `identity` when the server asks for a certificate.
pub fn client_config_with_identity(
    trust: &Trust,
    identity: Option<&ClientIdentity>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let wants_cert = match trust {
        Trust::CaPem(pem) => {
            let certs = parse_certs(pem)?;
            if certs.is_empty() {
                return Err(TlsError::Pem("the CA PEM holds no certificate".into()));
            }
            let mut roots = rustls::RootCertStore::empty();
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| TlsError::Pem(format!("unusable CA certificate: {e}")))?;
            }
            builder.with_root_certificates(roots)
        }
        Trust::System => {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "no certificate found".into());
                return Err(TlsError::SystemRoots(why));
            }
            builder.with_root_certificates(roots)
        }
        Trust::Fingerprint(_) | Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                pin: match trust {
                    Trust::Fingerprint(d) => Some(*d),
                    _ => None,
                },
                provider: provider(),
            })),
    };
    let config = match identity {
        None => wants_cert.with_no_client_auth(),
        Some(id) => {
            let (certs, key) = parse_pair(&id.cert_pem, &id.key_pem, "client")?;
            wants_cert.with_client_auth_cert(certs, key).map_err(|e| {
                TlsError::Config(format!(
                    "client certificate and key do not form a usable pair: {e}"
                ))
            })?
        }
    };
    Ok(Arc::new(config))
}

fn parse_pair(
    cert_chain_pem: &str,
    key_pem: &str,
    whose: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = parse_certs(cert_chain_pem)?;
    if certs.is_empty() {
        return Err(TlsError::Pem(format!(
            "the {whose} certificate PEM holds no certificate"
        )));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| TlsError::Pem(format!("cannot parse the {whose} private key PEM: {e}")))?
        .ok_or_else(|| TlsError::Pem(format!("the {whose} key PEM holds no private key")))?;
    Ok((certs, key))
}

/// A server configuration that requires every client to present one of the certificates whose
/// SHA-256 fingerprints are in `client_pins` (mutual TLS with pinned clients: a host agent
/// serves only the appliance it was paired with). Handshake signatures are verified, so the
/// client must hold the pinned certificate's key.
pub fn server_config_pinned_clients(
    cert_chain_pem: &str,
    key_pem: &str,
    client_pins: &[[u8; 32]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    if client_pins.is_empty() {
        return Err(TlsError::Config(
            "mutual TLS needs at least one pinned client certificate".into(),
        ));
    }
    server_config_shared_pins(
        cert_chain_pem,
        key_pem,
        ClientPins::new(client_pins.to_vec()),
    )
}

/// The pinned client certificates of a running server, shared with it: a pin added later
/// admits that client from the next handshake on (a simulator pairing with an appliance).
#[derive(Clone, Debug, Default)]
pub struct ClientPins(Arc<std::sync::RwLock<Vec<[u8; 32]>>>);

impl ClientPins {
    /// A set holding `pins`.
    pub fn new(pins: Vec<[u8; 32]>) -> Self {
        Self(Arc::new(std::sync::RwLock::new(pins)))
    }

    /// Admits the client certificate of fingerprint `pin`.
    pub fn add(&self, pin: [u8; 32]) {
        let mut v = self.0.write().unwrap_or_else(|p| p.into_inner());
        if !v.contains(&pin) {
            v.push(pin);
        }
    }

    fn snapshot(&self) -> Vec<[u8; 32]> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// [`server_config_pinned_clients`] over a shared set, which may start empty (every client is
/// refused until a pin is added).
pub fn server_config_shared_pins(
    cert_chain_pem: &str,
    key_pem: &str,
    client_pins: ClientPins,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, key) = parse_pair(cert_chain_pem, key_pem, "server")?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(PinnedClients {
            pins: client_pins,
            provider: provider(),
        }))
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError::Config(format!(
                "certificate and key do not form a usable pair: {e}"
            ))
        })?;
    Ok(Arc::new(config))
}

/// A client presented a certificate that is not pinned.
#[derive(Clone, thiserror::Error)]
#[error(
    "the client presented certificate {}, which is not one of the {pinned} pinned client certificate(s)",
    format_fingerprint(.presented)
)]
pub struct ClientNotPinned {
    /// What the client presented.
    pub presented: [u8; 32],
    /// How many pins the server holds.
    pub pinned: usize,
}

impl fmt::Debug for ClientNotPinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug)]
struct PinnedClients {
    pins: ClientPins,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let presented: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        let pins = self.pins.snapshot();
        if pins.contains(&presented) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(ClientNotPinned {
                    presented,
                    pinned: pins.len(),
                }))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(&self.provider, message, cert, dss, false)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(&self.provider, message, cert, dss, true)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        schemes(&self.provider)
    }
}

/// Builds a rustls server configuration from a PEM certificate chain and a PEM private key.
pub fn server_config(
    cert_chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, key) = parse_pair(cert_chain_pem, key_pem, "server")?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError::Config(format!(
                "certificate and key do not form a usable pair: {e}"
            ))
        })?;
    Ok(Arc::new(config))
}

fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("cannot parse certificate PEM: {e}")))
}

/// A self-signed server certificate and its key, as simulators and a first-start appliance
/// use them.
pub struct SelfSigned {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (a secret: never log it).
    pub key_pem: String,
    /// The certificate's DER bytes.
    pub cert_der: Vec<u8>,
}

impl fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SelfSigned")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl SelfSigned {
    /// Generates a certificate for `names` (DNS names or IP addresses).
    pub fn generate(names: &[&str]) -> Result<Self, TlsError> {
        let ck = rcgen::generate_simple_self_signed(
            names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok(Self {
            cert_pem: ck.cert.pem(),
            key_pem: ck.key_pair.serialize_pem(),
            cert_der: ck.cert.der().to_vec(),
        })
    }

    /// `sha256:AB:CD:…` of the certificate.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.cert_der)
    }

    /// The rustls server configuration for this pair.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        server_config(&self.cert_pem, &self.key_pem)
    }

    /// This pair as a client identity for mutual TLS.
    pub fn identity(&self) -> ClientIdentity {
        ClientIdentity {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

/// A pinned certificate did not match: both fingerprints, for the operator to compare.
#[derive(Clone, thiserror::Error)]
#[error(
    "the server presented certificate {}, which does not match the pinned {} (if the server's certificate was replaced on purpose, update the pin)",
    format_fingerprint(.presented),
    format_fingerprint(.pinned)
)]
pub struct PinMismatch {
    /// What the server presented.
    pub presented: [u8; 32],
    /// What the configuration pins.
    pub pinned: [u8; 32],
}

// rustls shows a verifier's own error through `Debug`: make that the readable text too.
impl fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The message for a failed TLS handshake: the pin mismatch alone when that is the cause,
/// else the error's own text.
pub fn describe_handshake_error(e: &(dyn std::error::Error + 'static)) -> String {
    match find_pin_mismatch(e) {
        Some(m) => m.to_string(),
        None => e.to_string(),
    }
}

/// Accepts exactly one end-entity certificate, identified by its SHA-256 digest, or (no pin,
/// labs) any certificate. Handshake signatures are still verified, so the peer must hold the
/// certificate's private key. Name and expiry are deliberately not checked: the pin is the
/// trust decision.
#[derive(Debug)]
struct PinnedCert {
    pin: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(pinned) = self.pin else {
            return Ok(ServerCertVerified::assertion());
        };
        let presented: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if presented == pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                    presented,
                    pinned,
                }))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(&self.provider, message, cert, dss, false)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        handshake_signature(&self.provider, message, cert, dss, true)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        schemes(&self.provider)
    }
}

/// Checks a TLS 1.2 or 1.3 handshake signature with the provider's algorithms (both pinned
/// verifiers: the pin names the certificate, the signature proves its key is held).
fn handshake_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    tls13: bool,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let algs = &provider.signature_verification_algorithms;
    if tls13 {
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    } else {
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }
}

fn schemes(provider: &CryptoProvider) -> Vec<rustls::SignatureScheme> {
    provider
        .signature_verification_algorithms
        .supported_schemes()
}

/// Finds a [`PinMismatch`] anywhere in an error's source chain (through `io::Error` and the
/// HTTP stack's wrappers), so a caller can name both fingerprints.
pub fn find_pin_mismatch<'a>(
    mut e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a PinMismatch> {
    loop {
        if let Some(m) = e.downcast_ref::<PinMismatch>() {
            return Some(m);
        }
        if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) =
            e.downcast_ref::<rustls::Error>()
        {
            if let Some(m) = o.0.downcast_ref::<PinMismatch>() {
                return Some(m);
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(m) = find_pin_mismatch(inner) {
                    return Some(m);
                }
            }
        }
        e = e.source()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_round_trip() {
        let d: [u8; 32] = core::array::from_fn(|i| 0xab ^ i as u8);
        let s = format_fingerprint(&d);
        assert_eq!(parse_fingerprint(&s), Some(d));
        let plain: String = s["sha256:".len()..].replace(':', "").to_lowercase();
        assert_eq!(parse_fingerprint(&plain), Some(d));
        assert_eq!(parse_fingerprint("sha256:AB"), None);
        assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
    }

    #[test]
    fn self_signed_makes_a_server_config_and_a_pin() {
        let s = SelfSigned::generate(&["localhost", "127.0.0.1"]).unwrap();
        s.server_config().unwrap();
        let pin = parse_fingerprint(&s.fingerprint()).unwrap();
        client_config(&Trust::Fingerprint(pin)).unwrap();
        client_config(&Trust::CaPem(s.cert_pem.clone())).unwrap();
        client_config(&Trust::Insecure).unwrap();
        assert!(matches!(
            client_config(&Trust::CaPem("junk".into())),
            Err(TlsError::Pem(_))
        ));
        assert!(server_config(&s.cert_pem, "junk").is_err());
        assert!(!format!("{s:?}").contains("PRIVATE"));
    }

    #[test]
    fn pinned_clients_need_a_pin_and_identities_hide_their_key() {
        let server = SelfSigned::generate(&["agent"]).unwrap();
        let client = SelfSigned::generate(&["appliance"]).unwrap().identity();
        let pin = parse_fingerprint(&client.fingerprint().unwrap()).unwrap();
        server_config_pinned_clients(&server.cert_pem, &server.key_pem, &[pin]).unwrap();
        assert!(matches!(
            server_config_pinned_clients(&server.cert_pem, &server.key_pem, &[]),
            Err(TlsError::Config(_))
        ));
        client_config_with_identity(&Trust::Insecure, Some(&client)).unwrap();
        let debug = format!("{client:?}");
        assert!(!debug.contains("PRIVATE") && debug.contains(&client.fingerprint().unwrap()));
        let broken = ClientIdentity {
            cert_pem: client.cert_pem.clone(),
            key_pem: "junk".into(),
        };
        assert!(client_config_with_identity(&Trust::Insecure, Some(&broken)).is_err());
    }

    #[test]
    fn pin_mismatch_names_both_fingerprints() {
        let m = PinMismatch {
            presented: [1; 32],
            pinned: [2; 32],
        };
        let e = rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
            rustls::OtherError(Arc::new(m.clone())),
        ));
        let io = std::io::Error::other(e);
        let found = find_pin_mismatch(&io).unwrap();
        assert_eq!(found.presented, [1; 32]);
        let text = m.to_string();
        assert!(text.contains(&format_fingerprint(&[1; 32])));
        assert!(text.contains(&format_fingerprint(&[2; 32])));
    }
}
