//! A small HTTP/1.1 server over TLS: XML-RPC (`/`, `/RPC2`), JSON-RPC (`/jsonrpc`),
//! `GET /export_raw_vdi` and `PUT /import_raw_vdi`. Requests carry `Content-Length` (chunked
//! bodies are refused with 411); connections are kept alive until the client closes them.

use super::Shared;
use super::api::Failure;
use super::value::{self, Value};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

const MAX_HEAD: usize = 64 << 10;
const MAX_RPC_BODY: u64 = value::MAX_XML as u64;

struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_head<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> std::io::Result<Option<Request>> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head).await?;
        if n == 0 {
            return Ok(None);
        }
        if head.len() > MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") || head == b"\r\n" {
            if head == b"\r\n" {
                head.clear();
                continue;
            }
            break;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Some(Request {
        method,
        path: path.to_string(),
        query,
        headers,
    }))
}

async fn respond<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: &str,
    ctype: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    w.write_all(head.as_bytes()).await?;
    w.write_all(body).await?;
    w.flush().await
}

/// Serves one connection until the client closes it.
pub(crate) async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(
    shared: Arc<Shared>,
    stream: S,
) -> std::io::Result<()> {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::new(rd);
    while let Some(req) = read_head(&mut rd).await? {
        if req
            .headers
            .get("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            respond(
                &mut wr,
                "411 Length Required",
                "text/plain",
                b"chunked bodies are not supported\n",
            )
            .await?;
            return Ok(());
        }
        let len: u64 = req
            .headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        tracing::debug!(method = %req.method, path = %req.path, len, "XenAPI HTTP request");
        match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/" | "/RPC2" | "/jsonrpc") => {
                if len > MAX_RPC_BODY {
                    respond(
                        &mut wr,
                        "413 Payload Too Large",
                        "text/plain",
                        b"request too large\n",
                    )
                    .await?;
                    return Ok(());
                }
                let mut body = vec![0u8; len as usize];
                rd.read_exact(&mut body).await?;
                let (status, ctype, out) = if req.path == "/jsonrpc" {
                    jsonrpc(&shared, &body).await
                } else {
                    xmlrpc(&shared, &body).await
                };
                respond(&mut wr, status, ctype, &out).await?;
            }
            ("GET", "/export_raw_vdi") => match super::export_vdi(&shared, &req.query).await {
                Ok(src) => {
                    let size = src.size();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
                    );
                    wr.write_all(head.as_bytes()).await?;
                    let mut buf = vec![0u8; 1 << 20];
                    let mut pos = 0;
                    while pos < size {
                        let n = (size - pos).min(buf.len() as u64) as usize;
                        src.read_at(pos, &mut buf[..n])
                            .await
                            .map_err(std::io::Error::other)?;
                        wr.write_all(&buf[..n]).await?;
                        pos += n as u64;
                    }
                    wr.flush().await?;
                }
                Err(f) => {
                    respond(
                        &mut wr,
                        "403 Forbidden",
                        "text/plain",
                        format!("{:?}\n", f.0).as_bytes(),
                    )
                    .await?
                }
            },
            ("PUT", "/import_raw_vdi") => {
                let vdi = match super::import_target(&shared, &req.query, len).await {
                    Ok(v) => v,
                    Err(f) => {
                        respond(
                            &mut wr,
                            "403 Forbidden",
                            "text/plain",
                            format!("{:?}\n", f.0).as_bytes(),
                        )
                        .await?;
                        return Ok(());
                    }
                };
                let mut buf = vec![0u8; 1 << 20];
                let mut pos = 0u64;
                let mut failed = None;
                while pos < len {
                    let n = (len - pos).min(buf.len() as u64) as usize;
                    rd.read_exact(&mut buf[..n]).await?;
                    if failed.is_none() && buf[..n].iter().any(|b| *b != 0) {
                        let mut st = shared.state.lock().await;
                        if let Err(f) = st.write_vdi(&vdi, pos, &buf[..n]) {
                            failed = Some(f);
                        }
                    }
                    pos += n as u64;
                }
                match failed {
                    None => respond(&mut wr, "200 OK", "text/plain", b"").await?,
                    Some(f) => {
                        respond(
                            &mut wr,
                            "500 Internal Server Error",
                            "text/plain",
                            format!("{:?}\n", f.0).as_bytes(),
                        )
                        .await?
                    }
                }
            }
            _ => {
                // Drain the body so the connection stays usable.
                tokio::io::copy(&mut (&mut rd).take(len), &mut tokio::io::sink()).await?;
                respond(&mut wr, "404 Not Found", "text/plain", b"not found\n").await?;
            }
        }
        if req
            .headers
            .get("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            return Ok(());
        }
    }
    Ok(())
}

async fn xmlrpc(shared: &Arc<Shared>, body: &[u8]) -> (&'static str, &'static str, Vec<u8>) {
    let Ok(text) = std::str::from_utf8(body) else {
        return (
            "500 Internal Server Error",
            "text/html",
            b"<html><body>bad UTF-8</body></html>".to_vec(),
        );
    };
    let (method, params) = match value::decode_call(text) {
        Ok(x) => x,
        Err(e) => {
            tracing::info!(error = %e, "refused XML-RPC request");
            return (
                "500 Internal Server Error",
                "text/html",
                format!("<html><body>{e}</body></html>").into_bytes(),
            );
        }
    };
    let v = match super::dispatch(shared, &method, params).await {
        Ok(v) => Value::record([("Status", Value::s("Success")), ("Value", v)]),
        Err(Failure(e)) => Value::record([
            ("Status", Value::s("Failure")),
            ("ErrorDescription", Value::strs(&e)),
        ]),
    };
    (
        "200 OK",
        "text/xml",
        value::encode_response(&v).into_bytes(),
    )
}

async fn jsonrpc(shared: &Arc<Shared>, body: &[u8]) -> (&'static str, &'static str, Vec<u8>) {
    let bad = |m: &str| {
        (
            "500 Internal Server Error",
            "text/html",
            format!("<html><body>{m}</body></html>").into_bytes(),
        )
    };
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(body) else {
        return bad("malformed JSON");
    };
    let (Some(method), Some(id)) = (req.get("method").and_then(|m| m.as_str()), req.get("id"))
    else {
        return bad("missing method or id");
    };
    if id.is_null() {
        return bad("null id");
    }
    let params: Vec<Value> = match req.get("params") {
        Some(serde_json::Value::Array(a)) => a.iter().map(Value::from_json).collect(),
        None => vec![],
        Some(_) => return bad("params must be an array"),
    };
    let v2 = req.get("jsonrpc").and_then(|v| v.as_str()) == Some("2.0");
    let out = match (super::dispatch(shared, method, params).await, v2) {
        (Ok(v), true) => serde_json::json!({"jsonrpc": "2.0", "result": v.to_json(), "id": id}),
        (Ok(v), false) => serde_json::json!({"result": v.to_json(), "error": null, "id": id}),
        (Err(Failure(e)), true) => serde_json::json!({"jsonrpc": "2.0",
            "error": {"code": 1, "message": e.first().cloned().unwrap_or_default(), "data": e.get(1..).unwrap_or(&[])},
            "id": id}),
        (Err(Failure(e)), false) => serde_json::json!({"result": null, "error": e, "id": id}),
    };
    ("200 OK", "application/json", out.to_string().into_bytes())
}
