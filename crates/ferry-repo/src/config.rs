//! The repository config object and password key slots (sans-I/O).
//!
//! `config` (written once, at init):
//!
//! ```text
//! 0   magic     "FRYR"
//! 4   version   u16 (1)
//! 6   reserved  u16 (0)
//! 8   body_len  u32
//! 12  body      JSON (RepoConfig)
//! ..  mac       [u8; 32] keyed BLAKE3 of the body under a key derived from the master key
//! ```
//!
//! `keys/<slot id>` (one per password; added, never changed):
//!
//! ```text
//! 0   magic "FRYK", version u16 (1), reserved u16, body_len u32, body JSON (KeySlot)
//! ```
//!
//! A key slot holds the 32-byte master key sealed with AES-256-GCM under a key derived from the
//! password by Argon2id with the stored parameters; the associated data binds it to the repository
//! id. The master key of an unencrypted repository sits in `config` in the clear (its MACs then
//! only catch accidents, not attackers; `--insecure-no-encryption` says so).

use crate::codec::{FORMAT_VERSION, Keys, hex, random_bytes, unhex};
use crate::error::{RepoError, Result};
use ferry_core::Secret;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

/// Magic of the config object.
pub const MAGIC_CONFIG: [u8; 4] = *b"FRYR";
/// Magic of a key slot object.
pub const MAGIC_KEYSLOT: [u8; 4] = *b"FRYK";
/// Object key of the config.
pub const CONFIG_KEY: &str = "config";
/// Largest config or key slot body accepted.
const MAX_SMALL_BODY: usize = 64 << 10;

/// How objects are protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encryption {
    /// AES-256-GCM with keys derived from a random master key held in password slots.
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// No encryption (explicit opt-in); objects carry keyed BLAKE3 MACs against accidents.
    None,
}

/// How chunks are compressed (metadata objects always use zstd).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompressionMethod {
    /// zstd at the configured level (repositories made before LZ4 existed say nothing, which
    /// means this).
    #[default]
    Zstd,
    /// LZ4 block format: the default of new repositories (ADR 0055).
    Lz4,
    /// Stored uncompressed.
    None,
}

impl CompressionMethod {
    fn is_zstd(&self) -> bool {
        *self == Self::Zstd
    }
}

/// The repository's settings, fixed at init.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RepoConfig {
    /// Random repository id (hex).
    pub id: String,
    /// When the repository was created (RFC 3339).
    pub created: String,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Chunk compression. Omitted for zstd, so zstd repositories stay readable by builds
    /// that predate the field.
    #[serde(default, skip_serializing_if = "CompressionMethod::is_zstd")]
    pub compression: CompressionMethod,
    /// zstd level for chunks (used when `compression` is zstd).
    pub compression_level: i32,
    /// Object protection.
    pub encryption: Encryption,
    /// How chunk ids are computed (`blake3-keyed`).
    pub chunk_id: String,
    /// The master key in hex, present only when `encryption` is `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_key: Option<String>,
    /// S3 Object Lock retention of every data object (ADR 0075). Builds that predate the
    /// field refuse such a repository (unknown field), which is what we want: they would not
    /// keep its retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immutability: Option<crate::immutable::Immutability>,
}

/// Argon2id parameters of a key slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 32 MiB, 4 passes, 1 lane (ADR 0015): above OWASP's Argon2id minimums, about a quarter
    /// second here, and small enough that unlocking fits the appliance's 64 MiB budget;
    /// unlocks happen once per command.
    fn default() -> Self {
        Self {
            memory_kib: 32 << 10,
            iterations: 4,
            parallelism: 1,
        }
    }
}

impl KdfParams {
    /// Cheap parameters for tests.
    pub fn insecure_fast() -> Self {
        Self {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }
    }

    fn check(&self, key: &str) -> Result<()> {
        // Bounds keep a hostile slot from making us allocate or spin without limit.
        if !(8..=(4 << 20)).contains(&self.memory_kib)
            || !(1..=64).contains(&self.iterations)
            || !(1..=16).contains(&self.parallelism)
        {
            return Err(RepoError::corrupt(
                key,
                format!(
                    "key slot has out-of-range Argon2id parameters (memory {} KiB, {} iteration(s), parallelism {})",
                    self.memory_kib, self.iterations, self.parallelism
                ),
            ));
        }
        Ok(())
    }
}

/// One password slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KeySlot {
    /// Key derivation function (`argon2id`).
    pub kdf: String,
    /// Its parameters.
    pub params: KdfParams,
    /// Salt (hex, 16 bytes).
    pub salt: String,
    /// AES-256-GCM nonce (hex, 12 bytes).
    pub nonce: String,
    /// The sealed master key (hex, 32 + 16 bytes).
    pub wrapped: String,
    /// When the slot was added (RFC 3339).
    pub created: String,
}

