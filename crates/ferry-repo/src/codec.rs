//! Sans-I/O encoding of every sealed object: chunks, disk indexes, manifests, catalog
//! segments. Pure functions of bytes and keys, so the engine can run [`ChunkCodec::encode`] on
//! any thread and the fuzz targets can feed [`ChunkCodec::decode`] and friends arbitrary input.
//!
//! Sealed envelope, format v1 (all integers little-endian):
//!
//! ```text
//! 0   magic        [u8; 4]   FRYC chunk, FRYI index, FRYM manifest, FRYT catalog segment
//! 4   version      u16       1
//! 6   compression  u8        0 = stored, 1 = zstd, 2 = LZ4 block
//! 7   protection   u8        1 = AES-256-GCM, 2 = keyed BLAKE3 MAC (unencrypted repository)
//! 8   plain_len    u32       payload length after decompression
//! 12  reserved     u32       0
//! 16  nonce        [u8; 12]  AES-256-GCM only
//! ..  body                   ciphertext + 16-byte tag | stored bytes + 32-byte MAC
//! ```
//!
//! The associated data of the AEAD (or the MAC input) is the 16-byte header followed by the
//! object's *context* — its object key, or for chunks the chunk id — so an object moved to another
//! key, or a header byte flipped, fails authentication.

use crate::error::{RepoError, Result};
use bytes::Bytes;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use std::fmt;

/// Current format version of every object.
pub const FORMAT_VERSION: u16 = 1;
/// Magic of a chunk object.
pub const MAGIC_CHUNK: [u8; 4] = *b"FRYC";
/// Magic of a disk index object.
pub const MAGIC_INDEX: [u8; 4] = *b"FRYI";
/// Magic of a restore-point manifest.
pub const MAGIC_MANIFEST: [u8; 4] = *b"FRYM";
/// Magic of a catalog segment.
pub const MAGIC_CATALOG: [u8; 4] = *b"FRYT";
/// Magic of a verification record or screenshot (`snapshots/<id>/verify/…`).
pub const MAGIC_VERIFICATION: [u8; 4] = *b"FRYV";

const HEADER_LEN: usize = 16;
const TAG_LEN: usize = 16;
const MAC_LEN: usize = 32;
const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;
const COMPRESSION_LZ4: u8 = 2;
const PROTECTION_AES_GCM: u8 = 1;
const PROTECTION_MAC: u8 = 2;

/// Largest chunk size a repository may use (and so the largest plaintext a chunk may claim).
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Smallest chunk size a repository may use.
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
/// Largest plaintext of a metadata object (an index of a 64 TiB disk at 1 MiB chunks is 2 GiB;
/// bigger disks need bigger chunks).
pub const MAX_META_LEN: u32 = u32::MAX;

/// Keyed-hash id of a chunk's plaintext. In encrypted repositories the key is secret, so ids
/// reveal nothing about content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The sentinel stored in indexes for an all-zero chunk (never a real object).
    pub const ZERO: ChunkId = ChunkId([0; 32]);

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let v = unhex(s)?;
        Some(Self(v.try_into().ok()?))
    }

    /// True for the zero-chunk sentinel.
    pub fn is_zero(&self) -> bool {
        *self == Self::ZERO
    }

    /// The object key of the chunk: `chunks/<first two hex digits>/<hex>`.
    pub fn object_key(&self) -> String {
        let h = self.to_hex();
        format!("chunks/{}/{}", &h[..2], h)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    // Only the canonical lower-case form `hex()` writes: accepting `A` for `a` would let a flipped
    // case bit in a stored object go unnoticed (the tamper test found one in key slots).
    if s.len() % 2 != 0
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Fills `buf` from the OS random source.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    // The OS RNG failing is unrecoverable and must not degrade into weak nonces or keys.
    getrandom::fill(&mut buf).expect("the operating system's random number generator failed");
    buf
}

