//! Small sans-I/O helpers: bounds-checked integer decoding, CRC-32C, GUIDs, UTF-16 strings.

/// Little-endian u16 at `off` (0 if out of bounds; callers size-check their slices first).
pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}
pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
}
pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .map_or(0, |s| u16::from_be_bytes([s[0], s[1]]))
}
pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .map_or(0, |s| u64::from_be_bytes(s.try_into().unwrap_or([0; 8])))
}

pub(crate) fn put_le16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_le32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_le64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_be16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}
pub(crate) fn put_be32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
pub(crate) fn put_be64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

const fn crc32c_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}
static CRC32C: [u32; 256] = crc32c_table();

/// CRC-32C (Castagnoli), as VHDX uses for headers, region tables and log entries. Only small
/// metadata structures are checksummed, so a table-driven loop is fast enough.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC32C[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// CRC-32C of `data` with the four bytes at `field` taken as zero (how VHDX checksums itself).
pub(crate) fn crc32c_without(data: &[u8], field: usize) -> u32 {
    let mut copy = data.to_vec();
    if let Some(f) = copy.get_mut(field..field + 4) {
        f.fill(0);
    }
    crc32c(&copy)
}

/// A GUID in the Microsoft mixed-endian layout, as 16 raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub(crate) fn from_slice(b: &[u8], off: usize) -> Self {
        let mut g = [0u8; 16];
        if let Some(s) = b.get(off..off + 16) {
            g.copy_from_slice(s);
        }
        Self(g)
    }

    /// Parses `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX` (braces optional) into the MS layout.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let s = s.trim().trim_start_matches('{').trim_end_matches('}');
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 || s.len() != 36 {
            return None;
        }
        let mut raw = [0u8; 16];
        for (i, r) in raw.iter_mut().enumerate() {
            *r = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        let mut g = raw;
        g[0..4].reverse();
        g[4..6].reverse();
        g[6..8].reverse();
        Some(Self(g))
    }

    pub(crate) const fn from_str_const(s: &str) -> Self {
        // Used for the well-known VHDX GUIDs; `s` is a literal in canonical form.
        let b = s.as_bytes();
        let mut raw = [0u8; 16];
        let mut i = 0;
        let mut j = 0;
        while i < b.len() {
            if b[i] == b'-' {
                i += 1;
                continue;
            }
            raw[j / 2] = (raw[j / 2] << 4) | hexval(b[i]);
            j += 1;
            i += 1;
        }
        let mut g = raw;
        g[0] = raw[3];
        g[1] = raw[2];
        g[2] = raw[1];
        g[3] = raw[0];
        g[4] = raw[5];
        g[5] = raw[4];
        g[6] = raw[7];
        g[7] = raw[6];
        Self(g)
    }

    pub(crate) fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

const fn hexval(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
            g[3],
            g[2],
            g[1],
            g[0],
            g[5],
            g[4],
            g[7],
            g[6],
            g[8],
            g[9],
            g[10],
            g[11],
            g[12],
            g[13],
            g[14],
            g[15]
        )
    }
}

impl std::fmt::Debug for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{{{self}}}")
    }
}

/// Decodes UTF-16 (little- or big-endian) up to the first NUL, replacing invalid units.
pub(crate) fn utf16(b: &[u8], big_endian: bool) -> String {
    let units = b
        .chunks_exact(2)
        .map(|c| {
            if big_endian {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_le_bytes([c[0], c[1]])
            }
        })
        .take_while(|u| *u != 0);
    char::decode_utf16(units)
        .map(|r| r.unwrap_or('\u{FFFD}'))
        .collect()
}

pub(crate) fn to_utf16(s: &str, big_endian: bool) -> Vec<u8> {
    s.encode_utf16()
        .flat_map(|u| {
            if big_endian {
                u.to_be_bytes()
            } else {
                u.to_le_bytes()
            }
        })
        .collect()
}

/// A fresh random-ish GUID/id without a crypto dependency: identity fields only need to differ
/// between images, not to be unpredictable.
pub(crate) fn fresh_id() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u8; 16];
    for (i, half) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    // RFC 4122 version 4 / variant bits, so tools that validate GUIDs accept them.
    out[7] = (out[7] & 0x0f) | 0x40;
    out[8] = (out[8] & 0x3f) | 0x80;
    out
}

/// True if every byte of `b` is zero (word-at-a-time; this sits on the write path).
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: every bit pattern is a valid u64, and align_to keeps the slices in bounds.
        unsafe { b.align_to::<u64>() }
    };
    pre.iter().all(|x| *x == 0) && post.iter().all(|x| *x == 0) && mid.iter().all(|x| *x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vector() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn guid_round_trip() {
        let g = Guid::from_str_const("2DC27766-F623-4200-9D64-115E9BFD4A08");
        assert_eq!(g.to_string(), "2DC27766-F623-4200-9D64-115E9BFD4A08");
        assert_eq!(
            Guid::parse("{2dc27766-f623-4200-9d64-115e9bfd4a08}"),
            Some(g)
        );
        assert_eq!(g.0[0], 0x66);
    }

    #[test]
    fn zero_check() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        v[4098] = 1;
        assert!(!is_zero(&v));
        assert!(!is_zero(&v[1..]));
        assert!(is_zero(&v[..4098]));
    }
}
