//! NTLM (MS-NLMP) for WinRM, both roles, through the maintained `sspi` crate (ADR 0112): the
//! client's NEGOTIATE/AUTHENTICATE tokens, the acceptor's CHALLENGE and verdict, and the
//! session's sealing (RC4 with a signature and sequence numbers) as a [`Seal`]. Tokens are raw
//! NTLM (what pywinrm/pypsrp send in `Authorization: Negotiate …` or `NTLM …`), not SPNEGO.

use crate::sealed::{Seal, SealError};
use sspi::{
    AuthIdentity, AuthIdentityBuffers, BufferType, ClientRequestFlags, CredentialUse,
    DataRepresentation, Ntlm, SecurityBuffer, SecurityStatus, ServerRequestFlags, Sspi, SspiImpl,
    Username,
};

/// The signature NTLM puts in front of a sealed message.
const SIGNATURE: usize = 16;

/// An NTLM failure, in sspi's words (never containing the password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NTLM: {0}")]
pub struct NtlmError(pub String);

fn ntlm_err(e: sspi::Error) -> NtlmError {
    NtlmError(format!("{:?}: {}", e.error_type, e.description))
}

/// Whether `token` is a raw NTLM message (`NTLMSSP\0`), not a SPNEGO/Kerberos one.
pub fn is_ntlm(token: &[u8]) -> bool {
    token.starts_with(b"NTLMSSP\0")
}

fn identity(user: &str, domain: Option<&str>, password: &str) -> Result<AuthIdentity, NtlmError> {
    // `DOMAIN\user` and `user@domain` are split here; an explicit domain wins.
    let (account, dom) = match (domain, user.split_once('\\')) {
        (Some(d), _) => (user, Some(d)),
        (None, Some((d, u))) => (u, Some(d)),
        (None, None) => (user, None),
    };
    let username = match (dom, account.split_once('@')) {
        (None, Some((u, suffix))) => Username::new_upn(u, suffix),
        _ => Username::new(account, dom.filter(|d| !d.is_empty())),
    }
    .map_err(|e| NtlmError(format!("bad user name `{user}`: {e}")))?;
    Ok(AuthIdentity {
        username,
        password: password.to_string().into(),
    })
}

/// A fresh NTLM context and its credentials handle for `id`.
fn acquire(
    id: &AuthIdentity,
    usage: CredentialUse,
) -> Result<(Ntlm, Option<AuthIdentityBuffers>), NtlmError> {
    let mut ntlm = Ntlm::new();
    let acq = ntlm
        .acquire_credentials_handle()
        .with_credential_use(usage)
        .with_auth_data(id)
        .execute(&mut ntlm)
        .map_err(ntlm_err)?;
    Ok((ntlm, acq.credentials_handle))
}

/// The client side of one handshake.
pub struct NtlmClient {
    ntlm: Ntlm,
    creds: Option<AuthIdentityBuffers>,
    target: String,
}

