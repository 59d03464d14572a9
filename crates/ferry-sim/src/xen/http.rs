//! The simulator's HTTP side, an `axum::Router` served by `ferry-http` (hyper): XML-RPC (`/`,
//! `/RPC2`), JSON-RPC (`/jsonrpc`), `GET /export_raw_vdi` streamed from the VDI and
//! `PUT /import_raw_vdi` streamed into it (`Content-Length` or chunked). Keep-alive, chunked
//! bodies and HTTP/2 come from hyper; memory per transfer stays at one 1 MiB buffer.

use super::Shared;
use super::api::Failure;
use super::value::{self, Value};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;

const MAX_RPC_BODY: usize = value::MAX_XML;
/// Bytes read from or written to a VDI at a time.
const PIECE: usize = 1 << 20;
/// How much of a refused upload is read (and dropped) before the refusal is sent.
const DRAIN_LIMIT: u64 = 64 << 20;

type Q = Query<HashMap<String, String>>;

/// The routes of the XenAPI endpoint.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", post(xmlrpc))
        .route("/RPC2", post(xmlrpc))
        .route("/jsonrpc", post(jsonrpc))
        .route("/export_raw_vdi", get(export_raw))
        .route("/import_raw_vdi", put(import_raw))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "not found") })
        .with_state(shared)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    let mut b = body.into();
    b.push('\n');
    (status, [(header::CONTENT_TYPE, "text/plain")], b).into_response()
}

fn failure(status: StatusCode, f: &Failure) -> Response {
    text(status, f.0.join(" "))
}

async fn rpc_body(body: Body) -> Result<Bytes, Response> {
    axum::body::to_bytes(body, MAX_RPC_BODY)
        .await
        .map_err(|_| text(StatusCode::PAYLOAD_TOO_LARGE, "request too large"))
}

async fn xmlrpc(State(shared): State<Arc<Shared>>, body: Body) -> Response {
    let body = match rpc_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let html = |m: String| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/html")],
            format!("<html><body>{m}</body></html>"),
        )
            .into_response()
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return html("bad UTF-8".into());
    };
    let (method, params) = match value::decode_call(text) {
        Ok(x) => x,
        Err(e) => {
            tracing::info!(error = %e, "refused XML-RPC request");
            return html(e.to_string());
        }
    };
    let v = match super::dispatch(&shared, &method, params).await {
        Ok(v) => Value::record([("Status", Value::s("Success")), ("Value", v)]),
        Err(Failure(e)) => Value::record([
            ("Status", Value::s("Failure")),
            ("ErrorDescription", Value::strs(&e)),
        ]),
    };
    (
        [(header::CONTENT_TYPE, "text/xml")],
        value::encode_response(&v),
    )
        .into_response()
}

async fn jsonrpc(State(shared): State<Arc<Shared>>, body: Body) -> Response {
    let body = match rpc_body(body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let bad = |m: &str| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/html")],
            format!("<html><body>{m}</body></html>"),
        )
            .into_response()
    };
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(&body) else {
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
    let out = match (super::dispatch(&shared, method, params).await, v2) {
        (Ok(v), true) => serde_json::json!({"jsonrpc": "2.0", "result": v.to_json(), "id": id}),
        (Ok(v), false) => serde_json::json!({"result": v.to_json(), "error": null, "id": id}),
        (Err(Failure(e)), true) => serde_json::json!({"jsonrpc": "2.0",
            "error": {"code": 1, "message": e.first().cloned().unwrap_or_default(), "data": e.get(1..).unwrap_or(&[])},
            "id": id}),
        (Err(Failure(e)), false) => serde_json::json!({"result": null, "error": e, "id": id}),
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        out.to_string(),
    )
        .into_response()
}

