//! Client configuration and NBD URIs (`nbd://host:port/export`, `nbds://…`,
//! `nbd+unix:///export?socket=PATH`, `nbds+unix://…`), after the NBD URI specification.

use crate::error::NbdError;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use ferry_tls::{format_fingerprint, parse_fingerprint};

/// Default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Clone, PartialEq, Eq)]
pub enum Address {
    /// TCP host (name or IP) and port.
    Tcp {
        /// Host name or IP literal (without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// Unix domain socket.
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "{host}:{port}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How the client authenticates a TLS server.
#[derive(Clone)]
pub enum TlsVerify {
    /// Trust certificates signed by these CAs (PEM text, one or more certificates).
    CaPem(String),
    /// Trust exactly the certificate whose DER encoding has this SHA-256 digest (how XenAPI's
    /// `VDI.get_nbd_info` hands out a server certificate).
    Fingerprint([u8; 32]),
}

impl fmt::Debug for TlsVerify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CaPem(_) => f.write_str("CaPem(..)"),
            Self::Fingerprint(d) => write!(f, "Fingerprint({})", format_fingerprint(d)),
        }
    }
}

/// TLS settings of a client.
#[derive(Clone, Debug)]
pub struct TlsOptions {
    /// Trust anchor.
    pub verify: TlsVerify,
    /// Name to check in the certificate; defaults to the URI host (`localhost` for Unix sockets).
    pub server_name: Option<String>,
    /// Certificate presented when the server asks for one (mutual TLS, e.g. a host agent).
    pub client_identity: Option<ferry_tls::ClientIdentity>,
}

/// Everything the client needs to reach one export.
#[derive(Clone)]
pub struct NbdConfig {
    /// Server address.
    pub address: Address,
    /// Export name (may hold secrets such as XenServer's `?session_id=`; never printed whole).
    pub export: String,
    /// Whether TLS is required (`nbds`).
    pub tls_required: bool,
    /// TLS settings; needed when `tls_required`.
    pub tls: Option<TlsOptions>,
    /// Metadata contexts to select, e.g. `base:allocation`, `qemu:dirty-bitmap:b0`.
    pub meta_contexts: Vec<String>,
    /// Connections to open when the server advertises multi-conn (1 otherwise).
    pub connections: usize,
    /// Requests in flight per connection.
    pub max_in_flight: usize,
    /// Largest request the client sends (further capped by the server's maximum block size).
    pub max_request: u32,
    /// Timeout of connect and of each negotiation step.
    pub connect_timeout: Duration,
    /// Timeout of each request; expiry drops the connection (a stalled server).
    pub request_timeout: Duration,
    /// Attempts after the first for idempotent requests (reads, block status) that fail with a
    /// transient error (dropped connection, timeout, EIO).
    pub retries: u32,
}

