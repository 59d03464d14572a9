//! The control-plane client: `reqwest` with the source's TLS trust, proxies and timeouts, and
//! errors an operator can act on.

use bytes::Bytes;
use ferry_tls::Trust;
use std::sync::Arc;
use std::time::Duration;

/// Where requests go through a proxy.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum ProxySetting {
    /// `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` and `NO_PROXY` from the environment (either
    /// case), as curl reads them.
    #[default]
    FromEnv,
    /// Never a proxy, whatever the environment says.
    Off,
    /// This proxy URL (`http://[user:password@]host:port`) for every request, except to the
    /// hosts of [`ClientOptions::no_proxy`].
    Url(String),
}

impl std::fmt::Debug for ProxySetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::FromEnv => f.write_str("FromEnv"),
            Self::Off => f.write_str("Off"),
            Self::Url(u) => write!(f, "Url({})", redact_userinfo(u)),
        }
    }
}

/// How to build a client for one source.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The source's name, for messages.
    pub source: String,
    /// How the server's certificate is trusted.
    pub trust: Trust,
    /// Proxy use.
    pub proxy: ProxySetting,
    /// Hosts reached without the configured proxy (`NO_PROXY` syntax: names, `.domain`, IPs,
    /// CIDR ranges); added to the environment's `NO_PROXY` when the proxy comes from there.
    pub no_proxy: Vec<String>,
    /// Longest wait for a TCP connection and TLS handshake.
    pub connect_timeout: Duration,
    /// Longest silence while waiting for response bytes (not a limit on a whole transfer).
    pub read_timeout: Duration,
    /// Keep cookies between requests (session cookies such as vSphere's `vmware_soap_session`).
    pub cookies: bool,
}

impl ClientOptions {
    /// Defaults for `source` with `trust`: proxies from the environment, 15 s to connect, 120 s
    /// of silence at most, no cookies.
    pub fn new(source: impl Into<String>, trust: Trust) -> Self {
        Self {
            source: source.into(),
            trust,
            proxy: ProxySetting::FromEnv,
            no_proxy: Vec::new(),
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(120),
            cookies: false,
        }
    }
}

/// What went wrong talking to a control plane. Messages name the source, the host and the
/// operation; they never contain a URL's query or a password.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The client cannot be built (bad proxy URL, unusable CA file, …).
    #[error("source `{source_name}`: {message}")]
    Config {
        /// The source.
        source_name: String,
        /// What is wrong.
        message: String,
    },
    /// The TLS handshake failed: a pin that does not match, an untrusted CA, a bad name.
    #[error("source `{source_name}`: TLS handshake with {host} failed: {message}")]
    Tls {
        /// The source.
        source_name: String,
        /// `host:port`.
        host: String,
        /// Why (for a pin: the presented and the pinned fingerprint).
        message: String,
    },
    /// No connection (refused, unreachable, DNS, proxy).
    #[error("source `{source_name}`: cannot connect to {host}{via}: {message}")]
    Connect {
        /// The source.
        source_name: String,
        /// `host:port`.
        host: String,
        /// ` through proxy P` when one was used.
        via: String,
        /// Why.
        message: String,
    },
    /// No answer in time.
    #[error("source `{source_name}`: {what} on {host} timed out")]
    Timeout {
        /// The source.
        source_name: String,
        /// `host:port`.
        host: String,
        /// The operation.
        what: String,
    },
    /// The server answered with an error status.
    #[error("source `{source_name}`: {what} answered HTTP {status}{detail}")]
    Status {
        /// The source.
        source_name: String,
        /// The operation.
        what: String,
        /// The status code.
        status: u16,
        /// `: ` and the start of the response body, when it had one.
        detail: String,
    },
    /// The transfer broke off (connection dropped, body stream failed, response too large).
    #[error("source `{source_name}`: {what}: {message}")]
    Transfer {
        /// The source.
        source_name: String,
        /// The operation.
        what: String,
        /// Why.
        message: String,
    },
}

