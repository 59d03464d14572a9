//! WinRM message encryption framing (MS-WSMV 2.2.9.1): after an NTLM or Kerberos handshake
//! every SOAP message travels sealed inside a `multipart/encrypted` body:
//!
//! ```text
//! --Encrypted Boundary\r\n
//! \tContent-Type: application/HTTP-SPNEGO-session-encrypted\r\n
//! \tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=N\r\n
//! --Encrypted Boundary\r\n
//! \tContent-Type: application/octet-stream\r\n
//! <u32 LE signature length><signature><sealed payload>--Encrypted Boundary--\r\n
//! ```
//!
//! This module frames and unframes; the sealing itself is a [`Seal`] (the NTLM session of
//! [`crate::ntlm`], a Kerberos one later). The closing boundary is optional on input (pywinrm
//! leaves it out), always written on output (Windows and pypsrp write it).

/// The `protocol` of NTLM and SPNEGO sessions.
pub const PROTOCOL_SPNEGO: &str = "application/HTTP-SPNEGO-session-encrypted";
/// The MIME boundary WinRM uses.
pub const BOUNDARY: &str = "Encrypted Boundary";
/// Longest signature accepted (NTLM's is 16 bytes, Kerberos' wrap token header ~ 60).
const MAX_SIGNATURE: usize = 1024;
/// Most parts accepted in one body (CredSSP splits at 16 KiB; SPNEGO sends one).
const MAX_PARTS: usize = 4096;

/// A malformed or tampered encrypted message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("encrypted WinRM message: {0}")]
pub struct SealError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, SealError> {
    Err(SealError(m.into()))
}

/// A session that seals and unseals messages (one per authenticated connection; the order of
/// calls matters: sequence numbers and stream-cipher state advance with each message).
pub trait Seal: std::fmt::Debug {
    /// Seals `plain`: (signature, sealed payload).
    fn seal(&mut self, plain: &[u8]) -> Result<(Vec<u8>, Vec<u8>), SealError>;
    /// Checks `signature` and unseals `sealed`.
    fn unseal(&mut self, signature: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError>;
}

/// Seals `plain` with an sspi context (NTLM, Kerberos): the token buffer (room for `trailer`
/// bytes) becomes the signature, the data buffer the sealed payload.
pub(crate) fn sspi_seal(
    ctx: &mut impl sspi::Sspi,
    trailer: usize,
    plain: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), sspi::Error> {
    let mut sig = vec![0u8; trailer];
    let mut data = plain.to_vec();
    let mut bufs = vec![
        sspi::SecurityBufferRef::token_buf(sig.as_mut_slice()),
        sspi::SecurityBufferRef::data_buf(data.as_mut_slice()),
    ];
    ctx.encrypt_message(sspi::EncryptionFlags::empty(), &mut bufs)?;
    Ok((bufs[0].data().to_vec(), bufs[1].data().to_vec()))
}

/// Checks `signature` and unseals `sealed` with an sspi context.
pub(crate) fn sspi_unseal(
    ctx: &mut impl sspi::Sspi,
    signature: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, sspi::Error> {
    let mut sig = signature.to_vec();
    let mut data = sealed.to_vec();
    let mut bufs = vec![
        sspi::SecurityBufferRef::token_buf(sig.as_mut_slice()),
        sspi::SecurityBufferRef::data_buf(data.as_mut_slice()),
    ];
    ctx.decrypt_message(&mut bufs)?;
    Ok(bufs[1].data().to_vec())
}

/// The HTTP `Content-Type` of an encrypted body.
pub fn content_type(protocol: &str) -> String {
    format!("multipart/encrypted;protocol=\"{protocol}\";boundary=\"{BOUNDARY}\"")
}

/// Whether a `Content-Type` announces an encrypted body.
pub fn is_encrypted(content_type: &str) -> bool {
    let c = content_type.trim_start().to_ascii_lowercase();
    c.starts_with("multipart/encrypted") || c.starts_with("multipart/x-multi-encrypted")
}

/// One part of an encrypted body, borrowed from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part<'a> {
    /// The part's `Content-Type` (the session protocol).
    pub protocol: &'a str,
    /// Length of the plain SOAP message.
    pub original_length: usize,
    /// The signature (NTLM: 16 bytes).
    pub signature: &'a [u8],
    /// The sealed payload.
    pub sealed: &'a [u8],
}

/// Frames one sealed message.
pub fn encode(protocol: &str, original_length: usize, signature: &[u8], sealed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(sealed.len() + signature.len() + 256);
    out.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\n\tContent-Type: {protocol}\r\n\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length={original_length}\r\n--{BOUNDARY}\r\n\tContent-Type: application/octet-stream\r\n"
        )
        .as_bytes(),
    );
    let n = u32::try_from(signature.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(signature);
    out.extend_from_slice(sealed);
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A header line's value: `\tName: value` (leading whitespace optional, name case-insensitive).
fn header<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let (n, v) = line.trim_start().split_once(':')?;
    n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
}

