//! Kerberos (RFC 4120/4121) for WinRM, both roles, through the maintained `sspi` crate
//! (ADR 0159): the client's AS and TGS exchanges with the KDC (sans I/O: the caller answers
//! sspi's network requests through a [`KdcTransport`]), its AP-REQ token and the check of the
//! acceptor's AP-REP (mutual authentication); the acceptor's check of an AP-REQ with the
//! service key from a keytab; and the session's wrap tokens as a [`Seal`].
//!
//! Tokens are raw GSS-API Kerberos tokens (`0x60 … 1.2.840.113554.1.2.2 …`), what pywinrm's
//! `transport='kerberos'` sends in `Authorization: Negotiate …`, not SPNEGO. Sealed messages
//! under `Negotiate` carry SPNEGO's protocol string (as pywinrm's); [`PROTOCOL_KERBEROS`] goes
//! with `Authorization: Kerberos`.

use crate::sealed::{Seal, SealError};
use sspi::network_client::NetworkClient;
use sspi::{
    AuthIdentity, BufferType, ClientRequestFlags, CredentialUse, Credentials, CredentialsBuffers,
    DataRepresentation, Kerberos, KerberosConfig, SecurityBuffer, SecurityStatus,
    ServerRequestFlags, Sspi, SspiImpl, Username,
};

/// The `protocol` of encrypted messages after `Authorization: Kerberos` (MS-WSMV 2.2.9.1).
pub const PROTOCOL_KERBEROS: &str = "application/HTTP-Kerberos-session-encrypted";
/// Room for a wrap token's header and trailer (60 bytes with AES and EC 16).
const TRAILER: usize = 128;
/// The DER of the Kerberos V5 mechanism OID, as it follows the GSS token's length.
const KRB5_OID: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x12, 0x01, 0x02, 0x02,
];

/// A Kerberos failure, in sspi's or the KDC's words (never containing the password or key).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Kerberos: {0}")]
pub struct KerberosError(pub String);

fn krb_err(e: sspi::Error) -> KerberosError {
    // The KDC's e-data (salts, enctypes) is noise in a message for a person.
    let d = e.description.as_str();
    let d = d.split(". Additional error data").next().unwrap_or(d);
    KerberosError(format!("{:?}: {d}", e.error_type))
}

/// Carries KDC messages: the caller's I/O (RFC 4120 7.2).
pub trait KdcTransport: Send + Sync {
    /// Sends `message` to the KDC at `host:port` and returns its reply. Over TCP (`tcp`) the
    /// message and the reply carry their 4-byte big-endian length prefix; over UDP neither does.
    fn exchange(&self, tcp: bool, host: &str, port: u16, message: &[u8])
    -> Result<Vec<u8>, String>;
}

/// sspi's network requests answered through a [`KdcTransport`].
struct Net<'a>(&'a dyn KdcTransport);

impl NetworkClient for Net<'_> {
    fn send(&self, r: &sspi::NetworkRequest) -> sspi::Result<Vec<u8>> {
        let fail = |m: String| sspi::Error::new(sspi::ErrorKind::NoAuthenticatingAuthority, m);
        let tcp = match r.protocol {
            sspi::NetworkProtocol::Tcp => true,
            sspi::NetworkProtocol::Udp => false,
            p => {
                return Err(fail(format!(
                    "KDC over {p:?} (a KDC proxy) is not supported"
                )));
            }
        };
        let host = r.url.host_str().unwrap_or_default();
        let port = r.url.port().unwrap_or(88);
        let reply = self
            .0
            .exchange(tcp, host, port, &r.data)
            .map_err(|e| fail(format!("KDC {host}:{port}: {e}")))?;
        if tcp {
            return Ok(reply);
        }
        // sspi reads every reply with its length prefix.
        let n = u32::try_from(reply.len()).map_err(|_| fail("KDC reply too large".into()))?;
        let mut framed = n.to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        Ok(framed)
    }
}

/// Whether `token` is a GSS-API Kerberos token (an initial context token with the krb5 OID).
pub fn is_kerberos(token: &[u8]) -> bool {
    if token.first() != Some(&0x60) {
        return false;
    }
    // Skip the DER length (short or long form) to the mechanism OID.
    let at = match token.get(1) {
        Some(&l) if l < 0x80 => 2,
        Some(&l) => 2 + usize::from(l & 0x7f),
        None => return false,
    };
    token.get(at..).is_some_and(|t| t.starts_with(KRB5_OID))
}