/// The keys of an open repository, all derived from its 32-byte master key.
pub struct Keys {
    master: [u8; 32],
    id_key: [u8; 32],
    mac_key: [u8; 32],
    aead: Option<LessSafeKey>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("encrypted", &self.aead.is_some())
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// Derives the keys from a master key; `encrypted` selects AES-256-GCM, else keyed MACs only.
    pub fn from_master(master: [u8; 32], encrypted: bool) -> Self {
        let id_key = blake3::derive_key("ferry-repo v1 chunk id", &master);
        let mac_key = blake3::derive_key("ferry-repo v1 object mac", &master);
        let aead = encrypted.then(|| {
            let k = blake3::derive_key("ferry-repo v1 object encryption", &master);
            // A 32-byte key is always valid for AES-256.
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).expect("AES-256 key length"))
        });
        Self {
            master,
            id_key,
            mac_key,
            aead,
        }
    }

    pub(crate) fn master(&self) -> &[u8; 32] {
        &self.master
    }

    /// Whether objects are encrypted.
    pub fn encrypted(&self) -> bool {
        self.aead.is_some()
    }

    /// The id of a chunk's plaintext.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id_key, plaintext).as_bytes())
    }

    /// A keyed digest of arbitrary bytes (binds an index object to its manifest).
    pub fn digest(&self, data: &[u8]) -> String {
        hex(blake3::keyed_hash(&self.mac_key, data).as_bytes())
    }

    /// MAC of a config object body.
    pub(crate) fn config_mac(&self, body: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.mac_key);
        h.update(b"ferry-repo config v1\0");
        h.update(body);
        *h.finalize().as_bytes()
    }
}

/// True when every byte is zero (word-at-a-time: this runs on every chunk of every disk).
pub fn is_all_zero(data: &[u8]) -> bool {
    let (words, tail) = data.split_at(data.len() / 16 * 16);
    tail.iter().all(|b| *b == 0)
        && words
            .chunks_exact(16)
            .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
}

/// How an object's payload is compressed before it is sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Stored as is.
    None,
    /// zstd at a level (-7..=22).
    Zstd(i32),
    /// The LZ4 block format: compresses about 1.5× faster than zstd's fastest level and
    /// decompresses about 3× faster, for ~10 % larger objects (ADR 0055).
    Lz4,
}

/// Seals `payload` into an envelope with `magic`, compressing it when that shrinks it.
pub fn seal(
    keys: &Keys,
    magic: [u8; 4],
    context: &[u8],
    payload: &[u8],
    compression: Compression,
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(sealed_capacity(keys, payload.len()));
    seal_into(keys, magic, context, payload, compression, &mut out)?;
    Ok(out)
}

/// The most bytes [`seal`] makes of a `len`-byte payload (stored uncompressed).
fn sealed_capacity(keys: &Keys, len: usize) -> usize {
    HEADER_LEN + if keys.aead.is_some() { NONCE_LEN } else { 0 } + len + MAC_LEN
}

/// Appends the envelope to `out` (which has room for [`sealed_capacity`] more bytes, so it is
/// never reallocated).
fn seal_into(
    keys: &Keys,
    magic: [u8; 4],
    context: &[u8],
    payload: &[u8],
    compression: Compression,
    out: &mut Vec<u8>,
) -> Result<()> {
    let plain_len = u32::try_from(payload.len()).map_err(|_| {
        RepoError::Usage(format!(
            "object of {} bytes is too large to seal",
            payload.len()
        ))
    })?;
    let protection = if keys.encrypted() {
        PROTECTION_AES_GCM
    } else {
        PROTECTION_MAC
    };
    // One buffer from the start: header and nonce, then the body compressed straight into place.
    let start = out.len();
    let prefix = start + HEADER_LEN + if keys.aead.is_some() { NONCE_LEN } else { 0 };
    out.resize(prefix, 0);
    let compression = compress_into(payload, compression, out);
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&magic);
    header[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[6] = compression;
    header[7] = protection;
    header[8..12].copy_from_slice(&plain_len.to_le_bytes());
    out[start..start + HEADER_LEN].copy_from_slice(&header);
    match &keys.aead {
        Some(aead) => {
            let nonce: [u8; NONCE_LEN] = random_bytes();
            out[start + HEADER_LEN..prefix].copy_from_slice(&nonce);
            let aad = aad(&header, context);
            let tag = aead
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad),
                    &mut out[prefix..],
                )
                .map_err(|_| {
                    RepoError::Usage("AES-256-GCM refused to seal (object too large)".into())
                })?;
            out.extend_from_slice(tag.as_ref());
        }
        None => {
            let mac = mac(keys, &header, context, &out[prefix..]);
            out.extend_from_slice(&mac);
        }
    }
    Ok(())
}

