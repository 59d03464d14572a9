//! A XenAPI client on Ferry's HTTP stack (`ferry-http`: reqwest, rustls, pooled keep-alive
//! connections): JSON-RPC calls (`/jsonrpc`), `Async.*` calls with task polling, and raw VDI
//! transfers (`PUT /import_raw_vdi`, `GET /export_raw_vdi`) as streamed bodies, one 1 MiB
//! piece in memory at a time. TLS trust, proxies and timeouts come from the source's config.

use bytes::Bytes;
use ferry_core::{BlockSource, BlockTarget, Secret};
use ferry_http::{ClientOptions, HttpClient};
use ferry_hv::HvError;
use futures::StreamExt;
use serde_json::{Value as J, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::Mutex;

/// Longest an `Async.*` task may stay pending.
const TASK_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest RPC response accepted.
const MAX_RESPONSE: usize = 64 << 20;
/// Bytes of a raw VDI transfer held in memory at a time.
const PIECE: usize = 1 << 20;

/// A logged-in XenAPI connection.
pub struct XenClient {
    source: String,
    base: url::Url,
    http: HttpClient,
    session: Mutex<String>,
    ids: AtomicU64,
}

impl std::fmt::Debug for XenClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenClient")
            .field("url", &self.base.as_str())
            .finish_non_exhaustive()
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
    /// Connects to `url` (`https://host[:port]`) with the HTTP settings `http` and logs in.
    pub async fn login(
        url: &str,
        username: &str,
        password: &Secret,
        http: &ClientOptions,
    ) -> Result<Self, HvError> {
        let source = http.source.clone();
        let conn_err = |m: String| HvError::Connect {
            source_name: source.clone(),
            url: url.into(),
            message: m,
        };
        let base = url::Url::parse(url).map_err(|e| conn_err(format!("bad URL: {e}")))?;
        if base.scheme() != "https" {
            return Err(conn_err("the URL must start with https://".into()));
        }
        let me = Self {
            http: HttpClient::new(http)?,
            source: source.clone(),
            base,
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

    fn endpoint(&self, path: &str) -> url::Url {
        let mut u = self.base.clone();
        u.set_path(path);
        u.set_query(None);
        u
    }

    /// `/PATH?session_id=…&vdi=…&format=raw` (the query carries the session: never log it).
    async fn raw_vdi_url(&self, path: &str, vdi: &str) -> url::Url {
        self.vdi_url(path, vdi, "raw").await
    }

    async fn vdi_url(&self, path: &str, vdi: &str, format: &str) -> url::Url {
        let session = self.session().await;
        let mut u = self.endpoint(path);
        u.query_pairs_mut()
            .append_pair("session_id", &session)
            .append_pair("vdi", vdi)
            .append_pair("format", format);
        u
    }

    async fn raw_call(&self, method: &str, params: Vec<J>) -> Result<J, HvError> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id});
        let req = self
            .http
            .inner()
            .post(self.endpoint("/jsonrpc"))
            .json(&body);
        let resp = self.http.send(method, req).await?;
        let status = resp.status().as_u16();
        let body = self.http.body_limited(method, resp, MAX_RESPONSE).await?;
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

    /// Uploads `src` into the VDI `vdi` (ref or uuid) with `PUT /import_raw_vdi`, streamed:
    /// one piece is read from `src` when the connection can take it. Holes are sent as zeros
    /// (the raw format has no other way to say them).
    pub async fn import_raw(&self, vdi: &str, src: &dyn BlockSource) -> Result<(), HvError> {
        let size = src.size();
        let disk_err = |m: String| HvError::Disk {
            source_name: self.source.clone(),
            disk: vdi.to_string(),
            message: m,
        };
        // Ask the API first: a wrong or too small VDI gets the pool's own error, not a broken
        // pipe from an upload the pool stopped reading.
        let vdi_ref = if vdi.starts_with("OpaqueRef:") {
            vdi.to_string()
        } else {
            self.call_str("VDI.get_by_uuid", vec![json!(vdi)]).await?
        };
        let capacity: u64 = match self
            .call("VDI.get_virtual_size", vec![json!(vdi_ref)])
            .await?
        {
            J::Number(n) => n.as_u64().unwrap_or(0),
            J::String(s) => s.parse().unwrap_or(0),
            _ => 0,
        };
        if capacity < size {
            return Err(disk_err(format!(
                "import: the VDI holds {capacity} bytes, the disk has {size}"
            )));
        }
        let alloc = src
            .allocated(0..size)
            .await
            .map_err(|e| disk_err(format!("import: {e}")))?;
        // The body stream must own what it reads from: hand it a channel fed by this task.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let feed = async {
            let mut pos = 0u64;
            while pos < size {
                let n = (size - pos).min(PIECE as u64) as usize;
                let mut piece = vec![0u8; n];
                if alloc.intersects(pos..pos + n as u64) {
                    if let Err(e) = src.read_at(pos, &mut piece).await {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                        return Err(disk_err(format!("import: reading offset {pos}: {e}")));
                    }
                }
                if tx.send(Ok(Bytes::from(piece))).await.is_err() {
                    return Ok(()); // the request ended early; its error says why
                }
                pos += n as u64;
            }
            Ok(())
        };
        let body = reqwest::Body::wrap_stream(tokio_stream(rx));
        let req = self
            .http
            .inner()
            .put(self.raw_vdi_url("/import_raw_vdi", vdi).await)
            .header(reqwest::header::CONTENT_LENGTH, size)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        let (fed, sent) = tokio::join!(feed, self.http.send_ok("import_raw_vdi", req));
        fed?;
        sent.map_err(|e| disk_err(e.to_string()))?;
        Ok(())
    }

    /// Writes the VHD file `vhd` onto the existing VDI `vdi` with `PUT
    /// /import_raw_vdi?format=vhd`: xapi writes only the blocks the VHD allocates, so this
    /// applies a set of changes without sending the whole disk.
    pub async fn import_vhd(&self, vdi: &str, vhd: &std::path::Path) -> Result<(), HvError> {
        use std::os::unix::fs::FileExt;
        let disk_err = |m: String| HvError::Disk {
            source_name: self.source.clone(),
            disk: vdi.to_string(),
            message: m,
        };
        let f = std::fs::File::open(vhd)
            .map_err(|e| disk_err(format!("import: open {}: {e}", vhd.display())))?;
        let size = f
            .metadata()
            .map_err(|e| disk_err(format!("import: {e}")))?
            .len();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let feed = async {
            let mut pos = 0u64;
            while pos < size {
                let mut piece = vec![0u8; (size - pos).min(PIECE as u64) as usize];
                if let Err(e) = f.read_exact_at(&mut piece, pos) {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return Err(disk_err(format!("import: reading the VHD at {pos}: {e}")));
                }
                pos += piece.len() as u64;
                if tx.send(Ok(Bytes::from(piece))).await.is_err() {
                    return Ok(());
                }
            }
            Ok(())
        };
        let req = self
            .http
            .inner()
            .put(self.vdi_url("/import_raw_vdi", vdi, "vhd").await)
            .header(reqwest::header::CONTENT_LENGTH, size)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(tokio_stream(rx)));
        let (fed, sent) = tokio::join!(feed, self.http.send_ok("import_raw_vdi", req));
        fed?;
        sent.map_err(|e| disk_err(e.to_string()))?;
        Ok(())
    }

    /// Downloads the VDI `vdi` (ref or uuid) with `GET /export_raw_vdi` into `dst`, streamed;
    /// all-zero pieces are written as zeroes (sparse on targets that can). Returns the bytes
    /// received.
    pub async fn export_raw(&self, vdi: &str, dst: &dyn BlockTarget) -> Result<u64, HvError> {
        let disk_err = |m: String| HvError::Disk {
            source_name: self.source.clone(),
            disk: vdi.to_string(),
            message: m,
        };
        let req = self
            .http
            .inner()
            .get(self.raw_vdi_url("/export_raw_vdi", vdi).await);
        let resp = self
            .http
            .send_ok("export_raw_vdi", req)
            .await
            .map_err(|e| disk_err(e.to_string()))?;
        let expected = resp.content_length();
        if let Some(n) = expected.filter(|n| *n > dst.size()) {
            return Err(disk_err(format!(
                "export: the VDI has {n} bytes, the target only {}",
                dst.size()
            )));
        }
        let mut stream = resp.bytes_stream();
        let mut piece = Vec::with_capacity(PIECE);
        let mut pos = 0u64;
        loop {
            let next = stream.next().await;
            let end = next.is_none();
            if let Some(chunk) = next {
                let chunk = chunk
                    .map_err(|e| disk_err(self.http.error("export_raw_vdi", e).to_string()))?;
                piece.extend_from_slice(&chunk);
            }
            if piece.len() >= PIECE || (end && !piece.is_empty()) {
                let at = pos;
                if at + piece.len() as u64 > dst.size() {
                    return Err(disk_err(format!(
                        "export: more than the target's {} bytes received",
                        dst.size()
                    )));
                }
                let w = if piece.iter().all(|b| *b == 0) {
                    dst.write_zeroes(at, piece.len() as u64).await
                } else {
                    dst.write_at(at, &piece).await
                };
                w.map_err(|e| disk_err(format!("export: writing offset {at}: {e}")))?;
                pos += piece.len() as u64;
                piece.clear();
            }
            if end {
                break;
            }
        }
        if expected.is_some_and(|n| n != pos) {
            return Err(disk_err(format!(
                "export ended after {pos} of {} bytes",
                expected.unwrap_or_default()
            )));
        }
        dst.flush()
            .await
            .map_err(|e| disk_err(format!("export: flush: {e}")))?;
        Ok(pos)
    }

    /// Logs out (errors are logged, not returned: the session expires anyway).
    pub async fn logout(&self) {
        if let Err(e) = self.call("session.logout", vec![]).await {
            tracing::debug!(error = %e, "XenAPI logout failed");
        }
    }
}

/// The receiving end of a channel as a stream.
fn tokio_stream<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
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