/// How the client proves who it is.
pub enum ClientSecret {
    /// The principal's password (the key is derived with the KDC's salt).
    Password(String),
    /// A long-term key from a keytab.
    Key(KeytabEntry),
}

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Password(_) => "Password(<redacted>)",
            Self::Key(_) => "Key(<redacted>)",
        })
    }
}

/// Who logs in: `user` as `alice`, `alice@REALM` or `REALM\alice`; `realm` when the name
/// carries none.
pub fn principal(user: &str, realm: Option<&str>) -> Result<(String, String), KerberosError> {
    let (account, from_name) = match (user.split_once('\\'), user.rsplit_once('@')) {
        (Some((d, u)), _) => (u, Some(d)),
        (None, Some((u, r))) => (u, Some(r)),
        (None, None) => (user, None),
    };
    let realm = realm
        .filter(|r| !r.is_empty())
        .or(from_name)
        .ok_or_else(|| {
            KerberosError(format!(
                "no realm for `{user}`: write `user@REALM` or set `realm`"
            ))
        })?;
    if account.is_empty() {
        return Err(KerberosError(format!("bad user name `{user}`")));
    }
    Ok((account.to_string(), realm.to_uppercase()))
}

/// The client side of one handshake.
pub struct KerberosClient {
    krb: Kerberos,
    creds: Option<CredentialsBuffers>,
    target: String,
}

impl std::fmt::Debug for KerberosClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KerberosClient")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

fn client_flags() -> ClientRequestFlags {
    ClientRequestFlags::MUTUAL_AUTH
        | ClientRequestFlags::CONFIDENTIALITY
        | ClientRequestFlags::INTEGRITY
        | ClientRequestFlags::SEQUENCE_DETECT
        | ClientRequestFlags::REPLAY_DETECT
        | ClientRequestFlags::ALLOCATE_MEMORY
}

impl KerberosClient {
    /// Gets a ticket for `HTTP/<host>` as `account@realm` from the KDC at `kdc` (`host:port`,
    /// `tcp://…` or `udp://…`; `None`: `KRB5_CONFIG`'s realm entry, then DNS), sending the KDC
    /// messages through `network`; returns the AP-REQ token to send. Blocks on `network`.
    pub fn start(
        account: &str,
        realm: &str,
        secret: ClientSecret,
        host: &str,
        kdc: Option<&str>,
        network: &dyn KdcTransport,
    ) -> Result<(Self, Vec<u8>), KerberosError> {
        let username = Username::new(account, Some(realm))
            .map_err(|e| KerberosError(format!("bad user name `{account}`: {e}")))?;
        let creds: Credentials = match secret {
            ClientSecret::Password(p) => AuthIdentity {
                username,
                password: p.into(),
            }
            .into(),
            ClientSecret::Key(k) => sspi::KeytabIdentity {
                principal: username,
                key: k.key.to_vec().into(),
                key_enctype: picky_krb::crypto::CipherSuite::try_from(usize::from(k.enctype))
                    .map_err(|e| {
                        KerberosError(format!("keytab key type {} unsupported: {e}", k.enctype))
                    })?,
            }
            .into(),
        };
        let kdc_resolution = sspi::KdcResolution::KdcUrl(match kdc {
            Some(k) => Some(
                sspi::kerberos::config::parse_kdc_url(k)
                    .ok_or_else(|| KerberosError(format!("bad kdc `{k}`")))?,
            ),
            None => None,
        });
        let mut krb = Kerberos::new_client_from_config(KerberosConfig {
            kdc_resolution,
            client_computer_name: "ferry".into(),
        })
        .map_err(krb_err)?;
        let acq = krb
            .acquire_credentials_handle()
            .with_credential_use(CredentialUse::Outbound)
            .with_auth_data(&creds)
            .execute(&mut krb)
            .map_err(krb_err)?;
        let mut c = Self {
            krb,
            creds: acq.credentials_handle,
            target: format!("HTTP/{host}"),
        };
        let (status, token) = c.step(Vec::new(), &Net(network))?;
        if status != SecurityStatus::ContinueNeeded || token.is_empty() {
            return Err(KerberosError(format!(
                "no AP-REQ after the KDC exchanges ({status:?})"
            )));
        }
        Ok((c, token))
    }