fn aad(header: &[u8; HEADER_LEN], context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(HEADER_LEN + context.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(context);
    aad
}

fn mac(keys: &Keys, header: &[u8], context: &[u8], body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&keys.mac_key);
    h.update(header);
    h.update(&(context.len() as u64).to_le_bytes());
    h.update(context);
    h.update(body);
    *h.finalize().as_bytes()
}

/// Appends `payload` to `out`, compressed when that saves at least 1/64 (decompressing costs
/// CPU on every restore) and stored otherwise; returns the method used.
fn compress_into(payload: &[u8], compression: Compression, out: &mut Vec<u8>) -> u8 {
    let worth = payload.len() - payload.len() / 64;
    match compression {
        Compression::Lz4 if lz4_into(payload, worth, out) => return COMPRESSION_LZ4,
        Compression::Zstd(level) => {
            if let Some(c) = compress_zstd(payload, level).filter(|c| c.len() < worth) {
                out.extend_from_slice(&c);
                return COMPRESSION_ZSTD;
            }
        }
        _ => {}
    }
    out.extend_from_slice(payload);
    COMPRESSION_NONE
}

/// `payload` compressed the way a chunk would be (or stored, when that does not pay), and the
/// method byte; for measuring the codec on its own (`ferry benchmark`).
pub fn compress_chunk(payload: &[u8], compression: Compression) -> (u8, Vec<u8>) {
    let mut out = Vec::with_capacity(payload.len());
    let method = compress_into(payload, compression, &mut out);
    (method, out)
}

/// LZ4-compresses `payload` onto the end of `out` if the result is under `limit` bytes.
fn lz4_into(payload: &[u8], limit: usize, out: &mut Vec<u8>) -> bool {
    let (Ok(src_len), Ok(cap)) = (
        i32::try_from(payload.len()),
        i32::try_from(limit.saturating_sub(1)),
    ) else {
        return false;
    };
    out.reserve(limit);
    let dst = out.spare_capacity_mut();
    // SAFETY: `payload` is readable for `src_len` bytes and `dst` is writable for at least
    // `cap` bytes (reserved above; LZ4 only writes, so uninitialized memory is fine). LZ4 never
    // writes more than `cap` bytes: it returns 0 instead when the output would not fit.
    let n = unsafe {
        lz4::liblz4::LZ4_compress_default(
            payload.as_ptr().cast(),
            dst.as_mut_ptr().cast(),
            src_len,
            cap,
        )
    };
    if n <= 0 {
        return false;
    }
    // SAFETY: LZ4 initialized the first `n` (≤ `cap`) spare bytes.
    unsafe { out.set_len(out.len() + n as usize) };
    true
}

fn compress_zstd(payload: &[u8], level: i32) -> Option<Vec<u8>> {
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
            const { std::cell::RefCell::new(None) };
    }
    let mut buf = Vec::with_capacity(zstd::zstd_safe::compress_bound(payload.len()));
    let ok = COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        match slot.as_mut() {
            Some((_, c)) => c.compress_to_buffer(payload, &mut buf).is_ok(),
            None => false,
        }
    });
    ok.then_some(buf)
}

