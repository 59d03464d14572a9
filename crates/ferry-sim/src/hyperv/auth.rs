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
//! - Kerberos (when configured, ADR 0159): a GSS-API Kerberos AP-REQ in `Negotiate …` or
//!   `Kerberos …`, checked with the service key from a keytab ([`super::kerberos`]); the AP-REP
//!   goes back in the answer's `WWW-Authenticate` (mutual authentication), the connection is
//!   authenticated and its messages are sealed under the scheme's protocol
//!   (`HTTP-SPNEGO-session-encrypted` for `Negotiate`, `HTTP-Kerberos-session-encrypted` for
//!   `Kerberos`);
//! - anything else is a 401 naming the schemes (`Negotiate`, `Basic realm="WSMAN"`).

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use ferry_http::Connection;
use ferry_wsman::kerberos::{KerberosServer, PROTOCOL_KERBEROS, is_kerberos};
use ferry_wsman::ntlm::{Accepted, NtlmServer, is_ntlm};
use ferry_wsman::sealed::{self, PROTOCOL_SPNEGO, Seal};
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
    /// NEGOTIATE seen, CHALLENGE sent (boxed: an acceptor is large).
    Pending(Box<NtlmServer>),
    /// Authenticated: the session and its sealed messages' protocol.
    Session(Box<dyn Seal + Send>, &'static str),
}

