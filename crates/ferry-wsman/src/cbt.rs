//! Channel binding for WinRM over HTTPS (Extended Protection for Authentication, ADR 0172),
//! sans I/O:
//!
//! - [`tls_server_end_point`]: the RFC 5929 `tls-server-end-point` binding of a server
//!   certificate: `tls-server-end-point:` followed by the certificate's hash, where the hash is
//!   the one of the certificate's signature algorithm, SHA-256 when that is MD5 or SHA-1
//!   (RFC 5929 §4.1); none is defined for a signature without a single hash (Ed25519).
//! - [`bindings_hash`]: what NTLMv2 carries in the `MsvAvChannelBindings` AV pair: the MD5 of the
//!   `gss_channel_bindings_struct` (RFC 2744 §3.11, no addresses) around that binding.
//! - [`authenticate_bindings`]: reads that AV pair back out of an NTLM AUTHENTICATE message
//!   (MS-NLMP 2.2.1.3, 2.2.2.7), for an acceptor that must tell a missing binding from a
//!   matching one (`sspi`'s acceptor checks a binding only when the client sent one).
//!
//! Hashing is the `sha2` and `md-5` crates'; only the message layouts are read here.

use md5::Md5;
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};

/// The binding's prefix (RFC 5929 §4).
pub const TLS_SERVER_END_POINT: &[u8] = b"tls-server-end-point:";
/// `MsvAvChannelBindings` (MS-NLMP 2.2.2.1).
const AV_CHANNEL_BINDINGS: u16 = 0x000A;
/// `MsvAvEOL`.
const AV_EOL: u16 = 0x0000;

/// Why a binding cannot be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CbtError {
    /// The certificate is not DER the way X.509 lays it out.
    #[error("channel binding: the server certificate cannot be read: {0}")]
    Certificate(String),
    /// RFC 5929 defines no binding for this signature algorithm.
    #[error(
        "channel binding: RFC 5929 defines no tls-server-end-point hash for the server certificate's signature algorithm {0}"
    )]
    NoHash(String),
    /// The NTLM AUTHENTICATE message is malformed.
    #[error("channel binding: the NTLM AUTHENTICATE message is malformed: {0}")]
    Authenticate(&'static str),
}

/// A hash a binding is made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingHash {
    /// SHA-224.
    Sha224,
    /// SHA-256 (also for MD5 and SHA-1 signatures).
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl BindingHash {
    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha224 => Sha224::digest(data).to_vec(),
            Self::Sha256 => Sha256::digest(data).to_vec(),
            Self::Sha384 => Sha384::digest(data).to_vec(),
            Self::Sha512 => Sha512::digest(data).to_vec(),
        }
    }
}

/// One DER element: (tag, content, rest after it).
fn tlv(b: &[u8]) -> Result<(u8, &[u8], &[u8]), CbtError> {
    let bad = |m: &str| CbtError::Certificate(m.to_string());
    let (&tag, b) = b.split_first().ok_or_else(|| bad("truncated"))?;
    let (&first, b) = b.split_first().ok_or_else(|| bad("truncated length"))?;
    let (len, b) = if first < 0x80 {
        (usize::from(first), b)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return Err(bad("bad length"));
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |a, x| (a << 8) | usize::from(*x));
        (len, &b[n..])
    };
    if b.len() < len {
        return Err(bad("an element runs past the end"));
    }
    Ok((tag, &b[..len], &b[len..]))
}

fn sequence(b: &[u8]) -> Result<(&[u8], &[u8]), CbtError> {
    match tlv(b)? {
        (0x30, content, rest) => Ok((content, rest)),
        (t, _, _) => Err(CbtError::Certificate(format!(
            "expected a SEQUENCE, found tag {t:#04x}"
        ))),
    }
}

/// An OID's content as dotted text (for messages).
fn oid_text(c: &[u8]) -> String {
    let mut out = Vec::new();
    let mut v: u64 = 0;
    for (k, b) in c.iter().enumerate() {
        v = (v << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if out.is_empty() && k < c.len() {
                let (a, b) = if v < 80 {
                    (v / 40, v % 40)
                } else {
                    (2, v - 80)
                };
                out.push(a.to_string());
                out.push(b.to_string());
            } else {
                out.push(v.to_string());
            }
            v = 0;
        }
    }
    out.join(".")
}