/// Opens an envelope: checks magic and version, authenticates, decompresses. `max_len` bounds
/// the plaintext length the object may claim (checked before any allocation sized by it).
pub fn open(
    keys: &Keys,
    magic: [u8; 4],
    key: &str,
    context: &[u8],
    data: &[u8],
    max_len: u32,
) -> Result<Vec<u8>> {
    let corrupt = |reason: String| RepoError::corrupt(key, reason);
    if data.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "truncated: {} bytes, header needs {HEADER_LEN}",
            data.len()
        )));
    }
    let header: [u8; HEADER_LEN] = data[..HEADER_LEN].try_into().expect("header length");
    if header[..4] != magic {
        return Err(corrupt(format!(
            "bad magic {:?}, expected {:?}",
            String::from_utf8_lossy(&header[..4]),
            String::from_utf8_lossy(&magic)
        )));
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != FORMAT_VERSION {
        return Err(RepoError::UnsupportedVersion {
            key: key.to_string(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let compression = header[6];
    let protection = header[7];
    let plain_len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
    if header[12..16] != [0; 4] {
        return Err(corrupt("reserved header bytes are not zero".into()));
    }
    if plain_len > max_len {
        return Err(corrupt(format!(
            "claims {plain_len} bytes of payload, at most {max_len} allowed"
        )));
    }
    let rest = &data[HEADER_LEN..];
    let body: Vec<u8> = match (protection, &keys.aead) {
        (PROTECTION_AES_GCM, Some(aead)) => {
            if rest.len() < NONCE_LEN + TAG_LEN {
                return Err(corrupt(format!(
                    "truncated: {} bytes after the header",
                    rest.len()
                )));
            }
            let nonce: [u8; NONCE_LEN] = rest[..NONCE_LEN].try_into().expect("nonce length");
            let mut buf = rest[NONCE_LEN..].to_vec();
            let aad = aad(&header, context);
            let plain = aead
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&aad),
                    &mut buf,
                )
                .map_err(|_| corrupt("authentication failed (AES-256-GCM tag mismatch)".into()))?;
            let n = plain.len();
            buf.truncate(n);
            buf
        }
        (PROTECTION_MAC, None) => {
            if rest.len() < MAC_LEN {
                return Err(corrupt(format!(
                    "truncated: {} bytes after the header",
                    rest.len()
                )));
            }
            let (body, tag) = rest.split_at(rest.len() - MAC_LEN);
            if mac(keys, &header, context, body) != tag {
                return Err(corrupt("authentication failed (MAC mismatch)".into()));
            }
            body.to_vec()
        }
        (PROTECTION_AES_GCM, None) => {
            return Err(corrupt("is encrypted but the repository is not".into()));
        }
        (PROTECTION_MAC, Some(_)) => {
            return Err(corrupt("is not encrypted but the repository is".into()));
        }
        (other, _) => return Err(corrupt(format!("unknown protection scheme {other}"))),
    };
    let plain = decompress(compression, body, plain_len).map_err(corrupt)?;
    if plain.len() != plain_len as usize {
        return Err(corrupt(format!(
            "payload is {} bytes, header says {plain_len}",
            plain.len()
        )));
    }
    Ok(plain)
}

/// Undoes compression method `method` (the header's byte 6) on an authenticated `body` whose
/// plaintext the header says is `plain_len` bytes (already checked against the object kind's
/// bound). Public for the fuzz targets: in an object it is reached only after authentication.
pub fn decompress(
    method: u8,
    body: Vec<u8>,
    plain_len: u32,
) -> std::result::Result<Vec<u8>, String> {
    match method {
        COMPRESSION_NONE => Ok(body),
        COMPRESSION_ZSTD => zstd::bulk::decompress(&body, plain_len as usize)
            .map_err(|e| format!("zstd decompression failed: {e}")),
        COMPRESSION_LZ4 => {
            let len = i32::try_from(plain_len)
                .map_err(|_| format!("LZ4 payload of {plain_len} bytes is too large"))?;
            let mut out = vec![0u8; plain_len as usize];
            let n = lz4::block::decompress_to_buffer(&body, Some(len), &mut out)
                .map_err(|e| format!("LZ4 decompression failed: {e}"))?;
            out.truncate(n);
            Ok(out)
        }
        other => Err(format!("unknown compression {other}")),
    }
}

/// A chunk ready to upload: its id and the sealed object bytes.
#[derive(Clone)]
pub struct EncodedChunk {
    /// The chunk id (keyed hash of the plaintext).
    pub id: ChunkId,
    /// The sealed object.
    pub data: Bytes,
    /// Plaintext length.
    pub plain_len: usize,
}

impl fmt::Debug for EncodedChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncodedChunk")
            .field("id", &self.id)
            .field("stored", &self.data.len())
            .field("plain", &self.plain_len)
            .finish()
    }
}

/// Hash → compress → encrypt for chunks, and the reverse. Cheap to clone; call it from as many
/// threads as there are cores.
#[derive(Clone, Debug)]
pub struct ChunkCodec {
    keys: std::sync::Arc<Keys>,
    compression: Compression,
    chunk_size: u32,
}

