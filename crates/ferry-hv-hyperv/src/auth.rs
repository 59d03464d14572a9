//! WinRM authentication for [`crate::WsmanClient`] (ADR 0112, 0159): one SOAP exchange under
//! Basic, NTLM or Kerberos ([`crate::kerberos`]), with MS-WSMV message encryption.
//!
//! NTLM authenticates a connection, not a request: the client sends NEGOTIATE on an empty POST,
//! gets the CHALLENGE in a 401, sends AUTHENTICATE on a second empty POST on the same kept-alive
//! connection, and from then on sends bare requests there. Over HTTP every message is sealed
//! with the session (`multipart/encrypted`, [`ferry_wsman::sealed`]); over HTTPS TLS protects
//! them and they go in the clear (pywinrm's `message_encryption = 'auto'`). Exchanges are
//! serialized (the session's sequence numbers and cipher state advance per message). When a
//! request lands on a connection without the session (a 401, or a 400 to a sealed body: the
//! host closed ours, or the pool opened another), the host has not run it: the client logs in
//! again and resends, up to three logins per exchange.

use crate::client::Credentials;
use crate::error::HypervError;
use base64::Engine;
use ferry_http::HttpClient;
use ferry_wsman::ntlm::NtlmClient;
use ferry_wsman::sealed::{self, PROTOCOL_SPNEGO, Seal};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};

/// Largest reply accepted.
const MAX_REPLY: usize = 64 << 20;
const SOAP: &str = "application/soap+xml;charset=UTF-8";
/// Logins per exchange before a lost session is reported.
const MAX_ATTEMPTS: u32 = 5;

/// Lets the HTTP client put the connection just read back in its pool, so the next request
/// takes that connection (and its NTLM session) rather than opening another.
async fn settle() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
    // On a loaded host the connection task may not have run yet after the yields.
    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
}

/// How a [`crate::WsmanClient`] logs in (`auth` of a Hyper-V source).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AuthMethod {
    /// NTLM through `Negotiate`, with message encryption over HTTP (Windows' default).
    #[default]
    Ntlm,
    /// HTTP Basic (labs: `Basic = true`, and `AllowUnencrypted` over HTTP).
    Basic,
    /// Kerberos through `Negotiate`, tickets from the realm's KDC, with message encryption
    /// over HTTP (ADR 0159).
    Kerberos,
}

impl std::str::FromStr for AuthMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ntlm" => Ok(Self::Ntlm),
            "basic" => Ok(Self::Basic),
            "kerberos" => Ok(Self::Kerberos),
            o => Err(format!("unknown auth `{o}` (ntlm, basic or kerberos)")),
        }
    }
}

/// One client's authentication state.
#[derive(Debug)]
pub(crate) struct Auth {
    method: AuthMethod,
    domain: Option<String>,
    /// Seal messages (HTTP); over HTTPS TLS does it.
    encrypt: bool,
    host: String,
    kerberos: crate::kerberos::KerberosOptions,
    session: tokio::sync::Mutex<Option<Box<dyn Seal + Send>>>,
    /// Bind NTLM to the TLS channel (`channel-binding`, ADR 0172); `None`: the default (on).
    channel_binding: Option<bool>,
}

/// A reply: HTTP status and the (unsealed) body.
pub(crate) struct Exchanged {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Auth {
    pub(crate) fn new(method: AuthMethod, domain: Option<String>, url: &url::Url) -> Self {
        Self {
            method,
            domain,
            encrypt: url.scheme() == "http",
            host: url.host_str().unwrap_or("localhost").to_string(),
            kerberos: Default::default(),
            session: tokio::sync::Mutex::new(None),
            channel_binding: None,
        }
    }

    /// Whether NTLM binds its login to the TLS channel (ADR 0172).
    pub(crate) fn set_channel_binding(&mut self, on: bool) {
        self.channel_binding = Some(on);
    }

    pub(crate) fn method(&self) -> AuthMethod {
        self.method
    }

    /// Kerberos settings (realm, KDC, keytab).
    pub(crate) fn set_kerberos(&mut self, opts: crate::kerberos::KerberosOptions) {
        self.kerberos = opts;
    }