/// The hash a signature algorithm (`AlgorithmIdentifier` content) binds with.
fn hash_of(alg: &[u8]) -> Result<BindingHash, CbtError> {
    let (tag, oid, params) = tlv(alg)?;
    if tag != 0x06 {
        return Err(CbtError::Certificate(
            "the signature algorithm has no OID".into(),
        ));
    }
    let name = oid_text(oid);
    Ok(match name.as_str() {
        // md5/sha1 with RSA, ecdsa-with-SHA1, dsa-with-sha1: SHA-256 (RFC 5929 §4.1).
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.10045.4.1"
        | "1.2.840.10040.4.3" => BindingHash::Sha256,
        "1.2.840.113549.1.1.14" | "1.2.840.10045.4.3.1" => BindingHash::Sha224,
        "1.2.840.113549.1.1.11" | "1.2.840.10045.4.3.2" | "2.16.840.1.101.3.4.3.2" => {
            BindingHash::Sha256
        }
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => BindingHash::Sha384,
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => BindingHash::Sha512,
        // RSASSA-PSS: the hash is in the parameters ([0] hashAlgorithm, SHA-1 by default).
        "1.2.840.113549.1.1.10" => pss_hash(params)?,
        _ => return Err(CbtError::NoHash(name)),
    })
}

fn pss_hash(params: &[u8]) -> Result<BindingHash, CbtError> {
    let Ok((fields, _)) = sequence(params) else {
        return Ok(BindingHash::Sha256);
    };
    let Ok((0xA0, explicit, _)) = tlv(fields) else {
        return Ok(BindingHash::Sha256);
    };
    let (alg, _) = sequence(explicit)?;
    let (_, oid, _) = tlv(alg)?;
    Ok(match oid_text(oid).as_str() {
        "2.16.840.1.101.3.4.2.4" => BindingHash::Sha224,
        "2.16.840.1.101.3.4.2.2" => BindingHash::Sha384,
        "2.16.840.1.101.3.4.2.3" => BindingHash::Sha512,
        _ => BindingHash::Sha256,
    })
}

/// The hash RFC 5929 §4.1 binds certificate `der` with.
pub fn binding_hash(der: &[u8]) -> Result<BindingHash, CbtError> {
    let (cert, _) = sequence(der)?;
    let (_tbs, rest) = sequence(cert)?;
    let (alg, _) = sequence(rest)?;
    hash_of(alg)
}

/// The `tls-server-end-point` channel binding (application data) of server certificate `der`.
pub fn tls_server_end_point(der: &[u8]) -> Result<Vec<u8>, CbtError> {
    let h = binding_hash(der)?;
    let mut out = TLS_SERVER_END_POINT.to_vec();
    out.extend(h.digest(der));
    Ok(out)
}