impl ChunkCodec {
    /// A codec with `keys`, chunk `compression` and the repository's chunk size.
    pub fn new(keys: std::sync::Arc<Keys>, compression: Compression, chunk_size: u32) -> Self {
        Self {
            keys,
            compression,
            chunk_size,
        }
    }

    /// The keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The repository's chunk size.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The id of a chunk's plaintext (hash only: check it against known chunks before paying for
    /// compression and encryption).
    pub fn id(&self, plaintext: &[u8]) -> ChunkId {
        self.keys.chunk_id(plaintext)
    }

    /// Compresses and seals a chunk whose id is already known. CPU work: run it off the async
    /// executor.
    pub fn encode_with_id(&self, id: ChunkId, plaintext: &[u8]) -> Result<EncodedChunk> {
        if plaintext.len() > self.chunk_size as usize {
            return Err(RepoError::Usage(format!(
                "chunk of {} bytes exceeds the repository chunk size {}",
                plaintext.len(),
                self.chunk_size
            )));
        }
        // The object starts on a direct-I/O boundary, so a local repository writes it to disk
        // from this buffer, without a bounce copy (`direct.rs`).
        let align = ferry_core::aligned::DIRECT_ALIGN;
        let mut out =
            Vec::<u8>::with_capacity(align + sealed_capacity(&self.keys, plaintext.len()));
        let skip = out.as_ptr().align_offset(align).min(align);
        out.resize(skip, 0);
        seal_into(
            &self.keys,
            MAGIC_CHUNK,
            &id.0,
            plaintext,
            self.compression,
            &mut out,
        )?;
        Ok(EncodedChunk {
            id,
            data: Bytes::from(out).slice(skip..),
            plain_len: plaintext.len(),
        })
    }

    /// Hashes, compresses and seals a chunk.
    pub fn encode(&self, plaintext: &[u8]) -> Result<EncodedChunk> {
        self.encode_with_id(self.id(plaintext), plaintext)
    }

    /// Opens a chunk object and checks that its plaintext hashes to `id`.
    pub fn decode(&self, id: &ChunkId, data: &[u8]) -> Result<Vec<u8>> {
        let key = id.object_key();
        let plain = open(&self.keys, MAGIC_CHUNK, &key, &id.0, data, self.chunk_size)?;
        if self.keys.chunk_id(&plain) != *id {
            return Err(RepoError::corrupt(
                key,
                "content does not hash to the chunk id",
            ));
        }
        Ok(plain)
    }
}

/// A disk's fixed index: one chunk id (or the zero sentinel) per chunk, in disk order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskIndex {
    /// Virtual size of the disk in bytes.
    pub disk_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Chunk ids in disk order ([`ChunkId::ZERO`] for all-zero chunks).
    pub chunks: Vec<ChunkId>,
}

const INDEX_HEADER: usize = 24;

impl DiskIndex {
    /// Number of chunks a disk of `disk_size` bytes has at `chunk_size`.
    pub fn chunk_count(disk_size: u64, chunk_size: u32) -> u64 {
        disk_size.div_ceil(u64::from(chunk_size.max(1)))
    }

    /// Byte range of chunk `i`.
    pub fn chunk_range(&self, i: usize) -> std::ops::Range<u64> {
        let start = i as u64 * u64::from(self.chunk_size);
        start..(start + u64::from(self.chunk_size)).min(self.disk_size)
    }

