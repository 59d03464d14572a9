//! The restore-point manifest: what was backed up, from where, how consistent, the VM's
//! configuration, and per disk its index object, size and change token. Sealed (AEAD or MAC)
//! with its own object key as context, so tampering or moving it is detected.

use crate::codec::{Compression, Keys, MAGIC_MANIFEST, open, seal};
use crate::error::{RepoError, Result};
use ferry_core::vm::{ConsistencyLevel, HypervisorKind, NativeConfig, VmConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Manifest payload version (inside the v1 envelope).
pub const MANIFEST_VERSION: u32 = 1;
/// Largest manifest payload accepted (native configs can be large XML, but not this large).
const MAX_MANIFEST_LEN: u32 = 64 << 20;

/// Which VM a restore point belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VmIdentity {
    /// Stable id (hypervisor UUID / MoRef / VM id; a path for plain disks). Retention groups by it.
    pub id: String,
    /// Display name at backup time.
    pub name: String,
}

/// What the caller describes about a restore point (everything but the disks and ids).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SnapshotMeta {
    /// The VM.
    pub vm: VmIdentity,
    /// Where it came from: host, pool or vCenter, without credentials.
    pub source: String,
    /// Which hypervisor.
    pub hypervisor: HypervisorKind,
    /// Consistency achieved.
    pub consistency: ConsistencyLevel,
    /// Normalized VM configuration.
    pub config: VmConfig,
    /// The hypervisor's own record, verbatim.
    #[serde(default)]
    pub native_config: Option<NativeConfig>,
    /// Data path used (`nbd`, `nbd+tls`, `hot-add`, `san`, `file`).
    #[serde(default)]
    pub transport: Option<String>,
    /// Free-form labels (job name, policy).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// One disk of a restore point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ManifestDisk {
    /// Disk name (unique within the restore point).
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Chunk size of its index.
    pub chunk_size: u32,
    /// Object key of its index.
    pub index_key: String,
    /// Keyed digest of the index object's bytes.
    pub index_digest: String,
    /// Change token to ask the hypervisor for changes since this point (CBT change id, RCT
    /// id, dirty bitmap name), if any.
    #[serde(default)]
    pub change_token: Option<String>,
    /// Chunks that are all zeros.
    pub zero_chunks: u64,
    /// Chunks newly stored by this backup.
    pub new_chunks: u64,
    /// Chunks that were already in the repository.
    pub reused_chunks: u64,
}

/// A restore point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Manifest {
    /// Payload version ([`MANIFEST_VERSION`]).
    pub version: u32,
    /// Restore point id (`YYYYMMDDTHHMMSS.mmmZ-<8 hex>`: sorts by time).
    pub id: String,
    /// When the backup started (RFC 3339).
    pub started: String,
    /// When the backup finished (RFC 3339).
    pub finished: String,
    /// Unix seconds of `started` (for retention arithmetic).
    pub time: i64,
    /// Who wrote it (`ferry <version> on <host>`).
    pub writer: String,
    /// Everything the caller described.
    #[serde(flatten)]
    pub meta: SnapshotMeta,
    /// The disks.
    pub disks: Vec<ManifestDisk>,
}

impl Manifest {
    /// Object key of the manifest of restore point `id`.
    pub fn key_for(id: &str) -> String {
        format!("snapshots/{id}/manifest")
    }

    /// Seals the manifest.
    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>> {
        let key = Self::key_for(&self.id);
        let json = serde_json::to_vec(self).expect("manifest serializes");
        seal(
            keys,
            MAGIC_MANIFEST,
            key.as_bytes(),
            &json,
            Compression::Zstd(3),
        )
    }

    /// Opens manifest object `key`.
    pub fn open(keys: &Keys, key: &str, data: &[u8]) -> Result<Self> {
        let payload = open(
            keys,
            MAGIC_MANIFEST,
            key,
            key.as_bytes(),
            data,
            MAX_MANIFEST_LEN,
        )?;
        Self::from_payload(key, &payload)
    }

    /// Parses a manifest payload (JSON), refusing unknown versions.
    pub fn from_payload(key: &str, payload: &[u8]) -> Result<Self> {
        #[derive(Deserialize)]
        struct Probe {
            version: u32,
        }
        let probe: Probe = serde_json::from_slice(payload)
            .map_err(|e| RepoError::corrupt(key, format!("manifest JSON: {e}")))?;
        if probe.version != MANIFEST_VERSION {
            return Err(RepoError::UnsupportedVersion {
                key: key.into(),
                found: u16::try_from(probe.version).unwrap_or(u16::MAX),
                supported: MANIFEST_VERSION as u16,
            });
        }
        let m: Self = serde_json::from_slice(payload)
            .map_err(|e| RepoError::corrupt(key, format!("manifest JSON: {e}")))?;
        if Self::key_for(&m.id) != key {
            return Err(RepoError::corrupt(
                key,
                format!("manifest claims id `{}`", m.id),
            ));
        }
        Ok(m)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ferry_core::vm::{DiskConfig, Firmware};
    use proptest::prelude::*;

    pub(crate) fn sample_meta(vm: &str) -> SnapshotMeta {
        SnapshotMeta {
            vm: VmIdentity {
                id: vm.into(),
                name: format!("name of {vm}"),
            },
            source: "xen://pool-1".into(),
            hypervisor: HypervisorKind::Xen,
            consistency: ConsistencyLevel::Crash,
            config: VmConfig {
                cpus: 2,
                memory: 4 << 30,
                firmware: Firmware::Uefi,
                guest_os: Some("debian12".into()),
                disks: vec![DiskConfig {
                    name: "disk0".into(),
                    size: 1 << 30,
                    controller: None,
                    bootable: true,
                }],
                nics: vec![],
            },
            native_config: Some(NativeConfig {
                format: "xenapi-vm-record".into(),
                record: "{\"uuid\":\"x\"}".into(),
            }),
            transport: Some("nbd+tls".into()),
            labels: BTreeMap::new(),
        }
    }

    proptest! {
        #[test]
        fn manifest_round_trip_and_any_flip_detected(
            vm in "[a-z0-9-]{1,20}", cpus in 1u32..64, token in proptest::option::of("[ -~]{0,40}"),
            flip in any::<proptest::sample::Index>(), bit in 0u8..8, encrypted in any::<bool>(),
        ) {
            let keys = Keys::from_master([3; 32], encrypted);
            let mut meta = sample_meta(&vm);
            meta.config.cpus = cpus;
            let m = Manifest {
                version: MANIFEST_VERSION,
                id: "20260101T000000Z-0000abcd".into(),
                started: "2026-01-01T00:00:00Z".into(),
                finished: "2026-01-01T00:01:00Z".into(),
                time: 1_767_225_600,
                writer: "test".into(),
                meta,
                disks: vec![ManifestDisk {
                    name: "disk0".into(), size: 1 << 30, chunk_size: 1 << 20,
                    index_key: "indexes/x/0".into(), index_digest: "00".into(),
                    change_token: token, zero_chunks: 1, new_chunks: 2, reused_chunks: 3,
                }],
            };
            let key = Manifest::key_for(&m.id);
            let sealed = m.seal(&keys).unwrap();
            prop_assert_eq!(&Manifest::open(&keys, &key, &sealed).unwrap(), &m);
            let mut bad = sealed.clone();
            let i = flip.index(bad.len());
            bad[i] ^= 1 << bit;
            prop_assert!(Manifest::open(&keys, &key, &bad).is_err());
            prop_assert!(Manifest::open(&keys, "snapshots/other/manifest", &sealed).is_err());
        }
    }
}
