//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the proptests: every decoder of
//! untrusted repository bytes, fed the same input. None may panic.

use crate::codec::{ChunkCodec, ChunkId, DiskIndex, Keys, open_catalog};
use crate::config::{KeySlot, RepoConfig};
use crate::manifest::Manifest;
use std::sync::Arc;

/// Runs `data` through every decoder, with an encrypted and an unencrypted key set.
pub fn decode_all(data: &[u8]) {
    for encrypted in [true, false] {
        let keys = Arc::new(Keys::from_master([0x42; 32], encrypted));
        let codec = ChunkCodec::new(keys.clone(), 1, 1 << 20);
        let id = ChunkId([1; 32]);
        let _ = codec.decode(&id, data);
        let _ = DiskIndex::open(&keys, "indexes/f/0", data);
        let _ = open_catalog(&keys, "catalog/f", data);
        let _ = Manifest::open(&keys, "snapshots/f/manifest", data);
    }
    // Payload parsers behind the authentication, reached directly.
    let _ = DiskIndex::from_payload("indexes/f/0", data);
    let _ = Manifest::from_payload("snapshots/f/manifest", data);
    let _ = RepoConfig::decode_unauthenticated(data);
    let _ = KeySlot::decode("keys/f", data);
    let _ = crate::locks::Lease::decode(data);
}