    /// Payload bytes (before sealing).
    pub fn to_payload(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(INDEX_HEADER + self.chunks.len() * 32);
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.0);
        }
        out
    }

    /// Parses a payload, checking that the entry count matches the disk and chunk sizes and the
    /// payload length (so no allocation is sized by an unchecked field).
    pub fn from_payload(key: &str, p: &[u8]) -> Result<Self> {
        let corrupt = |r: String| RepoError::corrupt(key, r);
        if p.len() < INDEX_HEADER {
            return Err(corrupt(format!(
                "index payload truncated: {} bytes",
                p.len()
            )));
        }
        let disk_size = u64::from_le_bytes(p[0..8].try_into().expect("8"));
        let chunk_size = u32::from_le_bytes(p[8..12].try_into().expect("4"));
        let count = u64::from_le_bytes(p[16..24].try_into().expect("8"));
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(corrupt(format!(
                "index chunk size {chunk_size} out of range"
            )));
        }
        if count != Self::chunk_count(disk_size, chunk_size) {
            return Err(corrupt(format!(
                "index has {count} entries but a disk of {disk_size} bytes has {} chunks of {chunk_size}",
                Self::chunk_count(disk_size, chunk_size)
            )));
        }
        let body = &p[INDEX_HEADER..];
        if body.len() as u64 != count.saturating_mul(32) {
            return Err(corrupt(format!(
                "index body is {} bytes, {count} entries need {}",
                body.len(),
                count.saturating_mul(32)
            )));
        }
        let chunks = body
            .chunks_exact(32)
            .map(|c| ChunkId(c.try_into().expect("32")))
            .collect();
        Ok(Self {
            disk_size,
            chunk_size,
            chunks,
        })
    }

    /// Seals the index as object `key`.
    pub fn seal(&self, keys: &Keys, key: &str) -> Result<Vec<u8>> {
        seal(
            keys,
            MAGIC_INDEX,
            key.as_bytes(),
            &self.to_payload(),
            Compression::Zstd(1),
        )
    }

    /// Opens index object `key`.
    pub fn open(keys: &Keys, key: &str, data: &[u8]) -> Result<Self> {
        let p = open(keys, MAGIC_INDEX, key, key.as_bytes(), data, MAX_META_LEN)?;
        Self::from_payload(key, &p)
    }
}

/// Seals a catalog segment (a list of chunk ids known to be stored).
pub fn seal_catalog(keys: &Keys, key: &str, ids: &[ChunkId]) -> Result<Vec<u8>> {
    let mut p = Vec::with_capacity(8 + ids.len() * 32);
    p.extend_from_slice(&(ids.len() as u64).to_le_bytes());
    for id in ids {
        p.extend_from_slice(&id.0);
    }
    seal(keys, MAGIC_CATALOG, key.as_bytes(), &p, Compression::None)
}