/// Authentication state of the simulator: the account and each connection's NTLM state.
pub(super) struct Auth {
    user: String,
    password: String,
    conns: Mutex<BTreeMap<(Channel, u64), ConnState>>,
    tamper: AtomicBool,
    logins: AtomicU64,
    kerberos: Option<KerberosServer>,
    /// AP-REPs to send with the answer to the request that carried the AP-REQ.
    ap_reps: Mutex<BTreeMap<(Channel, u64), HeaderValue>>,
    kerberos_logins: AtomicU64,
    /// Extended Protection on the HTTPS listener ([`super::cbt`]).
    cbt: Mutex<Option<super::cbt::CbtCheck>>,
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
            kerberos: None,
            ap_reps: Mutex::default(),
            kerberos_logins: AtomicU64::new(0),
            cbt: Mutex::default(),
        }
    }

    /// Checks channel bindings over HTTPS from now on (ADR 0172).
    pub(super) fn set_cbt(&self, check: Option<super::cbt::CbtCheck>) {
        *self.cbt.lock().unwrap_or_else(|p| p.into_inner()) = check;
    }

    /// Another HTTPS listener (a cluster node) with certificate `cert_der`: its binding is
    /// admitted too.
    pub(super) fn cbt_listener(&self, cert_der: &[u8]) -> Result<(), String> {
        match self.cbt.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(c) => c.add(cert_der),
            None => Ok(()),
        }
    }

    /// Also accepts Kerberos with `cfg`'s service key.
    pub(super) fn with_kerberos(
        mut self,
        cfg: Option<&super::kerberos::HypervKerberos>,
    ) -> Result<Self, String> {
        self.kerberos = cfg.map(|k| k.acceptor()).transpose()?;
        Ok(self)
    }

    /// Kerberos logins completed.
    pub(super) fn kerberos_logins(&self) -> u64 {
        self.kerberos_logins.load(Ordering::SeqCst)
    }

    /// Adds the AP-REP of the connection's Kerberos login to the answer (mutual
    /// authentication), when this request carried the AP-REQ.
    pub(super) fn mutual(&self, chan: Channel, conn: &Connection, mut r: Response) -> Response {
        let ap_rep = self
            .ap_reps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(chan, conn.id));
        if let Some(v) = ap_rep {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        r
    }

    /// Checks a Kerberos AP-REQ: the connection is authenticated, its AP-REP waits for the
    /// answer; or a 401.
    fn kerberos_login(
        &self,
        key: (Channel, u64),
        scheme: &str,
        token: &[u8],
    ) -> Result<(), Box<Response>> {
        let Some(server) = &self.kerberos else {
            tracing::debug!("refused a Kerberos token: Kerberos is not configured");
            return Err(challenge_401(None));
        };
        let accepted = server.accept(token).map_err(|e| {
            tracing::info!(error = %e, "Kerberos login refused");
            challenge_401(None)
        })?;
        let account = accepted.client.split('@').next().unwrap_or_default();
        if !account.eq_ignore_ascii_case(&self.user) {
            tracing::info!(client = %accepted.client, "Kerberos login refused: not the host's user");
            return Err(challenge_401(None));
        }
        tracing::debug!(client = %accepted.client, "Kerberos login");
        self.kerberos_logins.fetch_add(1, Ordering::SeqCst);
        let v = base64::engine::general_purpose::STANDARD.encode(&accepted.ap_rep);
        if let Ok(v) = HeaderValue::from_str(&format!("{scheme} {v}")) {
            self.ap_reps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, v);
        }
        // Windows seals under the scheme's protocol: SPNEGO's for `Negotiate` (what pywinrm and
        // Ferry send), Kerberos' for `Authorization: Kerberos` (MS-WSMV 2.2.9.1).
        let protocol = if scheme.eq_ignore_ascii_case("Kerberos") {
            PROTOCOL_KERBEROS
        } else {
            PROTOCOL_SPNEGO
        };
        let mut conns = self.conns();
        conns.insert(
            key,
            ConnState::Session(Box::new(accepted.session), protocol),
        );
        while conns.len() > MAX_CONNECTIONS {
            conns.pop_first();
        }
        Ok(())
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
        if ["Negotiate", "NTLM", "Kerberos"]
            .iter()
            .any(|s| scheme.eq_ignore_ascii_case(s))
        {
            match b64(value) {
                Some(t) if is_ntlm(&t) => self.handshake(key, scheme, &t)?,
                Some(t) if is_kerberos(&t) => self.kerberos_login(key, scheme, &t)?,
                _ => {
                    tracing::debug!("refused a Negotiate token that is neither NTLM nor Kerberos");
                    return Err(challenge_401(None));
                }
            }
            if body.is_empty() {
                return Ok(Admitted::Empty);
            }
        }
        let mut conns = self.conns();
        let Some(ConnState::Session(session, _)) = conns.get_mut(&key) else {
            return Err(challenge_401(None));
        };
        let encrypted = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(sealed::is_encrypted);
        if encrypted {
            match sealed::unwrap(session.as_mut(), &body) {
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
        let mut pending = match conns.remove(&key) {
            // An AUTHENTICATE continues the connection's handshake; a NEGOTIATE starts over.
            Some(ConnState::Pending(p)) if token.get(8) == Some(&3) => *p,
            _ => NtlmServer::new(&self.user, &self.password).map_err(|e| {
                tracing::warn!(error = %e, "NTLM acceptor");
                challenge_401(None)
            })?,
        };
        if let (Channel::Tls, Some(3)) = (key.0, token.get(8)) {
            let verdict = self
                .cbt
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|c| c.check(token));
            match verdict {
                Some(Err(why)) => {
                    tracing::info!(%why, "NTLM login refused: channel binding");
                    return Err(challenge_401(None));
                }
                Some(Ok(Some(binding))) => pending.bind_channel(&binding),
                _ => {}
            }
        }
        match pending.step(token) {
            Ok(Accepted::Challenge(t, server)) => {
                conns.insert(key, ConnState::Pending(Box::new(server)));
                while conns.len() > MAX_CONNECTIONS {
                    conns.pop_first();
                }
                let v = base64::engine::general_purpose::STANDARD.encode(t);
                Err(challenge_401(Some(format!("{scheme} {v}"))))
            }
            Ok(Accepted::Done(user, session)) => {
                tracing::debug!(user, "NTLM login");
                self.logins.fetch_add(1, Ordering::SeqCst);
                conns.insert(key, ConnState::Session(Box::new(session), PROTOCOL_SPNEGO));
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
        let Some(ConnState::Session(session, protocol)) = conns.get_mut(&key) else {
            return *challenge_401(None);
        };
        let protocol = *protocol;
        let mut body = match sealed::wrap(session.as_mut(), protocol, &plain) {
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
            [(header::CONTENT_TYPE, sealed::content_type(protocol))],
            body,
        )
            .into_response()
    }
}