    fn step(
        &mut self,
        input: Vec<u8>,
        network: &dyn NetworkClient,
    ) -> Result<(SecurityStatus, Vec<u8>), KerberosError> {
        let mut output = vec![SecurityBuffer::new(Vec::new(), BufferType::Token)];
        let mut input = vec![SecurityBuffer::new(input, BufferType::Token)];
        let mut b = self
            .krb
            .initialize_security_context()
            .with_credentials_handle(&mut self.creds)
            .with_context_requirements(client_flags())
            .with_target_data_representation(DataRepresentation::Native)
            .with_target_name(&self.target)
            .with_input(&mut input)
            .with_output(&mut output);
        let r = self
            .krb
            .initialize_security_context_impl(&mut b)
            .map_err(krb_err)?
            .resolve_with_client(network)
            .map_err(krb_err)?;
        Ok((r.status, std::mem::take(&mut output[0].buffer)))
    }

    /// Checks the acceptor's AP-REP (mutual authentication): the session that seals from now
    /// on.
    pub fn finish(mut self, ap_rep: &[u8]) -> Result<KerberosSession, KerberosError> {
        struct NoNetwork;
        impl NetworkClient for NoNetwork {
            fn send(&self, _: &sspi::NetworkRequest) -> sspi::Result<Vec<u8>> {
                Err(sspi::Error::new(
                    sspi::ErrorKind::InternalError,
                    "no KDC traffic expected after the AP-REQ",
                ))
            }
        }
        let (status, _) = self.step(ap_rep.to_vec(), &NoNetwork)?;
        if status != SecurityStatus::Ok {
            return Err(KerberosError(format!(
                "the AP-REP did not complete the context ({status:?})"
            )));
        }
        Ok(KerberosSession { krb: self.krb })
    }
}

/// One key of a keytab (MIT's file format, versions 0x501/0x502).
#[derive(Clone, PartialEq, Eq)]
pub struct KeytabEntry {
    /// Principal name components (`["HTTP", "host"]`).
    pub components: Vec<String>,
    /// The realm.
    pub realm: String,
    /// Key version number.
    pub kvno: u32,
    /// Encryption type (18: aes256-cts-hmac-sha1-96, 17: aes128).
    pub enctype: u16,
    /// The key.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for KeytabEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeytabEntry")
            .field("principal", &self.principal())
            .field("kvno", &self.kvno)
            .field("enctype", &self.enctype)
            .finish_non_exhaustive()
    }
}

impl KeytabEntry {
    /// `HTTP/host@REALM`.
    pub fn principal(&self) -> String {
        format!("{}@{}", self.components.join("/"), self.realm)
    }
}

/// A big- (0x502) or little-endian (0x501) reader over one keytab entry.
struct Reader<'a> {
    data: &'a [u8],
    be: bool,
}

impl<'a> Reader<'a> {
    fn take(&mut self, k: usize) -> Result<&'a [u8], KerberosError> {
        if self.data.len() < k {
            return Err(KerberosError("keytab: a truncated entry".into()));
        }
        let (h, t) = self.data.split_at(k);
        self.data = t;
        Ok(h)
    }
    fn u16(&mut self) -> Result<u16, KerberosError> {
        let b = self.take(2)?;
        let a = [b[0], b[1]];
        Ok(if self.be {
            u16::from_be_bytes(a)
        } else {
            u16::from_le_bytes(a)
        })
    }
    fn u32(&mut self) -> Result<u32, KerberosError> {
        let b = self.take(4)?;
        let a = [b[0], b[1], b[2], b[3]];
        Ok(if self.be {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        })
    }
    fn string(&mut self) -> Result<String, KerberosError> {
        let l = usize::from(self.u16()?);
        String::from_utf8(self.take(l)?.to_vec())
            .map_err(|_| KerberosError("keytab: a name is not UTF-8".into()))
    }
}

