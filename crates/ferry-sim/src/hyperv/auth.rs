//! The simulator's WinRM authentication, as Windows' WinRM service does it (ADR 0112):
//!
//! - `Basic` (labs; `AllowUnencrypted` for plain HTTP), checked on every request;
//! - NTLM in `Authorization: Negotiate …` or `NTLM …` (raw NTLM tokens, the acceptor from
//!   `sspi`): NEGOTIATE → 401 with the CHALLENGE, AUTHENTICATE → the connection is
//!   authenticated and the request is served. Later requests on that connection carry no
//!   `Authorization`;
//! - message encryption (MS-WSMV 2.2.9.1): a `multipart/encrypted` request is unsealed with the
//!   connection's session and its reply sealed. Over plain HTTP an unsealed body after NTLM is
//!   refused with 401 (WinRM's `AllowUnencrypted = false`); over HTTPS it is served;
//! - anything else is a 401 naming the schemes (`Negotiate`, `Basic realm="WSMAN"`).

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ferry_http::Connection;
use ferry_wsman::ntlm::{Accepted, NtlmServer, NtlmSession, is_ntlm};
use ferry_wsman::sealed::{self, PROTOCOL_SPNEGO};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Connections whose state is kept; the oldest are forgotten beyond this.
const MAX_CONNECTIONS: usize = 256;
/// Largest reply sealed.
const MAX_REPLY: usize = 64 << 20;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Channel {
    /// HTTPS (5986): TLS protects the body; message encryption is optional.
    Tls,
    /// HTTP (5985): after NTLM, message encryption is required.
    Plain,
}

enum ConnState {
    /// NEGOTIATE seen, CHALLENGE sent.
    Pending(NtlmServer),
    /// Authenticated.
    Session(NtlmSession),
}

/// Authentication state of the simulator: the account and each connection's NTLM state.
pub(super) struct Auth {
    user: String,
    password: String,
    conns: Mutex<BTreeMap<(Channel, u64), ConnState>>,
    tamper: AtomicBool,
    logins: AtomicU64,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// How to answer a request that was let in.
pub(super) enum Admitted {
    /// Serve this body and reply in the clear.
    Clear(Bytes),
    /// Serve this unsealed body and seal the reply with the connection's session.
    Sealed(Vec<u8>, (Channel, u64)),
    /// The NTLM handshake finished on an empty body (pywinrm/pypsrp set up the context so):
    /// an empty 200.
    Empty,
}

fn challenge_401(extra: Option<String>) -> Box<Response> {
    let mut r = StatusCode::UNAUTHORIZED.into_response();
    let h = r.headers_mut();
    match extra {
        Some(v) => {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.append(header::WWW_AUTHENTICATE, v);
            }
        }
        None => {
            h.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Negotiate"),
            );
            h.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"WSMAN\""),
            );
        }
    }
    Box::new(r)
}

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
}

impl Auth {
    pub(super) fn new(user: &str, password: &str) -> Self {
        Self {
            user: user.into(),
            password: password.into(),
            conns: Mutex::default(),
            tamper: AtomicBool::new(false),
            logins: AtomicU64::new(0),
        }
    }

    /// NTLM logins completed (a client that keeps its connection logs in once).
    pub(super) fn logins(&self) -> u64 {
        self.logins.load(Ordering::SeqCst)
    }

    /// Tests: flip a bit in the next sealed reply.
    pub(super) fn tamper_next_reply(&self) {
        self.tamper.store(true, Ordering::SeqCst);
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Channel, u64), ConnState>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn basic_ok(&self, b64v: &str) -> bool {
        let want = format!("{}:{}", self.user, self.password);
        b64(b64v).is_some_and(|raw| raw == want.as_bytes())
    }