/// The MD5 of the `gss_channel_bindings_struct` around `application_data` (no initiator or
/// acceptor address): the `MsvAvChannelBindings` value.
pub fn bindings_hash(application_data: &[u8]) -> [u8; 16] {
    let mut m = Md5::new();
    // initiator_addrtype, initiator_address length, acceptor_addrtype, acceptor_address length.
    m.update([0u8; 16]);
    m.update((application_data.len() as u32).to_le_bytes());
    m.update(application_data);
    m.finalize().into()
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The `MsvAvChannelBindings` value of an NTLM AUTHENTICATE message: `None` when the client
/// sent none (or only zeros, which MS-NLMP lets a client send when it has no binding).
pub fn authenticate_bindings(msg: &[u8]) -> Result<Option<[u8; 16]>, CbtError> {
    let bad = CbtError::Authenticate;
    if !msg.starts_with(b"NTLMSSP\0") {
        return Err(bad("no NTLMSSP signature"));
    }
    if u32_at(msg, 8) != Some(3) {
        return Err(bad("not an AUTHENTICATE message"));
    }
    // NtChallengeResponseFields: Len (2), MaxLen (2), BufferOffset (4) at 20.
    let len = usize::from(u16_at(msg, 20).ok_or(bad("truncated"))?);
    let off = u32_at(msg, 24).ok_or(bad("truncated"))? as usize;
    let nt = msg
        .get(off..off.checked_add(len).ok_or(bad("bad offset"))?)
        .ok_or(bad("the NT response runs past the end"))?;
    if nt.len() == 24 {
        // NTLMv1 carries no AV pairs.
        return Ok(None);
    }
    // NTLMv2_RESPONSE: NTProofStr (16), then NTLMv2_CLIENT_CHALLENGE: RespType, HiRespType,
    // Reserved1 (2), Reserved2 (4), TimeStamp (8), ChallengeFromClient (8), Reserved3 (4),
    // AvPairs.
    let mut pairs = nt
        .get(16 + 28..)
        .ok_or(bad("the NTLMv2 response is too short"))?;
    loop {
        let id = u16_at(pairs, 0).ok_or(bad("an AV pair runs past the end"))?;
        let n = usize::from(u16_at(pairs, 2).ok_or(bad("an AV pair runs past the end"))?);
        let value = pairs
            .get(4..4 + n)
            .ok_or(bad("an AV pair runs past the end"))?;
        match id {
            AV_EOL => return Ok(None),
            AV_CHANNEL_BINDINGS => {
                let v: [u8; 16] = value
                    .try_into()
                    .map_err(|_| bad("MsvAvChannelBindings is not 16 bytes"))?;
                return Ok((v != [0; 16]).then_some(v));
            }
            _ => pairs = &pairs[4 + n..],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oids_read_as_text() {
        assert_eq!(
            oid_text(&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0B]),
            "1.2.840.113549.1.1.11"
        );
        assert_eq!(
            oid_text(&[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x02]),
            "1.2.840.10045.4.3.2"
        );
    }

    #[test]
    fn md5_and_sha1_signatures_bind_with_sha256() {
        let alg = |oid: &[u8]| {
            let mut v = vec![0x06, oid.len() as u8];
            v.extend(oid);
            v
        };
        let sha1_rsa = alg(&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x05]);
        let md5_rsa = alg(&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x04]);
        let sha384_ec = alg(&[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x03]);
        let ed25519 = alg(&[0x2B, 0x65, 0x70]);
        assert_eq!(hash_of(&sha1_rsa), Ok(BindingHash::Sha256));
        assert_eq!(hash_of(&md5_rsa), Ok(BindingHash::Sha256));
        assert_eq!(hash_of(&sha384_ec), Ok(BindingHash::Sha384));
        assert_eq!(
            hash_of(&ed25519),
            Err(CbtError::NoHash("1.3.101.112".into()))
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for b in [
            &b""[..],
            b"\x30",
            b"\x30\x84\xff\xff\xff\xff",
            b"\x30\x02\x30\x05",
        ] {
            assert!(tls_server_end_point(b).is_err());
        }
        for m in [&b""[..], b"NTLMSSP\0\x03\0\0\0", b"NTLMSSP\0\x01\0\0\0"] {
            assert!(authenticate_bindings(m).is_err());
        }
    }

    /// An AUTHENTICATE with the given AV pairs in its NTLMv2 response.
    fn authenticate(pairs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut nt = vec![0xAB; 16];
        nt.extend([1, 1, 0, 0]);
        nt.extend([0; 24]);
        for (id, v) in pairs {
            nt.extend(id.to_le_bytes());
            nt.extend((v.len() as u16).to_le_bytes());
            nt.extend(*v);
        }
        let mut m = b"NTLMSSP\0".to_vec();
        m.extend(3u32.to_le_bytes());
        m.extend([0; 8]);
        m.extend((nt.len() as u16).to_le_bytes());
        m.extend((nt.len() as u16).to_le_bytes());
        m.extend(64u32.to_le_bytes());
        m.resize(64, 0);
        m.extend(nt);
        m
    }

    proptest::proptest! {
        /// The fuzz target's entry points on arbitrary input (and on AUTHENTICATE-shaped
        /// input): never a panic.
        #[test]
        fn readers_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = tls_server_end_point(&data);
            let _ = authenticate_bindings(&data);
            let mut m = b"NTLMSSP\0\x03\0\0\0".to_vec();
            m.extend(&data);
            let _ = authenticate_bindings(&m);
        }
    }

    #[test]
    fn the_binding_av_pair_is_found_or_missing() {
        let h = bindings_hash(b"tls-server-end-point:abc");
        let with = authenticate(&[(2, b"D\0"), (AV_CHANNEL_BINDINGS, &h), (0, b"")]);
        assert_eq!(authenticate_bindings(&with), Ok(Some(h)));
        let zeros = authenticate(&[(AV_CHANNEL_BINDINGS, &[0; 16]), (0, b"")]);
        assert_eq!(authenticate_bindings(&zeros), Ok(None));
        let without = authenticate(&[(2, b"D\0"), (0, b"")]);
        assert_eq!(authenticate_bindings(&without), Ok(None));
        let cut = authenticate(&[(2, b"D\0")]);
        assert!(authenticate_bindings(&cut).is_err());
    }
}