impl fmt::Debug for NbdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdConfig")
            .field("address", &self.address)
            .field("export", &redact_export(&self.export))
            .field("tls_required", &self.tls_required)
            .field("meta_contexts", &self.meta_contexts)
            .field("connections", &self.connections)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl NbdConfig {
    /// A configuration for `export` at `address` with default tuning.
    pub fn new(address: Address, export: impl Into<String>) -> Self {
        Self {
            address,
            export: export.into(),
            tls_required: false,
            tls: None,
            meta_contexts: vec![crate::BASE_ALLOCATION.to_string()],
            connections: 4,
            max_in_flight: 16,
            max_request: 256 << 10,
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(120),
            retries: 3,
        }
    }

    /// Parses an NBD URI.
    pub fn from_uri(uri: &str) -> Result<Self, NbdError> {
        let bad = |m: &str| NbdError::Config {
            uri: redact_uri(uri),
            message: m.to_string(),
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("missing scheme"))?;
        let (tls, unix) = match scheme {
            "nbd" => (false, false),
            "nbds" => (true, false),
            "nbd+unix" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(bad("scheme must be nbd, nbds, nbd+unix or nbds+unix")),
        };
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad("bad percent-encoding in export"))?;
        let mut socket = None;
        for kv in query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter(|s| !s.is_empty())
        {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            // Other parameters (tls-certificates, …) are meant for other clients.
            if k == "socket" {
                socket = Some(percent_decode(v).ok_or_else(|| bad("bad socket path"))?);
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(bad("a unix URI has no host"));
            }
            Address::Unix(PathBuf::from(
                socket.ok_or_else(|| bad("a unix URI needs ?socket=PATH"))?,
            ))
        } else {
            if socket.is_some() {
                return Err(bad("socket= is only valid with nbd+unix"));
            }
            let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad host:port"))?;
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            Address::Tcp {
                host,
                port: port.unwrap_or(DEFAULT_PORT),
            }
        };
        let mut c = Self::new(address, export);
        c.tls_required = tls;
        Ok(c)
    }

    /// Trusts servers signed by the CA(s) in `pem` and requires TLS.
    pub fn with_tls_ca_pem(mut self, pem: impl Into<String>) -> Self {
        self.tls_required = true;
        self.tls = Some(TlsOptions {
            verify: TlsVerify::CaPem(pem.into()),
            server_name: None,
            client_identity: None,
        });
        self
    }

    /// Trusts exactly the server certificate with this SHA-256 fingerprint
    /// (`sha256:AB:CD:…`, `AB:CD:…` or plain hex) and requires TLS.
    pub fn with_tls_fingerprint(mut self, fingerprint: &str) -> Result<Self, NbdError> {
        let digest = parse_fingerprint(fingerprint).ok_or_else(|| NbdError::Config {
            uri: self.uri_redacted(),
            message: "TLS fingerprint must be 32 hex bytes (optionally `sha256:` and colons)"
                .into(),
        })?;
        self.tls_required = true;
        self.tls = Some(TlsOptions {
            verify: TlsVerify::Fingerprint(digest),
            server_name: None,
            client_identity: None,
        });
        Ok(self)
    }

    /// Presents `identity` to servers that require a client certificate. Call after choosing
    /// the trust anchor (`with_tls_ca_pem`, `with_tls_fingerprint`).
    pub fn with_client_identity(mut self, identity: ferry_tls::ClientIdentity) -> Self {
        if let Some(t) = self.tls.as_mut() {
            t.client_identity = Some(identity);
        }
        self
    }

    /// Adds a metadata context to select (e.g. `qemu:dirty-bitmap:b0`).
    pub fn with_meta_context(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        if !self.meta_contexts.contains(&name) {
            self.meta_contexts.push(name);
        }
        self
    }

    /// The server as printed in messages.
    pub fn server_label(&self) -> String {
        self.address.to_string()
    }

    /// The export as printed in messages (query part redacted).
    pub fn export_label(&self) -> String {
        redact_export(&self.export)
    }

    /// A URI for messages, with secrets redacted.
    pub fn uri_redacted(&self) -> String {
        let s = if self.tls_required { "s" } else { "" };
        let e = percent_encode(&self.export_label());
        match &self.address {
            Address::Tcp { .. } => format!("nbd{s}://{}/{e}", self.address),
            Address::Unix(p) => format!("nbd{s}+unix:///{e}?socket={}", p.display()),
        }
    }
}

/// Redacts the query of an export name (XenServer: `/<vdi>?session_id=OpaqueRef:…`).
pub fn redact_export(export: &str) -> String {
    match export.split_once('?') {
        Some((path, _)) => format!("{path}?***"),
        None => export.to_string(),
    }
}

fn redact_uri(uri: &str) -> String {
    // Keep the scheme and authority; the path and query may carry a session id.
    match uri.split_once("://") {
        Some((s, rest)) => {
            let auth = rest.split(['/', '?']).next().unwrap_or("");
            format!("{s}://{auth}/***")
        }
        None => "***".into(),
    }
}

fn split_host_port(a: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = a.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), Some(p.parse().ok()?))),
        None => Some((a.to_string(), None)),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    let mut o = String::new();
    for c in s.bytes() {
        if c.is_ascii_alphanumeric() || b"-._~/:*".contains(&c) {
            o.push(c as char);
        } else {
            o.push_str(&format!("%{c:02X}"));
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_four_schemes() {
        let c = NbdConfig::from_uri("nbd://127.0.0.1:1234/disk0").unwrap();
        assert_eq!(
            c.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 1234
            }
        );
        assert_eq!(c.export, "disk0");
        assert!(!c.tls_required);
        let c = NbdConfig::from_uri("nbds://host/").unwrap();
        assert!(c.tls_required);
        assert_eq!(c.export, "");
        assert_eq!(c.server_label(), "host:10809");
        let c = NbdConfig::from_uri("nbd+unix:///e%20x?socket=/tmp/s.sock").unwrap();
        assert_eq!(c.address, Address::Unix("/tmp/s.sock".into()));
        assert_eq!(c.export, "e x");
        let c = NbdConfig::from_uri("nbds+unix://?socket=/s").unwrap();
        assert!(c.tls_required);
        let c = NbdConfig::from_uri("nbd://[::1]:99/x").unwrap();
        assert_eq!(c.server_label(), "[::1]:99");
        for bad in [
            "http://x/y",
            "nbd+unix:///x",
            "nbd://:12/x",
            "nbd://h:notaport/x",
            "nbd://h/%zz",
        ] {
            assert!(NbdConfig::from_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_in_export_names_never_print() {
        let uri = "nbds://xen:10809/%2Fabc%3Fsession_id%3DOpaqueRef%3Asecret";
        let c = NbdConfig::from_uri(uri).unwrap();
        assert_eq!(c.export, "/abc?session_id=OpaqueRef:secret");
        let shown = format!("{c:?} {} {}", c.export_label(), c.uri_redacted());
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("/abc?***"), "{shown}");
        let err = NbdConfig::from_uri("bogus://h/x?session_id=secret").unwrap_err();
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