    /// Decides what to do with a request: let it in (and how) or answer it right away (boxed:
    /// a response is large next to the admitted cases).
    pub(super) fn admit(
        &self,
        chan: Channel,
        conn: &Connection,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Admitted, Box<Response>> {
        let key = (chan, conn.id);
        let authz = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let (scheme, value) = authz.split_once(' ').unwrap_or((authz, ""));
        if scheme.eq_ignore_ascii_case("Basic") {
            return if self.basic_ok(value) {
                Ok(Admitted::Clear(body))
            } else {
                Err(challenge_401(None))
            };
        }
        if scheme.eq_ignore_ascii_case("Negotiate") || scheme.eq_ignore_ascii_case("NTLM") {
            let token = b64(value).filter(|t| is_ntlm(t)).ok_or_else(|| {
                tracing::debug!("refused a Negotiate token that is not NTLM");
                challenge_401(None)
            })?;
            self.handshake(key, scheme, &token)?;
            if body.is_empty() {
                return Ok(Admitted::Empty);
            }
        }
        let mut conns = self.conns();
        let Some(ConnState::Session(session)) = conns.get_mut(&key) else {
            return Err(challenge_401(None));
        };
        let encrypted = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(sealed::is_encrypted);
        if encrypted {
            match sealed::unwrap(session, &body) {
                Ok(plain) => Ok(Admitted::Sealed(plain, key)),
                Err(e) => {
                    // A session out of step cannot recover: forget it, like WinRM.
                    conns.remove(&key);
                    tracing::debug!(error = %e, "refused an encrypted request");
                    Err(Box::new(
                        (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
                    ))
                }
            }
        } else if chan == Channel::Tls {
            Ok(Admitted::Clear(body))
        } else {
            tracing::debug!("refused an unencrypted request over HTTP after NTLM");
            Err(challenge_401(None))
        }
    }

    fn handshake(
        &self,
        key: (Channel, u64),
        scheme: &str,
        token: &[u8],
    ) -> Result<(), Box<Response>> {
        let mut conns = self.conns();
        let pending = match conns.remove(&key) {
            // An AUTHENTICATE continues the connection's handshake; a NEGOTIATE starts over.
            Some(ConnState::Pending(p)) if token.get(8) == Some(&3) => p,
            _ => NtlmServer::new(&self.user, &self.password).map_err(|e| {
                tracing::warn!(error = %e, "NTLM acceptor");
                challenge_401(None)
            })?,
        };
        match pending.step(token) {
            Ok(Accepted::Challenge(t, server)) => {
                conns.insert(key, ConnState::Pending(server));
                while conns.len() > MAX_CONNECTIONS {
                    conns.pop_first();
                }
                let v = base64::engine::general_purpose::STANDARD.encode(t);
                Err(challenge_401(Some(format!("{scheme} {v}"))))
            }
            Ok(Accepted::Done(user, session)) => {
                tracing::debug!(user, "NTLM login");
                self.logins.fetch_add(1, Ordering::SeqCst);
                conns.insert(key, ConnState::Session(session));
                Ok(())
            }
            Err(e) => {
                tracing::debug!(error = %e, "NTLM login refused");
                Err(challenge_401(None))
            }
        }
    }

    /// Seals `reply` with the session of `key` (keeping its status).
    pub(super) async fn seal(&self, key: (Channel, u64), reply: Response) -> Response {
        let status = reply.status();
        let plain = match axum::body::to_bytes(reply.into_body(), MAX_REPLY).await {
            Ok(b) => b,
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        };
        let mut conns = self.conns();
        let Some(ConnState::Session(session)) = conns.get_mut(&key) else {
            return *challenge_401(None);
        };
        let mut body = match sealed::wrap(session, PROTOCOL_SPNEGO, &plain) {
            Ok(b) => b,
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        };
        if self.tamper.swap(false, Ordering::SeqCst) {
            let n = body.len().saturating_sub(30);
            if let Some(b) = body.get_mut(n) {
                *b ^= 0x01;
            }
        }
        (
            status,
            [(header::CONTENT_TYPE, sealed::content_type(PROTOCOL_SPNEGO))],
            body,
        )
            .into_response()
    }
}