fn derive_kek(
    password: &Secret,
    salt: &[u8],
    params: &KdfParams,
    key: &str,
) -> Result<LessSafeKey> {
    params.check(key)?;
    let p = argon2::Params::new(
        params.memory_kib,
        params.iterations,
        params.parallelism,
        Some(32),
    )
    .map_err(|e| RepoError::corrupt(key, format!("Argon2id parameters rejected: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(password.expose().as_bytes(), salt, &mut out)
        .map_err(|e| RepoError::corrupt(key, format!("Argon2id failed: {e}")))?;
    Ok(LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &out).expect("AES-256 key length"),
    ))
}

/// Associated data of a slot: binds it to the repository and to its own fields that do not
/// already enter the key derivation (so no byte of a slot can change unnoticed).
fn slot_aad(repo_id: &str, created: &str) -> Vec<u8> {
    let mut aad = b"ferry-repo keyslot v1\0".to_vec();
    aad.extend_from_slice(repo_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(created.as_bytes());
    aad
}

impl KeySlot {
    /// Seals `master` under `password`.
    pub fn create(
        repo_id: &str,
        master: &[u8; 32],
        password: &Secret,
        params: KdfParams,
    ) -> Result<Self> {
        let salt: [u8; 16] = random_bytes();
        let nonce: [u8; NONCE_LEN] = random_bytes();
        let kek = derive_kek(password, &salt, &params, "keys/new")?;
        let created = crate::time::now_rfc3339();
        let mut buf = master.to_vec();
        kek.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(slot_aad(repo_id, &created)),
            &mut buf,
        )
        .map_err(|_| RepoError::Usage("sealing the master key failed".into()))?;
        Ok(Self {
            kdf: "argon2id".into(),
            params,
            salt: hex(&salt),
            nonce: hex(&nonce),
            wrapped: hex(&buf),
            created,
        })
    }

    /// The master key, if `password` opens this slot (`Ok(None)` if it does not).
    pub fn unwrap_master(
        &self,
        key: &str,
        repo_id: &str,
        password: &Secret,
    ) -> Result<Option<[u8; 32]>> {
        if self.kdf != "argon2id" {
            return Err(RepoError::corrupt(
                key,
                format!("unknown key derivation `{}`", self.kdf),
            ));
        }
        let bad =
            |what: &str| RepoError::corrupt(key, format!("key slot field `{what}` is malformed"));
        let salt = unhex(&self.salt)
            .filter(|s| s.len() >= 8)
            .ok_or_else(|| bad("salt"))?;
        let nonce: [u8; NONCE_LEN] = unhex(&self.nonce)
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| bad("nonce"))?;
        let mut wrapped = unhex(&self.wrapped)
            .filter(|w| w.len() == 48)
            .ok_or_else(|| bad("wrapped"))?;
        let kek = derive_kek(password, &salt, &self.params, key)?;
        match kek.open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(slot_aad(repo_id, &self.created)),
            &mut wrapped,
        ) {
            Ok(plain) => Ok(Some(plain[..32].try_into().expect("32-byte master key"))),
            Err(_) => Ok(None),
        }
    }
}

pub(crate) fn encode_small(magic: [u8; 4], body: &[u8], mac: Option<[u8; 32]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + body.len() + 32);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    if let Some(mac) = mac {
        out.extend_from_slice(&mac);
    }
    out
}