async fn export_raw(State(shared): State<Arc<Shared>>, Query(q): Q) -> Response {
    let src = match super::export_vdi(&shared, &q).await {
        Ok(s) => s,
        Err(f) => return failure(StatusCode::FORBIDDEN, &f),
    };
    let size = src.size();
    // One piece in flight: hyper pulls the next only when the previous one is on the wire.
    let stream = futures::stream::try_unfold(0u64, move |pos| {
        let src = src.clone();
        async move {
            if pos >= size {
                return Ok::<_, std::io::Error>(None);
            }
            let n = (size - pos).min(PIECE as u64) as usize;
            let mut buf = vec![0u8; n];
            src.read_at(pos, &mut buf)
                .await
                .map_err(std::io::Error::other)?;
            Ok(Some((Bytes::from(buf), pos + n as u64)))
        }
    });
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn import_raw(
    State(shared): State<Arc<Shared>>,
    Query(q): Q,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Chunked uploads carry no length: the size is checked as the bytes arrive.
    let declared: Option<u64> = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let mut stream = body.into_data_stream();
    let (vdi, size) = match super::import_target(&shared, &q, declared.unwrap_or(0)).await {
        Ok(v) => v,
        Err(f) => {
            drain(&mut stream).await;
            return failure(StatusCode::FORBIDDEN, &f);
        }
    };
    if q.get("format").is_some_and(|f| f == "vhd") {
        return import_vhd(&shared, &vdi, size, stream).await;
    }
    let mut buf = Vec::with_capacity(PIECE);
    let mut pos = 0u64;
    loop {
        let next = stream.next().await;
        let end = next.is_none();
        if let Some(chunk) = next {
            match chunk {
                Ok(c) => buf.extend_from_slice(&c),
                Err(e) => {
                    tracing::debug!(error = %e, vdi, "import body broke off");
                    return text(StatusCode::BAD_REQUEST, format!("upload broke off: {e}"));
                }
            }
        }
        if buf.len() >= PIECE || (end && !buf.is_empty()) {
            if pos + buf.len() as u64 > size {
                let total = pos + buf.len() as u64 + drain(&mut stream).await;
                let f = Failure::new("VDI_TOO_SMALL", &[&vdi, &total.to_string()]);
                return failure(StatusCode::INTERNAL_SERVER_ERROR, &f);
            }
            if buf.iter().any(|b| *b != 0) {
                let mut st = shared.state.lock().await;
                if let Err(f) = st.write_vdi(&vdi, pos, &buf) {
                    return failure(StatusCode::INTERNAL_SERVER_ERROR, &f);
                }
            }
            pos += buf.len() as u64;
            buf.clear();
        }
        if end {
            break;
        }
    }
    if declared.is_some_and(|d| d != pos) {
        return text(StatusCode::BAD_REQUEST, "body shorter than Content-Length");
    }
    StatusCode::OK.into_response()
}

/// `format=vhd`: the body goes to a scratch file (a VHD is read by its footer and block table,
/// not front to back), then its allocated blocks are written into the VDI.
async fn import_vhd(
    shared: &Arc<Shared>,
    vdi: &str,
    size: u64,
    mut stream: axum::body::BodyDataStream,
) -> Response {
    use std::io::Write as _;
    let tmp = match tempfile::NamedTempFile::new() {
        Ok(t) => t,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("scratch file: {e}"),
            );
        }
    };
    let mut f = tmp.as_file();
    let mut total = 0u64;
    // A VHD of the disk is at most the disk plus its metadata; more is not a VHD of it.
    let limit = size + size / 8 + (4 << 20);
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                total += c.len() as u64;
                if total > limit {
                    let f = Failure::new("VDI_TOO_SMALL", &[vdi, &total.to_string()]);
                    drain(&mut stream).await;
                    return failure(StatusCode::INTERNAL_SERVER_ERROR, &f);
                }
                if let Err(e) = f.write_all(&c) {
                    return text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("scratch file: {e}"),
                    );
                }
            }
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("upload broke off: {e}")),
        }
    }
    match super::apply_vhd(shared, vdi, tmp.path()).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(f) => failure(StatusCode::INTERNAL_SERVER_ERROR, &f),
    }
}

/// Reads and drops up to [`DRAIN_LIMIT`] more of a body the server refuses, so a client still
/// sending gets to read the refusal instead of a reset. Returns the bytes dropped.
async fn drain(stream: &mut axum::body::BodyDataStream) -> u64 {
    let mut n = 0u64;
    while let Some(Ok(c)) = stream.next().await {
        n += c.len() as u64;
        if n > DRAIN_LIMIT {
            break;
        }
    }
    n
}