/// Reads a keytab file's entries (a malformed file is an error naming what is wrong).
pub fn parse_keytab(data: &[u8]) -> Result<Vec<KeytabEntry>, KerberosError> {
    let version = match data {
        [5, v @ (1 | 2), ..] => *v,
        _ => {
            return Err(KerberosError(
                "keytab: not a keytab (version 0x501 or 0x502)".into(),
            ));
        }
    };
    let mut file = Reader {
        data: &data[2..],
        be: version == 2,
    };
    let mut out = Vec::new();
    while file.data.len() >= 4 {
        let size = file.u32()? as i32;
        let entry = file
            .take(size.unsigned_abs() as usize)
            .map_err(|_| KerberosError("keytab: an entry runs past the end".into()))?;
        if size <= 0 {
            continue; // a hole left by a deleted entry
        }
        let mut e = Reader {
            data: entry,
            be: file.be,
        };
        let mut count = usize::from(e.u16()?);
        if version == 1 {
            count = count.saturating_sub(1); // 0x501 counts the realm
        }
        let realm = e.string()?;
        let mut components = Vec::with_capacity(count.min(8));
        for _ in 0..count {
            components.push(e.string()?);
        }
        if version == 2 {
            e.u32()?; // name type
        }
        e.u32()?; // timestamp
        let kvno8 = e.take(1)?[0];
        let enctype = e.u16()?;
        let l = usize::from(e.u16()?);
        let key = e.take(l)?.to_vec();
        let kvno = match e.u32() {
            Ok(v) if v != 0 => v,
            _ => u32::from(kvno8),
        };
        out.push(KeytabEntry {
            components,
            realm,
            kvno,
            enctype,
            key,
        });
    }
    Ok(out)
}

/// What the acceptor says to an AP-REQ.
#[derive(Debug)]
pub struct Accepted {
    /// The client principal (`alice@REALM`).
    pub client: String,
    /// The AP-REP to send back (`WWW-Authenticate: Negotiate …`).
    pub ap_rep: Vec<u8>,
    /// The session that seals from now on.
    pub session: KerberosSession,
}

/// The acceptor (server) side: the service principal's keys from its keytab.
#[derive(Clone)]
pub struct KerberosServer {
    service: Vec<String>,
    keys: Vec<KeytabEntry>,
    max_skew: std::time::Duration,
}

impl std::fmt::Debug for KerberosServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KerberosServer")
            .field("service", &self.service.join("/"))
            .finish_non_exhaustive()
    }
}

impl KerberosServer {
    /// An acceptor for `service` (`HTTP/host`) with its newest key in `keytab`; clocks may
    /// differ by `max_skew` (Kerberos' usual 5 minutes).
    pub fn new(
        service: &str,
        keytab: &[KeytabEntry],
        max_skew: std::time::Duration,
    ) -> Result<Self, KerberosError> {
        let want: Vec<String> = service.split('/').map(str::to_string).collect();
        let mut keys: Vec<KeytabEntry> = keytab
            .iter()
            .filter(|e| e.components == want)
            .cloned()
            .collect();
        if keys.is_empty() {
            return Err(KerberosError(format!(
                "the keytab has no key for `{service}`"
            )));
        }
        keys.sort_by_key(|e| std::cmp::Reverse(e.kvno));
        Ok(Self {
            service: want,
            keys,
            max_skew,
        })
    }

    /// Checks an AP-REQ (the ticket, the authenticator, the clock, replays).
    pub fn accept(&self, token: &[u8]) -> Result<Accepted, KerberosError> {
        let key = self.keys[0].key.clone();
        let sname: Vec<&str> = self.service.iter().map(String::as_str).collect();
        let props =
            sspi::kerberos::ServerProperties::new(&sname, None, self.max_skew, Some(key.into()))
                .map_err(krb_err)?;
        let mut krb = Kerberos::new_server_from_config(
            KerberosConfig {
                kdc_resolution: sspi::KdcResolution::KdcUrl(None),
                client_computer_name: "ferry-sim".into(),
            },
            props,
        )
        .map_err(krb_err)?;
        let mut creds: Option<CredentialsBuffers> = None;
        let mut input = vec![SecurityBuffer::new(token.to_vec(), BufferType::Token)];
        let mut output = vec![SecurityBuffer::new(Vec::new(), BufferType::Token)];
        let b = krb
            .accept_security_context()
            .with_credentials_handle(&mut creds)
            .with_context_requirements(ServerRequestFlags::ALLOCATE_MEMORY)
            .with_target_data_representation(DataRepresentation::Native)
            .with_input(&mut input)
            .with_output(&mut output);
        let r = krb
            .accept_security_context_impl(b)
            .map_err(krb_err)?
            .resolve_to_result()
            .map_err(krb_err)?;
        if r.status != SecurityStatus::Ok {
            return Err(KerberosError(format!(
                "unexpected acceptor status {:?}",
                r.status
            )));
        }
        let names = krb.query_context_names().map_err(krb_err)?;
        // `alice@FERRY.TEST`, from the ticket's cname and crealm.
        let client = names.username.inner().to_string();
        Ok(Accepted {
            client,
            ap_rep: std::mem::take(&mut output[0].buffer),
            session: KerberosSession { krb },
        })
    }
}