/// Splits a small object into (body, trailer), checking magic, version and length.
pub(crate) fn decode_small<'a>(
    magic: [u8; 4],
    key: &str,
    data: &'a [u8],
    trailer: usize,
) -> Result<(&'a [u8], &'a [u8])> {
    if data.len() < 12 {
        return Err(RepoError::corrupt(
            key,
            format!("truncated: {} bytes", data.len()),
        ));
    }
    if data[..4] != magic {
        return Err(RepoError::corrupt(
            key,
            "bad magic (not a ferry repository object of this kind)",
        ));
    }
    let version = u16::from_le_bytes([data[4], data[5]]);
    if version != FORMAT_VERSION {
        return Err(RepoError::UnsupportedVersion {
            key: key.into(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if data[6..8] != [0, 0] {
        return Err(RepoError::corrupt(
            key,
            "reserved header bytes are not zero",
        ));
    }
    let len = u32::from_le_bytes(data[8..12].try_into().expect("4")) as usize;
    if len > MAX_SMALL_BODY || data.len() != 12 + len + trailer {
        return Err(RepoError::corrupt(
            key,
            format!(
                "length mismatch: body claims {len} bytes, object has {}",
                data.len()
            ),
        ));
    }
    Ok((&data[12..12 + len], &data[12 + len..]))
}

impl RepoConfig {
    /// What chunks of this repository are compressed with.
    pub fn chunk_compression(&self) -> crate::codec::Compression {
        match self.compression {
            CompressionMethod::Zstd => crate::codec::Compression::Zstd(self.compression_level),
            CompressionMethod::Lz4 => crate::codec::Compression::Lz4,
            CompressionMethod::None => crate::codec::Compression::None,
        }
    }
    /// Encodes the config, MACed with `keys`.
    pub fn encode(&self, keys: &Keys) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("config serializes");
        encode_small(MAGIC_CONFIG, &body, Some(keys.config_mac(&body)))
    }

    /// Parses the config without authenticating it (the keys come from the slots, which need
    /// the repository id). Call [`RepoConfig::authenticate`] once the keys are known.
    pub fn decode_unauthenticated(data: &[u8]) -> Result<(Self, Vec<u8>, [u8; 32])> {
        let (body, mac) = decode_small(MAGIC_CONFIG, CONFIG_KEY, data, 32)?;
        let cfg: Self = serde_json::from_slice(body)
            .map_err(|e| RepoError::corrupt(CONFIG_KEY, format!("config JSON: {e}")))?;
        if cfg.chunk_id != "blake3-keyed" {
            return Err(RepoError::corrupt(
                CONFIG_KEY,
                format!("unknown chunk id scheme `{}`", cfg.chunk_id),
            ));
        }
        if !(crate::codec::MIN_CHUNK_SIZE..=crate::codec::MAX_CHUNK_SIZE).contains(&cfg.chunk_size)
        {
            return Err(RepoError::corrupt(
                CONFIG_KEY,
                format!("chunk size {} out of range", cfg.chunk_size),
            ));
        }
        Ok((cfg, body.to_vec(), mac.try_into().expect("32-byte mac")))
    }

    /// Checks the config MAC under `keys`.
    pub fn authenticate(body: &[u8], mac: &[u8; 32], keys: &Keys) -> Result<()> {
        if keys.config_mac(body) != *mac {
            return Err(RepoError::corrupt(
                CONFIG_KEY,
                "authentication failed (MAC mismatch)",
            ));
        }
        Ok(())
    }

    /// The master key of an unencrypted repository.
    pub fn plain_master(&self) -> Result<[u8; 32]> {
        self.master_key
            .as_deref()
            .and_then(unhex)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| {
                RepoError::corrupt(
                    CONFIG_KEY,
                    "unencrypted repository without a valid master key",
                )
            })
    }
}

impl KeySlot {
    /// Encodes the slot object.
    pub fn encode(&self) -> Vec<u8> {
        encode_small(
            MAGIC_KEYSLOT,
            &serde_json::to_vec(self).expect("slot serializes"),
            None,
        )
    }

    /// Decodes slot object `key`.
    pub fn decode(key: &str, data: &[u8]) -> Result<Self> {
        let (body, _) = decode_small(MAGIC_KEYSLOT, key, data, 0)?;
        serde_json::from_slice(body)
            .map_err(|e| RepoError::corrupt(key, format!("key slot JSON: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_opens_only_with_its_password() {
        let master = [5u8; 32];
        let pw = Secret::new("correct horse");
        let slot = KeySlot::create("r1", &master, &pw, KdfParams::insecure_fast()).unwrap();
        let back = KeySlot::decode("keys/a", &slot.encode()).unwrap();
        assert_eq!(
            back.unwrap_master("keys/a", "r1", &pw).unwrap(),
            Some(master)
        );
        assert_eq!(
            back.unwrap_master("keys/a", "r1", &Secret::new("nope"))
                .unwrap(),
            None
        );
        assert_eq!(back.unwrap_master("keys/a", "r2", &pw).unwrap(), None);
        let mut hostile = back.clone();
        hostile.params.memory_kib = u32::MAX;
        assert!(hostile.unwrap_master("keys/a", "r1", &pw).is_err());
    }

    #[test]
    fn config_round_trip_and_version_refusal() {
        let keys = Keys::from_master([1; 32], true);
        let cfg = RepoConfig {
            id: "abc".into(),
            created: "2026-01-01T00:00:00Z".into(),
            chunk_size: 4 << 20,
            compression: CompressionMethod::Lz4,
            compression_level: 1,
            encryption: Encryption::Aes256Gcm,
            chunk_id: "blake3-keyed".into(),
            master_key: None,
            immutability: None,
        };
        let data = cfg.encode(&keys);
        let (back, body, mac) = RepoConfig::decode_unauthenticated(&data).unwrap();
        assert_eq!(back, cfg);
        RepoConfig::authenticate(&body, &mac, &keys).unwrap();
        assert!(RepoConfig::authenticate(&body, &mac, &Keys::from_master([2; 32], true)).is_err());
        let mut future = data.clone();
        future[4] = 9;
        let err = RepoConfig::decode_unauthenticated(&future).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
    }
}