/// Splits an encrypted body into its parts.
pub fn decode(body: &[u8]) -> Result<Vec<Part<'_>>, SealError> {
    let open = format!("--{BOUNDARY}\r\n");
    let open = open.as_bytes();
    let close = format!("--{BOUNDARY}--");
    let close = close.as_bytes();
    let mut rest = body
        .strip_prefix(open)
        .ok_or_else(|| SealError(format!("the body does not start with `--{BOUNDARY}`")))?;
    let mut parts = Vec::new();
    loop {
        if parts.len() >= MAX_PARTS {
            return err("too many parts");
        }
        // The header section, up to the boundary before the octet stream.
        let end = find(rest, open).ok_or_else(|| SealError("a part has no payload".into()))?;
        let head = std::str::from_utf8(&rest[..end])
            .map_err(|_| SealError("a part header is not text".into()))?;
        let mut protocol = None;
        let mut length = None;
        for line in head.split("\r\n").filter(|l| !l.trim().is_empty()) {
            if let Some(v) = header(line, "Content-Type") {
                protocol = Some(v);
            } else if let Some(v) = header(line, "OriginalContent") {
                let l = v
                    .split(';')
                    .find_map(|p| p.trim().strip_prefix("Length="))
                    .ok_or_else(|| SealError("OriginalContent without Length".into()))?;
                length = Some(
                    l.trim()
                        .parse::<usize>()
                        .map_err(|_| SealError(format!("bad Length `{l}`")))?,
                );
            }
        }
        let protocol = protocol.ok_or_else(|| SealError("a part has no Content-Type".into()))?;
        let original_length =
            length.ok_or_else(|| SealError("a part has no OriginalContent length".into()))?;
        rest = &rest[end + open.len()..];
        // `\tContent-Type: application/octet-stream\r\n`, then the binary payload.
        let eol = find(rest, b"\r\n").ok_or_else(|| SealError("no payload header".into()))?;
        let line = std::str::from_utf8(&rest[..eol]).unwrap_or("");
        if !header(line, "Content-Type")
            .is_some_and(|v| v.eq_ignore_ascii_case("application/octet-stream"))
        {
            return err("the payload is not application/octet-stream");
        }
        rest = &rest[eol + 2..];
        if rest.len() < 4 {
            return err("the payload is shorter than its signature length");
        }
        let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if n > MAX_SIGNATURE || rest.len() - 4 < n {
            return err(format!("bad signature length {n}"));
        }
        let signature = &rest[4..4 + n];
        rest = &rest[4 + n..];
        // The sealed bytes run to the next boundary (the closing one, another part, or the end).
        let (sealed, tail) = match find(rest, &open[..open.len() - 2]) {
            Some(i) => rest.split_at(i),
            None => (rest, &[][..]),
        };
        parts.push(Part {
            protocol,
            original_length,
            signature,
            sealed,
        });
        if tail.is_empty() {
            return Ok(parts);
        }
        if let Some(after) = tail.strip_prefix(close) {
            if after.iter().all(u8::is_ascii_whitespace) {
                return Ok(parts);
            }
            return err("data after the closing boundary");
        }
        rest = tail
            .strip_prefix(open)
            .ok_or_else(|| SealError("a boundary without CRLF".into()))?;
    }
}

/// Seals `plain` with `session` and frames it.
pub fn wrap(session: &mut dyn Seal, protocol: &str, plain: &[u8]) -> Result<Vec<u8>, SealError> {
    let (sig, sealed) = session.seal(plain)?;
    Ok(encode(protocol, plain.len(), &sig, &sealed))
}

/// Unframes `body`, unseals each part with `session` and checks each part's length against its
/// `OriginalContent` (a mismatch means the message was altered).
pub fn unwrap(session: &mut dyn Seal, body: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut out = Vec::new();
    for p in decode(body)? {
        let plain = session.unseal(p.signature, p.sealed)?;
        if plain.len() != p.original_length {
            return err(format!(
                "the payload is {} bytes, its header says {}",
                plain.len(),
                p.original_length
            ));
        }
        out.extend_from_slice(&plain);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_and_without_the_closing_boundary() {
        let body = encode(PROTOCOL_SPNEGO, 5, &[7; 16], b"abcde");
        let p = decode(&body).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].protocol, PROTOCOL_SPNEGO);
        assert_eq!(p[0].original_length, 5);
        assert_eq!(p[0].signature, &[7; 16]);
        assert_eq!(p[0].sealed, b"abcde");
        // pywinrm's requests end right after the payload.
        let open = body.len() - format!("--{BOUNDARY}--\r\n").len();
        let p = decode(&body[..open]).unwrap();
        assert_eq!(p[0].sealed, b"abcde");
    }

    #[test]
    fn two_parts() {
        let mut body = encode(PROTOCOL_SPNEGO, 1, &[1; 4], b"x");
        body.truncate(body.len() - format!("--{BOUNDARY}--\r\n").len());
        body.extend(encode(PROTOCOL_SPNEGO, 2, &[2; 4], b"yz"));
        let p = decode(&body).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].sealed, b"yz");
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let good = encode(PROTOCOL_SPNEGO, 5, &[7; 16], b"abcde");
        for n in 0..good.len() - 30 {
            let _ = decode(&good[..n]);
        }
        assert!(decode(b"<s:Envelope/>").is_err());
        let bad = String::from_utf8_lossy(&good).replace("Length=5", "Length=x");
        assert!(decode(bad.as_bytes()).is_err());
        let mut huge = good.clone();
        let at = find(&huge, b"stream\r\n").unwrap() + 8;
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
    }
}