impl std::fmt::Debug for NtlmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NtlmClient")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl NtlmClient {
    /// Starts a handshake as `user` (`DOMAIN\user`, `user@domain` or a local account, or the
    /// `domain` given) towards `host`; returns the NEGOTIATE token to send.
    pub fn start(
        user: &str,
        domain: Option<&str>,
        password: &str,
        host: &str,
    ) -> Result<(Self, Vec<u8>), NtlmError> {
        let (ntlm, creds) = acquire(&identity(user, domain, password)?, CredentialUse::Outbound)?;
        let mut c = Self {
            ntlm,
            creds,
            target: format!("HTTP/{host}"),
        };
        let (_, token) = c.step(None)?;
        Ok((c, token))
    }

    fn step(&mut self, input: Option<&[u8]>) -> Result<(SecurityStatus, Vec<u8>), NtlmError> {
        let mut output = vec![SecurityBuffer::new(Vec::new(), BufferType::Token)];
        let mut input = input.map(|t| vec![SecurityBuffer::new(t.to_vec(), BufferType::Token)]);
        let flags = ClientRequestFlags::CONFIDENTIALITY
            | ClientRequestFlags::INTEGRITY
            | ClientRequestFlags::ALLOCATE_MEMORY;
        let mut b = self
            .ntlm
            .initialize_security_context()
            .with_credentials_handle(&mut self.creds)
            .with_context_requirements(flags)
            .with_target_data_representation(DataRepresentation::Native)
            .with_target_name(&self.target)
            .with_output(&mut output);
        if let Some(i) = input.as_mut() {
            b = b.with_input(i);
        }
        let r = self
            .ntlm
            .initialize_security_context_impl(&mut b)
            .map_err(ntlm_err)?
            .resolve_to_result()
            .map_err(ntlm_err)?;
        let token = std::mem::take(&mut output[0].buffer);
        Ok((r.status, token))
    }

    /// Binds the AUTHENTICATE to the TLS channel: `application_data` is its
    /// `tls-server-end-point` binding ([`crate::cbt::tls_server_end_point`]), whose hash goes
    /// into the `MsvAvChannelBindings` AV pair (ADR 0172).
    pub fn bind_channel(&mut self, application_data: &[u8]) {
        self.ntlm.set_channel_bindings(application_data);
    }

    /// Answers the server's CHALLENGE: the AUTHENTICATE token to send and the session that
    /// seals messages from now on.
    pub fn authenticate(mut self, challenge: &[u8]) -> Result<(Vec<u8>, NtlmSession), NtlmError> {
        if !is_ntlm(challenge) {
            return Err(NtlmError(
                "the server's challenge is not an NTLM message".into(),
            ));
        }
        let (_, token) = self.step(Some(challenge))?;
        Ok((token, NtlmSession { ntlm: self.ntlm }))
    }
}

/// What the acceptor says to a token.
#[derive(Debug)]
pub enum Accepted {
    /// Send this CHALLENGE back (HTTP 401 with `WWW-Authenticate`); the acceptor waits for
    /// the AUTHENTICATE.
    Challenge(Vec<u8>, NtlmServer),
    /// Authenticated as this account; the session seals from now on.
    Done(String, NtlmSession),
}

/// The acceptor (server) side of one handshake, checking one account.
pub struct NtlmServer {
    ntlm: Ntlm,
    creds: Option<AuthIdentityBuffers>,
    user: String,
}

impl std::fmt::Debug for NtlmServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NtlmServer")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl NtlmServer {
    /// An acceptor that lets in `user` with `password` (the user's domain is not checked: a
    /// local account, as on a workgroup host).
    pub fn new(user: &str, password: &str) -> Result<Self, NtlmError> {
        let (ntlm, creds) = acquire(&identity(user, None, password)?, CredentialUse::Inbound)?;
        Ok(Self {
            ntlm,
            creds,
            user: user.to_string(),
        })
    }

    /// Expects `application_data` as the client's channel binding: an AUTHENTICATE whose
    /// `MsvAvChannelBindings` differs is refused (one without it is not: see
    /// [`crate::cbt::authenticate_bindings`]).
    pub fn bind_channel(&mut self, application_data: &[u8]) {
        self.ntlm.set_channel_bindings(application_data);
    }

    /// Takes the client's NEGOTIATE (→ a CHALLENGE) or AUTHENTICATE (→ the verdict).
    pub fn step(mut self, token: &[u8]) -> Result<Accepted, NtlmError> {
        if !is_ntlm(token) {
            return Err(NtlmError(
                "not an NTLM token (SPNEGO is not accepted)".into(),
            ));
        }
        let mut input = vec![SecurityBuffer::new(token.to_vec(), BufferType::Token)];
        let mut output = vec![SecurityBuffer::new(Vec::new(), BufferType::Token)];
        let b = self
            .ntlm
            .accept_security_context()
            .with_credentials_handle(&mut self.creds)
            .with_context_requirements(ServerRequestFlags::ALLOCATE_MEMORY)
            .with_target_data_representation(DataRepresentation::Native)
            .with_input(&mut input)
            .with_output(&mut output);
        let r = self
            .ntlm
            .accept_security_context_impl(b)
            .map_err(ntlm_err)?
            .resolve_to_result()
            .map_err(ntlm_err)?;
        match r.status {
            SecurityStatus::ContinueNeeded => {
                let t = std::mem::take(&mut output[0].buffer);
                Ok(Accepted::Challenge(t, self))
            }
            SecurityStatus::CompleteNeeded | SecurityStatus::CompleteAndContinue => {
                // The password is checked here (through the MIC and session key).
                self.ntlm
                    .complete_auth_token(&mut output)
                    .map_err(ntlm_err)?;
                let names = self.ntlm.query_context_names().map_err(ntlm_err)?;
                let account = names.username.account_name().to_string();
                let want = self.user.rsplit('\\').next().unwrap_or(&self.user);
                let want = want.split('@').next().unwrap_or(want);
                if !account.eq_ignore_ascii_case(want) {
                    return Err(NtlmError(format!("unknown user `{account}`")));
                }
                Ok(Accepted::Done(account, NtlmSession { ntlm: self.ntlm }))
            }
            s => Err(NtlmError(format!("unexpected acceptor status {s:?}"))),
        }
    }
}

