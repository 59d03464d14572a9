//! A XenAPI client over HTTPS: JSON-RPC calls (`/jsonrpc`), `Async.*` calls with task
//! polling, and raw VDI upload (`PUT /import_raw_vdi`). TLS is pinned by certificate
//! fingerprint, or (labs only, warned) not verified. One short-lived connection per request
//! keeps the client free of connection-state bugs; XenAPI calls are few and coarse.

use ferry_core::{BlockSource, Secret};
use ferry_hv::HvError;
use rustls::pki_types::ServerName;
use serde_json::{Value as J, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

/// Longest an `Async.*` task may stay pending.
const TASK_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest RPC response accepted.
const MAX_RESPONSE: usize = 64 << 20;
/// Connect and per-request I/O timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// How to check the server's certificate.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Exactly this SHA-256 fingerprint (`sha256:AB:…`).
    Fingerprint(String),
    /// Anything (labs).
    Insecure,
}

/// A logged-in XenAPI connection.
pub struct XenClient {
    source: String,
    url: String,
    host: String,
    port: u16,
    tls: tokio_rustls::TlsConnector,
    session: Mutex<String>,
    ids: AtomicU64,
}

impl std::fmt::Debug for XenClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenClient")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The error code of an API failure (`SESSION_INVALID`, `VDI_NO_CBT_METADATA`, …).
pub fn api_code(e: &HvError) -> Option<&str> {
    match e {
        HvError::Api { message, .. } => message.split_whitespace().next(),
        _ => None,
    }
}