/// Opens a catalog segment.
pub fn open_catalog(keys: &Keys, key: &str, data: &[u8]) -> Result<Vec<ChunkId>> {
    let p = open(keys, MAGIC_CATALOG, key, key.as_bytes(), data, MAX_META_LEN)?;
    if p.len() < 8 {
        return Err(RepoError::corrupt(key, "catalog segment truncated"));
    }
    let count = u64::from_le_bytes(p[..8].try_into().expect("8"));
    let body = &p[8..];
    if body.len() as u64 != count.saturating_mul(32) {
        return Err(RepoError::corrupt(
            key,
            format!("catalog body is {} bytes for {count} entries", body.len()),
        ));
    }
    Ok(body
        .chunks_exact(32)
        .map(|c| ChunkId(c.try_into().expect("32")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn codecs() -> [ChunkCodec; 2] {
        [
            ChunkCodec::new(
                Arc::new(Keys::from_master([7; 32], true)),
                Compression::Lz4,
                1 << 20,
            ),
            ChunkCodec::new(
                Arc::new(Keys::from_master([9; 32], false)),
                Compression::Zstd(3),
                1 << 20,
            ),
        ]
    }

    #[test]
    fn zero_check() {
        assert!(is_all_zero(&[0; 100]));
        let mut v = vec![0u8; 100];
        v[99] = 1;
        assert!(!is_all_zero(&v));
        v[99] = 0;
        v[3] = 1;
        assert!(!is_all_zero(&v));
        assert!(is_all_zero(&[]));
    }

    #[test]
    fn compressible_data_is_compressed_random_is_stored() {
        let text: Vec<u8> = b"ferry ".iter().cycle().take(1 << 20).copied().collect();
        let random: Vec<u8> = (0..1u32 << 18)
            .flat_map(|i| blake3::hash(&i.to_le_bytes()).as_bytes()[..4].to_vec())
            .collect();
        let mixed = crate::testdata::compressible(5, 1 << 20);
        for (enc, method) in codecs()
            .into_iter()
            .zip([COMPRESSION_LZ4, COMPRESSION_ZSTD])
        {
            // Whatever the outcome, the object starts on a direct-I/O boundary (`direct.rs`
            // writes it from there) and never outgrew its buffer.
            let encode = |p: &[u8]| {
                let e = enc.encode(p).unwrap();
                assert_eq!(
                    e.data
                        .as_ptr()
                        .align_offset(ferry_core::aligned::DIRECT_ALIGN),
                    0
                );
                e
            };
            let e = encode(&text);
            assert!(e.data.len() < 10_000, "{}", e.data.len());
            assert_eq!(e.data[6], method);
            assert_eq!(enc.decode(&e.id, &e.data).unwrap(), text);
            let e = encode(&mixed);
            assert_eq!(e.data[6], method);
            assert!(e.data.len() < mixed.len() * 2 / 3, "{}", e.data.len());
            assert_eq!(enc.decode(&e.id, &e.data).unwrap(), mixed);
            let e = encode(&random);
            assert_eq!(e.data[6], COMPRESSION_NONE);
            assert_eq!(enc.decode(&e.id, &e.data).unwrap(), random);
        }
    }

    #[test]
    fn wrong_key_and_moved_object_fail() {
        let [enc, plain] = codecs();
        let e = enc.encode(b"hello").unwrap();
        let other = ChunkCodec::new(
            Arc::new(Keys::from_master([8; 32], true)),
            Compression::Zstd(1),
            1 << 20,
        );
        assert!(other.decode(&e.id, &e.data).is_err());
        let f = enc.encode(b"world").unwrap();
        let err = enc.decode(&f.id, &e.data).unwrap_err();
        assert!(err.to_string().contains(&f.id.object_key()), "{err}");
        assert!(plain.decode(&e.id, &e.data).is_err());
    }

    #[test]
    fn future_version_is_refused() {
        let [enc, _] = codecs();
        let e = enc.encode(b"hello").unwrap();
        let mut d = e.data.to_vec();
        d[4] = 2;
        let err = enc.decode(&e.id, &d).unwrap_err();
        assert!(
            matches!(err, RepoError::UnsupportedVersion { found: 2, .. }),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn chunk_round_trip_and_any_flip_detected(
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            repeat in 1usize..4,
            flip in any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let data: Vec<u8> = data.iter().cycle().take(data.len() * repeat).copied().collect();
            for codec in codecs() {
                let e = codec.encode(&data).unwrap();
                prop_assert_eq!(&codec.decode(&e.id, &e.data).unwrap(), &data);
                let mut bad = e.data.to_vec();
                let i = flip.index(bad.len());
                bad[i] ^= 1 << bit;
                prop_assert!(codec.decode(&e.id, &bad).is_err());
                bad.truncate(i);
                prop_assert!(codec.decode(&e.id, &bad).is_err());
            }
        }

        #[test]
        fn index_round_trip_and_any_flip_detected(
            n in 0usize..40, tail in 0u64..(64 << 10),
            flip in any::<proptest::sample::Index>(), bit in 0u8..8,
        ) {
            let chunk_size = 64u32 << 10;
            let disk_size = n as u64 * u64::from(chunk_size) + tail;
            let count = DiskIndex::chunk_count(disk_size, chunk_size) as usize;
            let chunks = (0..count).map(|i| if i % 3 == 0 { ChunkId::ZERO } else { ChunkId(*blake3::hash(&[i as u8]).as_bytes()) }).collect();
            let idx = DiskIndex { disk_size, chunk_size, chunks };
            for codec in codecs() {
                let sealed = idx.seal(codec.keys(), "indexes/x/0").unwrap();
                prop_assert_eq!(&DiskIndex::open(codec.keys(), "indexes/x/0", &sealed).unwrap(), &idx);
                prop_assert!(DiskIndex::open(codec.keys(), "indexes/y/0", &sealed).is_err());
                let mut bad = sealed.clone();
                let i = flip.index(bad.len());
                bad[i] ^= 1 << bit;
                prop_assert!(DiskIndex::open(codec.keys(), "indexes/x/0", &bad).is_err());
            }
        }

        #[test]
        fn decoders_never_panic_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..200), magic_ok in any::<bool>()) {
            let mut data = data;
            if magic_ok && data.len() >= 16 {
                data[..4].copy_from_slice(&MAGIC_INDEX);
                data[4..6].copy_from_slice(&1u16.to_le_bytes());
            }
            fuzz_decode(&data);
        }
    }

    /// The same entry point the fuzz target drives.
    fn fuzz_decode(data: &[u8]) {
        crate::fuzz::decode_all(data);
    }
}