/// An established Kerberos context: seals and unseals WinRM messages in order.
pub struct KerberosSession {
    krb: Kerberos,
}

impl std::fmt::Debug for KerberosSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KerberosSession")
    }
}

impl Seal for KerberosSession {
    fn seal(&mut self, plain: &[u8]) -> Result<(Vec<u8>, Vec<u8>), SealError> {
        crate::sealed::sspi_seal(&mut self.krb, TRAILER, plain)
            .map_err(|e| SealError(krb_err(e).to_string()))
    }

    fn unseal(&mut self, signature: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        crate::sealed::sspi_unseal(&mut self.krb, signature, sealed)
            .map_err(|e| SealError(krb_err(e).to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_and_tokens() {
        assert_eq!(
            principal("alice@ferry.test", None).unwrap(),
            ("alice".into(), "FERRY.TEST".into())
        );
        assert_eq!(
            principal("FERRY\\alice", None).unwrap(),
            ("alice".into(), "FERRY".into())
        );
        assert_eq!(
            principal("alice", Some("FERRY.TEST")).unwrap(),
            ("alice".into(), "FERRY.TEST".into())
        );
        assert!(principal("alice", None).is_err());
        assert!(!is_kerberos(b"NTLMSSP\0\x01"));
        let mut t = vec![0x60, 0x10];
        t.extend_from_slice(KRB5_OID);
        assert!(is_kerberos(&t));
        assert!(!is_kerberos(&[0x60]));
    }

    #[test]
    fn keytab_entries_and_malformed_files() {
        // One entry as MIT's ktadd writes it: HTTP/127.0.0.1@FERRY.TEST, kvno 2, aes256.
        let mut e = Vec::new();
        e.extend_from_slice(&2u16.to_be_bytes());
        for s in ["FERRY.TEST", "HTTP", "127.0.0.1"] {
            e.extend_from_slice(&(s.len() as u16).to_be_bytes());
            e.extend_from_slice(s.as_bytes());
        }
        e.extend_from_slice(&1u32.to_be_bytes());
        e.extend_from_slice(&0u32.to_be_bytes());
        e.push(2);
        e.extend_from_slice(&18u16.to_be_bytes());
        e.extend_from_slice(&32u16.to_be_bytes());
        e.extend_from_slice(&[7; 32]);
        e.extend_from_slice(&2u32.to_be_bytes());
        let mut kt = vec![5, 2];
        kt.extend_from_slice(&(e.len() as u32).to_be_bytes());
        kt.extend_from_slice(&e);
        let got = parse_keytab(&kt).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].principal(), "HTTP/127.0.0.1@FERRY.TEST");
        assert_eq!((got[0].kvno, got[0].enctype), (2, 18));
        assert!(!format!("{:?}", got[0]).contains("7, 7"));
        assert!(
            KerberosServer::new("HTTP/127.0.0.1", &got, std::time::Duration::from_secs(300))
                .is_ok()
        );
        assert!(
            KerberosServer::new("HTTP/other", &got, std::time::Duration::from_secs(300)).is_err()
        );
        for n in 0..kt.len() {
            let _ = parse_keytab(&kt[..n]);
        }
        assert!(parse_keytab(b"\x05\x02\x00\x00\x01\x00").is_err());
        assert!(parse_keytab(b"garbage").is_err());
    }
}
