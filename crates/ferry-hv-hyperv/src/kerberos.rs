//! WinRM Kerberos login for [`crate::WsmanClient`] (ADR 0159): tickets from the KDC through
//! `ferry_wsman::kerberos` (sspi), its KDC messages carried here over TCP or UDP, then one
//! HTTP leg: the AP-REQ in `Authorization: Negotiate …` on an empty POST, the acceptor's AP-REP
//! in the 200's `WWW-Authenticate` (mutual authentication). The session then seals messages
//! like NTLM's, under the `Negotiate` scheme's `application/HTTP-SPNEGO-session-encrypted`.

use crate::client::Credentials;
use crate::error::HypervError;
use ferry_http::HttpClient;
use ferry_wsman::kerberos::{
    ClientSecret, KdcTransport, KerberosClient, KerberosSession, parse_keytab, principal,
};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

/// Per-KDC connect and reply timeout (MIT waits 1 s per UDP try, Windows 5 s per TCP connect).
const KDC_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest KDC reply accepted.
const MAX_KDC_REPLY: usize = 1 << 20;

/// Kerberos settings of a source (`realm`, `kdc`, `keytab`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KerberosOptions {
    /// The realm, when the user name carries none (`alice@REALM`, `REALM\alice`).
    pub realm: Option<String>,
    /// The KDC (`host[:port]`, `tcp://…`, `udp://…`); else `KRB5_CONFIG`'s realm entry, then DNS.
    pub kdc: Option<String>,
    /// A keytab with the user's key, used instead of the password.
    pub keytab: Option<PathBuf>,
}

/// KDC messages over std sockets (the login runs on a blocking thread).
struct Sockets;

impl KdcTransport for Sockets {
    fn exchange(
        &self,
        tcp: bool,
        host: &str,
        port: u16,
        message: &[u8],
    ) -> Result<Vec<u8>, String> {
        use std::net::ToSocketAddrs;
        let addrs: Vec<_> = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve: {e}"))?
            .collect();
        let mut last = "no address".to_string();
        for addr in addrs {
            let r = if tcp {
                tcp_exchange(addr, message)
            } else {
                udp_exchange(addr, message)
            };
            match r {
                Ok(reply) => return Ok(reply),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    }
}

fn tcp_exchange(addr: std::net::SocketAddr, message: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, KDC_TIMEOUT)?;
    s.set_read_timeout(Some(KDC_TIMEOUT))?;
    s.set_write_timeout(Some(KDC_TIMEOUT))?;
    s.write_all(message)?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_KDC_REPLY {
        return Err(std::io::Error::other(format!("a {n}-byte reply")));
    }
    let mut reply = vec![0u8; 4 + n];
    reply[..4].copy_from_slice(&len);
    s.read_exact(&mut reply[4..])?;
    Ok(reply)
}

fn udp_exchange(addr: std::net::SocketAddr, message: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: std::net::SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let s = std::net::UdpSocket::bind(local)?;
    s.set_read_timeout(Some(KDC_TIMEOUT))?;
    s.connect(addr)?;
    s.send(message)?;
    let mut buf = vec![0u8; 65536];
    let n = s.recv(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// The user's secret: the keytab's newest key for `account@realm`, else the password.
fn secret(
    creds: &Credentials,
    opts: &KerberosOptions,
    account: &str,
    realm: &str,
) -> Result<ClientSecret, String> {
    let Some(path) = &opts.keytab else {
        return Ok(ClientSecret::Password(creds.password.expose().to_string()));
    };
    let data =
        std::fs::read(path).map_err(|e| format!("cannot read keytab {}: {e}", path.display()))?;
    let entries = parse_keytab(&data).map_err(|e| format!("{}: {e}", path.display()))?;
    entries
        .into_iter()
        .filter(|e| e.components == [account] && e.realm.eq_ignore_ascii_case(realm))
        .max_by_key(|e| e.kvno)
        .map(ClientSecret::Key)
        .ok_or_else(|| format!("keytab {} has no key for {account}@{realm}", path.display()))
}

/// Logs in: tickets from the KDC, then the AP-REQ/AP-REP leg on the connection the session
/// will use.
pub(crate) async fn handshake(
    http: &HttpClient,
    url: &url::Url,
    creds: &Credentials,
    call: &str,
    host: &str,
    domain: Option<&str>,
    opts: &KerberosOptions,
) -> Result<KerberosSession, HypervError> {
    let proto = |m: String| HypervError::protocol(http.source(), call, m);
    let (account, realm) = principal(&creds.user, opts.realm.as_deref().or(domain))
        .map_err(|e| proto(e.to_string()))?;
    let secret = secret(creds, opts, &account, &realm).map_err(proto)?;
    let (kdc, host_owned) = (opts.kdc.clone(), host.to_string());
    let (acc, rlm) = (account.clone(), realm.clone());
    let started = tokio::task::spawn_blocking(move || {
        KerberosClient::start(&acc, &rlm, secret, &host_owned, kdc.as_deref(), &Sockets)
    })
    .await
    .map_err(|e| proto(format!("the Kerberos login task failed: {e}")))?;
    let (client, ap_req) = started.map_err(|e| {
        proto(format!(
            "no ticket for HTTP/{host} as {account}@{realm}: {e}"
        ))
    })?;
    let (status, ap_rep) = crate::auth::leg(http, url, call, &ap_req).await?;
    match (status, ap_rep) {
        (200..=299, Some(ap_rep)) => {
            let session = client
                .finish(&ap_rep)
                .map_err(|e| proto(format!("the host's AP-REP was refused: {e}")))?;
            tracing::debug!(call, user = %creds.user, "Kerberos login");
            Ok(session)
        }
        (200..=299, None) => Err(proto(
            "the host accepted the Kerberos ticket without an AP-REP (no mutual authentication)"
                .into(),
        )),
        (401, _) => Err(HypervError::Login {
            source_name: http.source().to_string(),
            call: call.into(),
            user: format!("{account}@{realm} (Kerberos)"),
        }),
        (s, _) => Err(proto(format!("HTTP {s} to the Kerberos AP-REQ"))),
    }
}