impl HttpError {
    /// Whether repeating the request may succeed (dropped connections, timeouts, 5xx, 429).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Config { .. } | Self::Tls { .. } => false,
            Self::Connect { .. } | Self::Timeout { .. } | Self::Transfer { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429,
        }
    }
}

/// A client for one source's control plane. Cheap to clone; connections are pooled and reused.
#[derive(Clone)]
pub struct HttpClient {
    inner: reqwest::Client,
    source: Arc<str>,
    proxy: Option<String>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Longest response-body excerpt quoted in an error.
const EXCERPT: usize = 300;

impl HttpClient {
    /// Builds the client. Insecure trust is warned about here, once per client.
    pub fn new(o: &ClientOptions) -> Result<Self, HttpError> {
        let config_err = |message: String| HttpError::Config {
            source_name: o.source.clone(),
            message,
        };
        if o.trust == Trust::Insecure {
            tracing::warn!(
                source = %o.source,
                "TLS certificates are NOT verified for this source (tls-insecure = true); use tls-fingerprint or tls-ca-file outside a lab"
            );
        }
        let tls = ferry_tls::client_config(&o.trust).map_err(|e| config_err(e.to_string()))?;
        let mut b = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .user_agent(crate::USER_AGENT)
            .connect_timeout(o.connect_timeout)
            .read_timeout(o.read_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            // The server's certificate, for WinRM channel binding (ADR 0172).
            .tls_info(true)
            .cookie_store(o.cookies);
        let no_proxy = || {
            let env = ["NO_PROXY", "no_proxy"]
                .iter()
                .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
            let list: Vec<&str> = env
                .iter()
                .map(String::as_str)
                .chain(o.no_proxy.iter().map(String::as_str))
                .collect();
            reqwest::NoProxy::from_string(&list.join(","))
        };
        // One proxy for every request, except the `NO_PROXY` hosts plus the source's own.
        let explicit = |u: &str, origin: &str| {
            reqwest::Proxy::all(u)
                .map(|p| p.no_proxy(no_proxy()))
                .map_err(|e| {
                    config_err(format!(
                        "proxy `{}`{origin}: {}",
                        redact_userinfo(u),
                        e.without_url()
                    ))
                })
        };
        let proxy = match &o.proxy {
            ProxySetting::Off => {
                b = b.no_proxy();
                None
            }
            ProxySetting::Url(u) => {
                b = b.no_proxy().proxy(explicit(u, "")?);
                Some(redact_userinfo(u))
            }
            ProxySetting::FromEnv => {
                // reqwest reads the environment itself; only the extra exclusions need a
                // proxy of our own, so rebuild it from the same variables in that case.
                let env = env_proxy();
                if let (Some(u), false) = (&env, o.no_proxy.is_empty()) {
                    b = b.no_proxy().proxy(explicit(u, " (from the environment)")?);
                }
                env.map(|u| redact_userinfo(&u))
            }
        };
        let inner = b
            .build()
            .map_err(|e| config_err(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            inner,
            source: o.source.as_str().into(),
            proxy,
        })
    }

    /// The underlying `reqwest` client, to build requests.
    pub fn inner(&self) -> &reqwest::Client {
        &self.inner
    }

    /// The source name.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Sends `req`, naming the operation `what` in any error. The status is not checked.
    pub async fn send(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, HttpError> {
        req.send().await.map_err(|e| self.error(what, e))
    }

    /// Sends `req` and fails with [`HttpError::Status`] (quoting the start of the body) unless
    /// the server answers 2xx.
    pub async fn send_ok(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, HttpError> {
        let resp = self.send(what, req).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = self
            .body_limited(what, resp, 64 << 10)
            .await
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body);
        let text = text.trim();
        let mut excerpt: String = text.chars().take(EXCERPT).collect();
        if excerpt.len() < text.len() {
            excerpt.push('…');
        }
        Err(HttpError::Status {
            source_name: self.source.to_string(),
            what: what.into(),
            status: status.as_u16(),
            detail: if excerpt.is_empty() {
                String::new()
            } else {
                format!(": {excerpt}")
            },
        })
    }

    /// Reads a whole response body of at most `limit` bytes.
    pub async fn body_limited(
        &self,
        what: &str,
        mut resp: reqwest::Response,
        limit: usize,
    ) -> Result<Bytes, HttpError> {
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(self.too_large(what, limit));
        }
        let mut out = bytes::BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.error(what, e))? {
            if out.len() + chunk.len() > limit {
                return Err(self.too_large(what, limit));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    }

    fn too_large(&self, what: &str, limit: usize) -> HttpError {
        HttpError::Transfer {
            source_name: self.source.to_string(),
            what: what.into(),
            message: format!("response larger than {} KiB", limit >> 10),
        }
    }

    /// Maps a `reqwest` error to an [`HttpError`] for operation `what`.
    pub fn error(&self, what: &str, e: reqwest::Error) -> HttpError {
        let source_name = self.source.to_string();
        let host = e
            .url()
            .map(host_port)
            .unwrap_or_else(|| "the server".into());
        let e = e.without_url();
        if let Some(m) = ferry_tls::find_pin_mismatch(&e) {
            return HttpError::Tls {
                source_name,
                host,
                message: m.to_string(),
            };
        }
        if let Some(t) = find::<rustls::Error>(&e) {
            return HttpError::Tls {
                source_name,
                host,
                message: t.to_string(),
            };
        }
        if e.is_timeout() {
            return HttpError::Timeout {
                source_name,
                host,
                what: what.into(),
            };
        }
        if e.is_connect() {
            return HttpError::Connect {
                source_name,
                host,
                via: self
                    .proxy
                    .as_ref()
                    .map(|p| format!(" through proxy {p}"))
                    .unwrap_or_default(),
                message: chain(&e),
            };
        }
        HttpError::Transfer {
            source_name,
            what: what.into(),
            message: chain(&e),
        }
    }
}

/// The first proxy URL the environment names for HTTPS, as curl picks it.
fn env_proxy() -> Option<String> {
    ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// `host:port` of a URL, without user info, path or query.
fn host_port(u: &url::Url) -> String {
    match (u.host_str(), u.port_or_known_default()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => "the server".into(),
    }
}

/// A proxy URL with its password replaced by `***`.
fn redact_userinfo(u: &str) -> String {
    match url::Url::parse(u) {
        Ok(mut p) if p.password().is_some() => {
            let _ = p.set_password(Some("***"));
            p.to_string()
        }
        Ok(p) => p.to_string(),
        Err(_) => "(unparsable URL)".into(),
    }
}

fn find<'a, T: std::error::Error + 'static>(
    mut e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    loop {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(t) = io.get_ref().and_then(|i| find::<T>(i)) {
                return Some(t);
            }
        }
        e = e.source()?;
    }
}

/// An error and its causes as one line, repeated messages dropped.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(x) = cur {
        let s = x.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = x.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_passwords_are_redacted() {
        let s = format!(
            "{:?}",
            ProxySetting::Url("http://bob:hunter2@proxy:3128".into())
        );
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("bob"), "{s}");
    }

    #[test]
    fn host_port_drops_the_query() {
        let u = url::Url::parse("https://h:8443/import_raw_vdi?session_id=OpaqueRef:x").unwrap();
        assert_eq!(host_port(&u), "h:8443");
    }

    #[test]
    fn a_bad_proxy_url_is_a_config_error() {
        let mut o = ClientOptions::new("lab", Trust::Insecure);
        o.proxy = ProxySetting::Url("::not a url::".into());
        let e = HttpClient::new(&o).unwrap_err();
        assert!(matches!(e, HttpError::Config { .. }), "{e}");
        assert!(e.to_string().starts_with("source `lab`: proxy"), "{e}");
    }
}