impl XenClient {
    /// Connects to `url` (`https://host[:port]`) and logs in.
    pub async fn login(
        source: &str,
        url: &str,
        username: &str,
        password: &Secret,
        trust: Trust,
    ) -> Result<Self, HvError> {
        let conn_err = |m: String| HvError::Connect {
            source_name: source.into(),
            url: url.into(),
            message: m,
        };
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| conn_err("the URL must start with https://".into()))?;
        let hostport = rest.split('/').next().unwrap_or(rest);
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_matches(['[', ']']).to_string(),
                p.parse().map_err(|_| conn_err(format!("bad port `{p}`")))?,
            ),
            _ => (hostport.trim_matches(['[', ']']).to_string(), 443),
        };
        let config = match &trust {
            Trust::Fingerprint(fp) => {
                let d = ferry_nbd::uri::parse_fingerprint(fp)
                    .ok_or_else(|| conn_err(format!("bad TLS fingerprint `{fp}`")))?;
                ferry_nbd::tls::client_config(&ferry_nbd::TlsVerify::Fingerprint(d))
                    .map_err(conn_err)?
            }
            Trust::Insecure => {
                tracing::warn!(
                    source,
                    url,
                    "TLS certificate NOT verified (tls-insecure = true)"
                );
                let p = Arc::new(rustls::crypto::ring::default_provider());
                Arc::new(
                    rustls::ClientConfig::builder_with_provider(p.clone())
                        .with_safe_default_protocol_versions()
                        .map_err(|e| conn_err(e.to_string()))?
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(AcceptAny(p)))
                        .with_no_client_auth(),
                )
            }
        };
        let me = Self {
            source: source.into(),
            url: url.into(),
            host,
            port,
            tls: tokio_rustls::TlsConnector::from(config),
            session: Mutex::new(String::new()),
            ids: AtomicU64::new(1),
        };
        let s = me
            .raw_call(
                "session.login_with_password",
                vec![
                    json!(username),
                    json!(password.expose()),
                    json!("2.21"),
                    json!("ferry"),
                ],
            )
            .await?;
        *me.session.lock().await = s.as_str().unwrap_or_default().to_string();
        Ok(me)
    }

    /// The source name (for messages).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The session ref (a credential: never log it).
    pub async fn session(&self) -> String {
        self.session.lock().await.clone()
    }

    fn conn_err(&self, m: impl Into<String>) -> HvError {
        HvError::Connect {
            source_name: self.source.clone(),
            url: self.url.clone(),
            message: m.into(),
        }
    }

    async fn connect(
        &self,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, HvError> {
        let tcp = tokio::time::timeout(
            IO_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| self.conn_err("connect timed out"))?
        .map_err(|e| self.conn_err(format!("connect: {e}")))?;
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| self.conn_err(format!("bad host name: {e}")))?;
        self.tls
            .connect(name, tcp)
            .await
            .map_err(|e| self.conn_err(format!("TLS: {e}")))
    }

    async fn read_response(
        &self,
        mut s: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    ) -> Result<(u16, Vec<u8>), HvError> {
        let mut buf = Vec::new();
        let read = async {
            let mut chunk = vec![0u8; 64 << 10];
            loop {
                let n = match s.read(&mut chunk).await {
                    Ok(n) => n,
                    // Servers that close without close_notify: treat as the end.
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                    Err(e) => return Err(e),
                };
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_RESPONSE {
                    return Err(std::io::Error::other("response too large"));
                }
                if let Some(h) = find(&buf, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..h]).to_ascii_lowercase();
                    if let Some(len) = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                    {
                        if buf.len() >= h + 4 + len {
                            buf.truncate(h + 4 + len);
                            return Ok(());
                        }
                    }
                }
            }
        };
        tokio::time::timeout(IO_TIMEOUT, read)
            .await
            .map_err(|_| self.conn_err("response timed out"))?
            .map_err(|e| self.conn_err(format!("read response: {e}")))?;
        let h = find(&buf, b"\r\n\r\n").ok_or_else(|| self.conn_err("truncated HTTP response"))?;
        let status = String::from_utf8_lossy(&buf[..h])
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.conn_err("malformed HTTP status line"))?;
        Ok((status, buf[h + 4..].to_vec()))
    }

    async fn raw_call(&self, method: &str, params: Vec<J>) -> Result<J, HvError> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let body =
            json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id}).to_string();
        let mut s = self.connect().await?;
        let head = format!(
            "POST /jsonrpc HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: ferry\r\n\r\n",
            self.host,
            body.len()
        );
        s.write_all(head.as_bytes())
            .await
            .and(s.write_all(body.as_bytes()).await)
            .and(s.flush().await)
            .map_err(|e| self.conn_err(format!("send {method}: {e}")))?;
        let (status, body) = self.read_response(s).await?;
        let api = |message: String, retryable: bool| HvError::Api {
            source_name: self.source.clone(),
            call: method.to_string(),
            message,
            retryable,
        };
        if status != 200 {
            return Err(api(format!("HTTP {status}"), status >= 500));
        }
        let v: J = serde_json::from_slice(&body)
            .map_err(|e| api(format!("malformed JSON-RPC response: {e}"), false))?;
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            let code = e
                .get("message")
                .and_then(J::as_str)
                .unwrap_or("UNKNOWN")
                .to_string();
            let data: Vec<String> = e
                .get("data")
                .and_then(J::as_array)
                .map(|a| {
                    a.iter()
                        .map(|x| {
                            x.as_str()
                                .map(String::from)
                                .unwrap_or_else(|| x.to_string())
                        })
                        .collect()
                })
                .unwrap_or_default();
            // Never echo params of a login failure (they may hold the user's input).
            let retry = matches!(
                code.as_str(),
                "SESSION_INVALID" | "TOO_BUSY" | "OTHER_OPERATION_IN_PROGRESS"
            );
            return Err(api(
                format!("{code} {}", data.join(" ")).trim().to_string(),
                retry,
            ));
        }
        Ok(v.get("result").cloned().unwrap_or(J::Null))
    }

    /// Calls `method` with the session prepended to `params`.
    pub async fn call(&self, method: &str, params: Vec<J>) -> Result<J, HvError> {
        let mut p = vec![J::String(self.session().await)];
        p.extend(params);
        self.raw_call(method, p).await
    }

    /// A call whose result is a string (a ref, a uuid).
    pub async fn call_str(&self, method: &str, params: Vec<J>) -> Result<String, HvError> {
        Ok(self
            .call(method, params)
            .await?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Runs `Async.<method>`, polls its task until it ends, destroys the task and returns the
    /// result (XenAPI hands it back as an XML-RPC `<value>` document; refs are unwrapped).
    /// `on_task` sees the task ref as soon as it exists (for the crash journal).
    pub async fn call_async(
        &self,
        method: &str,
        params: Vec<J>,
        on_task: impl FnOnce(&str),
    ) -> Result<String, HvError> {
        let task = self.call_str(&format!("Async.{method}"), params).await?;
        on_task(&task);
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(20);
        let result = loop {
            let rec = self.call("task.get_record", vec![json!(task)]).await?;
            match rec.get("status").and_then(J::as_str).unwrap_or("") {
                "pending" | "cancelling" => {}
                "success" => {
                    let r = rec
                        .get("result")
                        .and_then(J::as_str)
                        .unwrap_or("")
                        .trim()
                        .to_string();
                    break Ok(unwrap_value(&r));
                }
                other => {
                    let info: Vec<String> = rec
                        .get("error_info")
                        .and_then(J::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default();
                    break Err(HvError::Api {
                        source_name: self.source.clone(),
                        call: format!("Async.{method} (task {other})"),
                        message: info.join(" "),
                        retryable: false,
                    });
                }
            }
            if started.elapsed() > TASK_TIMEOUT {
                let _ = self.call("task.cancel", vec![json!(task)]).await;
                break Err(HvError::Api {
                    source_name: self.source.clone(),
                    call: format!("Async.{method}"),
                    message: "task did not finish in time".into(),
                    retryable: true,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        };
        if let Err(e) = self.call("task.destroy", vec![json!(task)]).await {
            tracing::warn!(error = %e, "cannot destroy XenAPI task");
        }
        result
    }

    /// Uploads `src` into the VDI `vdi` (ref or uuid) with `PUT /import_raw_vdi`.
    pub async fn import_raw(&self, vdi: &str, src: &dyn BlockSource) -> Result<(), HvError> {
        let session = self.session().await;
        let size = src.size();
        let mut s = self.connect().await?;
        let head = format!(
            "PUT /import_raw_vdi?session_id={session}&vdi={vdi}&format=raw HTTP/1.1\r\nHost: {}\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n",
            self.host
        );
        let disk_err = |m: String| HvError::Disk {
            source_name: self.source.clone(),
            disk: vdi.to_string(),
            message: m,
        };
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| disk_err(format!("import: {e}")))?;
        let mut buf = vec![0u8; 1 << 20];
        let alloc = src
            .allocated(0..size)
            .await
            .map_err(|e| disk_err(format!("import: {e}")))?;
        let mut pos = 0u64;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..n];
            if alloc.intersects(pos..pos + n as u64) {
                src.read_at(pos, chunk)
                    .await
                    .map_err(|e| disk_err(format!("import: {e}")))?;
            } else {
                chunk.fill(0);
            }
            s.write_all(chunk)
                .await
                .map_err(|e| disk_err(format!("import at offset {pos}: {e}")))?;
            pos += n as u64;
        }
        s.flush()
            .await
            .map_err(|e| disk_err(format!("import: {e}")))?;
        let (status, body) = self.read_response(s).await?;
        if status != 200 {
            return Err(disk_err(format!(
                "import_raw_vdi answered HTTP {status}: {}",
                String::from_utf8_lossy(&body).trim()
            )));
        }
        Ok(())
    }

    /// Logs out (errors are logged, not returned: the session expires anyway).
    pub async fn logout(&self) {
        if let Err(e) = self.call("session.logout", vec![]).await {
            tracing::debug!(error = %e, "XenAPI logout failed");
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// `<value>OpaqueRef:…</value>` → `OpaqueRef:…` (also `<value><string>…</string></value>`).
pub fn unwrap_value(s: &str) -> String {
    let mut t = s.trim();
    for (open, close) in [("<value>", "</value>"), ("<string>", "</string>")] {
        if let Some(inner) = t.strip_prefix(open).and_then(|x| x.strip_suffix(close)) {
            t = inner.trim();
        }
    }
    t.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwraps_task_results() {
        assert_eq!(unwrap_value("<value>OpaqueRef:1</value>"), "OpaqueRef:1");
        assert_eq!(
            unwrap_value("<value><string>a&amp;b</string></value>"),
            "a&b"
        );
        assert_eq!(unwrap_value(""), "");
    }
}