/// An established NTLM session: seals and unseals WinRM messages in order.
pub struct NtlmSession {
    ntlm: Ntlm,
}

impl std::fmt::Debug for NtlmSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NtlmSession")
    }
}

impl Seal for NtlmSession {
    fn seal(&mut self, plain: &[u8]) -> Result<(Vec<u8>, Vec<u8>), SealError> {
        crate::sealed::sspi_seal(&mut self.ntlm, SIGNATURE, plain)
            .map_err(|e| SealError(ntlm_err(e).to_string()))
    }

    fn unseal(&mut self, signature: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if signature.len() != SIGNATURE {
            return Err(SealError(format!(
                "an NTLM signature is {SIGNATURE} bytes, not {}",
                signature.len()
            )));
        }
        crate::sealed::sspi_unseal(&mut self.ntlm, signature, sealed)
            .map_err(|e| SealError(ntlm_err(e).to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sealed::{PROTOCOL_SPNEGO, unwrap, wrap};

    fn handshake(password: &str) -> Result<(NtlmSession, NtlmSession), NtlmError> {
        let server = NtlmServer::new("Administrator", "s3cret")?;
        let (client, negotiate) = NtlmClient::start("Administrator", None, password, "hv")?;
        let Accepted::Challenge(challenge, server) = server.step(&negotiate)? else {
            panic!("no challenge")
        };
        let (auth, c) = client.authenticate(&challenge)?;
        let Accepted::Done(user, s) = server.step(&auth)? else {
            panic!("not done")
        };
        assert_eq!(user, "Administrator");
        Ok((c, s))
    }

    #[test]
    fn both_roles_agree_and_seal_in_order() {
        let (mut c, mut s) = handshake("s3cret").unwrap();
        for i in 0..3 {
            let msg = format!("<s:Envelope>{i}</s:Envelope>");
            let body = wrap(&mut c, PROTOCOL_SPNEGO, msg.as_bytes()).unwrap();
            assert!(!body.windows(msg.len()).any(|w| w == msg.as_bytes()));
            assert_eq!(unwrap(&mut s, &body).unwrap(), msg.as_bytes());
            let body = wrap(&mut s, PROTOCOL_SPNEGO, b"reply").unwrap();
            assert_eq!(unwrap(&mut c, &body).unwrap(), b"reply");
        }
    }

    #[test]
    fn a_wrong_password_or_a_tampered_message_is_refused() {
        let e = handshake("wrong").unwrap_err();
        assert!(!e.to_string().contains("wrong"), "{e}");
        let (mut c, mut s) = handshake("s3cret").unwrap();
        let mut body = wrap(&mut c, PROTOCOL_SPNEGO, b"<s:Envelope/>").unwrap();
        let n = body.len() - 20;
        body[n] ^= 1;
        assert!(unwrap(&mut s, &body).is_err());
    }
}