    /// Whether messages are sealed.
    pub(crate) fn encrypts(&self) -> bool {
        self.method != AuthMethod::Basic && self.encrypt
    }

    /// One login of the session's method.
    async fn login(
        &self,
        http: &HttpClient,
        url: &url::Url,
        creds: &Credentials,
        call: &str,
    ) -> Result<Box<dyn Seal + Send>, HypervError> {
        Ok(match self.method {
            AuthMethod::Kerberos => Box::new(
                crate::kerberos::handshake(
                    http,
                    url,
                    creds,
                    call,
                    &self.host,
                    self.domain.as_deref(),
                    &self.kerberos,
                )
                .await?,
            ),
            _ => Box::new(self.handshake(http, url, creds, call).await?),
        })
    }

    /// Sends `soap` and returns the reply (unsealed), or a login error on 401.
    pub(crate) async fn exchange(
        &self,
        http: &HttpClient,
        url: &url::Url,
        creds: &Credentials,
        call: &str,
        soap: String,
    ) -> Result<Exchanged, HypervError> {
        let login = || HypervError::Login {
            source_name: http.source().to_string(),
            call: call.into(),
            user: creds.user.clone(),
        };
        match self.method {
            AuthMethod::Basic => {
                let rb = http
                    .inner()
                    .post(url.clone())
                    .header(CONTENT_TYPE, SOAP)
                    .basic_auth(&creds.user, Some(creds.password.expose()))
                    .body(soap);
                let resp = http.send(call, rb).await?;
                let status = resp.status().as_u16();
                if status == 401 {
                    return Err(login());
                }
                let body = http.body_limited(call, resp, MAX_REPLY).await?.to_vec();
                Ok(Exchanged { status, body })
            }
            AuthMethod::Ntlm | AuthMethod::Kerberos => {
                let mut guard = self.session.lock().await;
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    if guard.is_none() {
                        match self.login(http, url, creds, call).await {
                            Ok(session) => *guard = Some(session),
                            // The AUTHENTICATE leg can land on another pooled connection than
                            // the NEGOTIATE leg (reqwest opened one while the first was not yet
                            // idle): that connection has no handshake, so start over. A wrong
                            // password fails every attempt.
                            Err(HypervError::Login { .. }) if attempt < MAX_ATTEMPTS => {
                                tracing::debug!(call, attempt, "login refused; starting over");
                                continue;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    let session = guard.as_mut().ok_or_else(login)?.as_mut();
                    let rb = http.inner().post(url.clone());
                    let rb = if self.encrypt {
                        let body = sealed::wrap(session, PROTOCOL_SPNEGO, soap.as_bytes())
                            .map_err(|e| {
                                HypervError::protocol(http.source(), call, e.to_string())
                            })?;
                        rb.header(CONTENT_TYPE, sealed::content_type(PROTOCOL_SPNEGO))
                            .body(body)
                    } else {
                        rb.header(CONTENT_TYPE, SOAP).body(soap.clone())
                    };
                    let resp = http.send(call, rb).await?;
                    let status = resp.status().as_u16();
                    // The request went on a connection that does not hold this session (the pool
                    // opened another, or the host closed ours): the host did not run it, so log
                    // in again and resend, a few times at most.
                    let lost = status == 401
                        || (status == 400
                            && self.encrypt
                            && !resp
                                .headers()
                                .get(CONTENT_TYPE)
                                .and_then(|v| v.to_str().ok())
                                .is_some_and(sealed::is_encrypted));
                    if lost {
                        *guard = None;
                        let _ = http.body_limited(call, resp, MAX_REPLY).await;
                        if attempt >= MAX_ATTEMPTS {
                            return Err(login());
                        }
                        tracing::debug!(call, status, "the session was lost; logging in again");
                        continue;
                    }
                    let ct = resp
                        .headers()
                        .get(CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let raw = http.body_limited(call, resp, MAX_REPLY).await?;
                    settle().await;
                    if sealed::is_encrypted(&ct) {
                        return match sealed::unwrap(session, &raw) {
                            Ok(body) => Ok(Exchanged { status, body }),
                            Err(e) => {
                                // Out of step for good: the next call logs in again.
                                *guard = None;
                                Err(HypervError::protocol(
                                    http.source(),
                                    call,
                                    format!("the reply was refused: {e} (altered in transit?)"),
                                ))
                            }
                        };
                    }
                    if self.encrypt && !raw.is_empty() {
                        *guard = None;
                        return Err(HypervError::protocol(
                            http.source(),
                            call,
                            format!(
                                "HTTP {status}: the host answered an encrypted session in the clear"
                            ),
                        ));
                    }
                    return Ok(Exchanged {
                        status,
                        body: raw.to_vec(),
                    });
                }
            }
        }
    }

    /// The two-leg NTLM handshake on empty POSTs (one kept-alive connection).
    async fn handshake(
        &self,
        http: &HttpClient,
        url: &url::Url,
        creds: &Credentials,
        call: &str,
    ) -> Result<ferry_wsman::ntlm::NtlmSession, HypervError> {
        let proto = |m: String| HypervError::protocol(http.source(), call, m);
        let login = || HypervError::Login {
            source_name: http.source().to_string(),
            call: call.into(),
            user: creds.user.clone(),
        };
        let (mut client, negotiate) = NtlmClient::start(
            &creds.user,
            self.domain.as_deref(),
            creds.password.expose(),
            &self.host,
        )
        .map_err(|e| proto(e.to_string()))?;
        let (status, challenge, cert) = leg_cert(http, url, call, &negotiate).await?;
        let binding =
            crate::binding::for_login(http.source(), url, self.channel_binding, cert.as_deref());
        if let Some(b) = &binding {
            client.bind_channel(b);
        }
        let challenge = match (status, challenge) {
            (401, Some(c)) => c,
            (401, None) => {
                return Err(proto(
                    "the host does not offer NTLM (no Negotiate challenge); enable Negotiate or set auth = \"basic\"".into(),
                ));
            }
            (s, _) => return Err(proto(format!("HTTP {s} to the NTLM NEGOTIATE message"))),
        };
        let (authenticate, session) = client
            .authenticate(&challenge)
            .map_err(|e| proto(e.to_string()))?;
        let (status, _) = leg(http, url, call, &authenticate).await?;
        match status {
            200..=299 => {
                tracing::debug!(call, user = %creds.user, "NTLM login");
                Ok(session)
            }
            401 if self.channel_binding == Some(false) && url.scheme() == "https" => Err(
                crate::binding::refused_unbound(http.source(), call, &creds.user),
            ),
            401 => Err(login()),
            s => Err(proto(format!("HTTP {s} to the NTLM AUTHENTICATE message"))),
        }
    }
}

/// One handshake leg: `token` in `Authorization: Negotiate` on an empty POST; the status and the
/// token of a `WWW-Authenticate: Negotiate|NTLM|Kerberos …` answer (an NTLM CHALLENGE, a
/// Kerberos AP-REP). The body is drained so the connection goes back to the pool for the next
/// leg.
pub(crate) async fn leg(
    http: &HttpClient,
    url: &url::Url,
    call: &str,
    token: &[u8],
) -> Result<(u16, Option<Vec<u8>>), HypervError> {
    let (status, answer, _) = leg_cert(http, url, call, token).await?;
    Ok((status, answer))
}

/// [`leg`], and the DER certificate of the server that answered (over HTTPS).
pub(crate) async fn leg_cert(
    http: &HttpClient,
    url: &url::Url,
    call: &str,
    token: &[u8],
) -> Result<(u16, Option<Vec<u8>>, Option<Vec<u8>>), HypervError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let rb = http
        .inner()
        .post(url.clone())
        .header(AUTHORIZATION, format!("Negotiate {}", b64.encode(token)))
        .header(CONTENT_TYPE, SOAP)
        .body(Vec::new());
    let resp = http.send(call, rb).await?;
    let status = resp.status().as_u16();
    let cert = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .map(<[u8]>::to_vec);
    let answer = resp
        .headers()
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            ["Negotiate", "NTLM", "Kerberos"]
                .iter()
                .any(|s| scheme.eq_ignore_ascii_case(s))
                .then(|| b64.decode(token.trim()).ok())
                .flatten()
        });
    let _ = http.body_limited(call, resp, MAX_REPLY).await?;
    settle().await;
    Ok((status, answer, cert))
}
