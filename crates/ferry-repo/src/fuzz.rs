//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the proptests: every decoder of
//! untrusted repository bytes, fed the same input. None may panic.

use crate::codec::{ChunkCodec, ChunkId, Compression, DiskIndex, Keys, open_catalog};
use crate::config::{KeySlot, RepoConfig};
use crate::manifest::Manifest;
use std::sync::Arc;

/// Runs `data` through every decoder, with an encrypted and an unencrypted key set.
pub fn decode_all(data: &[u8]) {
    for encrypted in [true, false] {
        let keys = Arc::new(Keys::from_master([0x42; 32], encrypted));
        let codec = ChunkCodec::new(keys.clone(), Compression::Zstd(1), 1 << 20);
        let id = ChunkId([1; 32]);
        let _ = codec.decode(&id, data);
        let _ = DiskIndex::open(&keys, "indexes/f/0", data);
        let _ = open_catalog(&keys, "catalog/f", data);
        let _ = Manifest::open(&keys, "snapshots/f/manifest", data);
    }
    // Payload parsers behind the authentication, reached directly.
    for method in 0..=3 {
        for plain_len in [0, 4096, 1 << 20] {
            let _ = crate::codec::decompress(method, data.to_vec(), plain_len);
        }
    }
    let _ = DiskIndex::from_payload("indexes/f/0", data);
    let _ = Manifest::from_payload("snapshots/f/manifest", data);
    let _ = crate::verification::BootVerification::from_payload("snapshots/f/verify/x", data);
    let _ = RepoConfig::decode_unauthenticated(data);
    let _ = KeySlot::decode("keys/f", data);
    crate::kms::fuzz(data);
    let _ = crate::locks::Lease::decode(data);
    s3_responses(data);
}

/// The parsers of S3 Object Lock answers (`GetObjectLockConfiguration` XML, retain-until dates).
pub fn s3_responses(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::immutable::parse_lock_configuration(&text);
    let _ = crate::immutable::parse_date(&text);
    let _ = crate::immutable::ledger_until(&text);
}

/// Valid inputs for each fuzz target, as (target, file name, bytes), sealed under the keys
/// [`decode_all`] uses.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use crate::codec::seal_catalog;
    use crate::config::{Encryption, KdfParams};
    use ferry_core::Secret;
    let mut out = Vec::new();
    for encrypted in [true, false] {
        let tag = if encrypted { "enc" } else { "mac" };
        let keys = Arc::new(Keys::from_master([0x42; 32], encrypted));
        let plain = crate::testdata::compressible(1, 4096);
        for (name, c) in [("zstd", Compression::Zstd(1)), ("lz4", Compression::Lz4)] {
            let codec = ChunkCodec::new(keys.clone(), c, 1 << 20);
            out.push((
                "sealed_objects",
                format!("chunk-{name}-{tag}"),
                codec.encode(&plain).expect("encode").data.to_vec(),
            ));
        }
        let idx = DiskIndex {
            disk_size: 3 << 20,
            chunk_size: 1 << 20,
            chunks: vec![ChunkId([1; 32]), ChunkId::ZERO, ChunkId([2; 32])],
        };
        out.push((
            "sealed_objects",
            format!("index-{tag}"),
            idx.seal(&keys, "indexes/f/0").expect("seal"),
        ));
        out.push(("index_payload", format!("index-{tag}"), idx.to_payload()));
        let cat = seal_catalog(&keys, "catalog/f", &[ChunkId([3; 32])]).expect("seal");
        out.push(("sealed_objects", format!("catalog-{tag}"), cat));
        let cfg = RepoConfig {
            id: "00".into(),
            created: "2026-01-01T00:00:00Z".into(),
            chunk_size: 1 << 20,
            compression: crate::config::CompressionMethod::Lz4,
            compression_level: 1,
            encryption: if encrypted {
                Encryption::Aes256Gcm
            } else {
                Encryption::None
            },
            chunk_id: "blake3-keyed".into(),
            master_key: None,
            immutability: None,
        };
        out.push(("sealed_objects", format!("config-{tag}"), cfg.encode(&keys)));
        let _ = KdfParams::default();
        let slot = KeySlot::create(
            "00",
            &[0x42; 32],
            &Secret::new("pw"),
            KdfParams::insecure_fast(),
        )
        .expect("slot");
        out.push(("sealed_objects", format!("keyslot-{tag}"), slot.encode()));
    }
    let kms = crate::kms::KmsSlot {
        provider: crate::kms::PROVIDER_AWS_KMS.into(),
        key_id: "alias/ferry".into(),
        key_arn: "arn:aws:kms:us-east-1:123456789012:key/0b3e".into(),
        region: "us-east-1".into(),
        endpoint: Some("http://127.0.0.1:5000".into()),
        ciphertext: "AQIDBA==".into(),
        created: "2026-01-01T00:00:00Z".into(),
    };
    out.push(("kms_slot", "slot".into(), kms.encode()));
    out.push((
        "kms_slot",
        "fault".into(),
        br#"{"__type":"DisabledException","message":"disabled"}"#.to_vec(),
    ));
    let manifest = br#"{"version":1,"id":"fuzz","started":"2026-01-01T00:00:00Z","finished":"2026-01-01T00:00:01Z","time":0,"writer":"w","vm":{"id":"v","name":"n"},"source":"s","hypervisor":"xen","consistency":"crash","config":{"cpus":1,"memory":1,"firmware":"bios","guest-os":null,"disks":[],"nics":[]},"disks":[]}"#;
    out.push(("manifest_payload", "manifest".into(), manifest.to_vec()));
    let lock = br#"<?xml version="1.0" encoding="UTF-8"?><ObjectLockConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><ObjectLockEnabled>Enabled</ObjectLockEnabled><Rule><DefaultRetention><Mode>COMPLIANCE</Mode><Days>30</Days></DefaultRetention></Rule></ObjectLockConfiguration>"#;
    out.push(("s3_responses", "object-lock".into(), lock.to_vec()));
    out.push((
        "s3_responses",
        "date".into(),
        b"2026-12-02T15:00:00.000Z".to_vec(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_valid_inputs() {
        let keys = Keys::from_master([0x42; 32], true);
        for (target, name, data) in seeds() {
            decode_all(&data);
            match (target, name.as_str()) {
                ("manifest_payload", _) => {
                    Manifest::from_payload("snapshots/fuzz/manifest", &data).unwrap();
                }
                ("s3_responses", "object-lock") => {
                    let c = crate::immutable::parse_lock_configuration(
                        std::str::from_utf8(&data).unwrap(),
                    )
                    .unwrap();
                    assert_eq!(c.object_lock_enabled.as_deref(), Some("Enabled"));
                }
                ("kms_slot", "slot") => {
                    crate::kms::KmsSlot::decode("keys/f", &data).unwrap();
                }
                ("index_payload", _) => {
                    DiskIndex::from_payload("indexes/f/0", &data).unwrap();
                }
                (_, "index-enc") => {
                    DiskIndex::open(&keys, "indexes/f/0", &data).unwrap();
                }
                _ => {}
            }
        }
    }
}
