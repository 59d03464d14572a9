//! Verification records attached to a restore point (ADR 0077): the result of a boot
//! verification and its screenshot, stored beside the manifest as sealed objects.
//!
//! * `snapshots/<id>/verify/<time>-<rand>`: the record (magic `FRYV`, JSON payload, `version` 1).
//! * `snapshots/<id>/verify/<time>-<rand>.png`: the screenshot (magic `FRYV`, payload = PNG bytes).
//!
//! Both are sealed like every other object (AES-256-GCM or keyed MAC, the object key as
//! associated data), written once, and removed with the restore point by prune.

use crate::codec::{Compression, MAGIC_VERIFICATION, hex, open, random_bytes, seal};
use crate::error::{RepoError, Result};
use crate::repo::Repository;
use serde::{Deserialize, Serialize};

/// Payload version of a verification record.
pub const VERIFICATION_VERSION: u32 = 1;
/// Largest record payload accepted.
const MAX_RECORD: u32 = 1 << 20;
/// Largest screenshot accepted (a 4K PNG of a console is far below).
const MAX_SCREENSHOT: u32 = 32 << 20;

/// Outcome of a boot verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootResult {
    /// The heartbeat appeared.
    Ok,
    /// It did not (reason in the record).
    Failed,
}

/// One boot verification of one disk of a restore point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BootVerification {
    /// Payload version (1).
    pub version: u32,
    /// Restore point id (must match the object key).
    pub snapshot: String,
    /// The disk booted.
    pub disk: String,
    /// When the verification started (RFC 3339).
    pub started: String,
    /// `ok` or `failed`.
    pub result: BootResult,
    /// Seconds from power-on to the heartbeat (`ok` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_to_heartbeat: Option<f64>,
    /// Seconds the whole verification took.
    pub seconds: f64,
    /// Why it failed, or what matched.
    pub reason: String,
    /// The heartbeat regular expression.
    pub heartbeat: String,
    /// The timeout, in seconds.
    pub timeout_secs: u64,
    /// The hypervisor used (`qemu-system-x86_64 7.2.0 (TCG)`).
    pub emulator: String,
    /// The last part of the serial console (at most 4 KiB).
    pub console_tail: String,
    /// Object key of the screenshot, when one was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screenshot: Option<String>,
    /// Object key of this record (filled in when loaded, not stored).
    #[serde(skip)]
    pub key: String,
}

impl BootVerification {
    /// Parses a record payload, refusing unknown versions.
    pub fn from_payload(key: &str, payload: &[u8]) -> Result<Self> {
        #[derive(Deserialize)]
        struct Probe {
            version: u32,
        }
        let probe: Probe = serde_json::from_slice(payload)
            .map_err(|e| RepoError::corrupt(key, format!("verification JSON: {e}")))?;
        if probe.version != VERIFICATION_VERSION {
            return Err(RepoError::UnsupportedVersion {
                key: key.into(),
                found: u16::try_from(probe.version).unwrap_or(u16::MAX),
                supported: VERIFICATION_VERSION as u16,
            });
        }
        let mut v: Self = serde_json::from_slice(payload)
            .map_err(|e| RepoError::corrupt(key, format!("verification JSON: {e}")))?;
        if !key.starts_with(&format!("snapshots/{}/verify/", v.snapshot)) {
            return Err(RepoError::corrupt(
                key,
                format!("record claims restore point `{}`", v.snapshot),
            ));
        }
        v.key = key.to_string();
        Ok(v)
    }
}

/// Whether `key` is a verification record (not a screenshot).
fn is_record(key: &str) -> bool {
    key.contains("/verify/") && !key.ends_with(".png")
}

impl Repository {
    /// Stores a boot verification (and its screenshot) beside restore point `record.snapshot`.
    /// Returns the record with its key.
    pub async fn attach_boot_verification(
        &self,
        mut record: BootVerification,
        screenshot: Option<&[u8]>,
    ) -> Result<BootVerification> {
        if !self.snapshot_ids().await?.contains(&record.snapshot) {
            return Err(RepoError::SnapshotNotFound {
                id: record.snapshot.clone(),
            });
        }
        let base = format!(
            "snapshots/{}/verify/{}-{}",
            record.snapshot,
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
            hex(&random_bytes::<4>())
        );
        let keys = &self.inner.keys;
        record.version = VERIFICATION_VERSION;
        if let Some(png) = screenshot {
            let key = format!("{base}.png");
            let data = seal(
                keys,
                MAGIC_VERIFICATION,
                key.as_bytes(),
                png,
                Compression::None,
            )?;
            self.store().create(&key, data).await?;
            record.screenshot = Some(key);
        }
        let json = serde_json::to_vec(&record).expect("record serializes");
        let data = seal(
            keys,
            MAGIC_VERIFICATION,
            base.as_bytes(),
            &json,
            Compression::Zstd(3),
        )?;
        self.store().create(&base, data).await?;
        record.key = base;
        Ok(record)
    }

    /// Stores a verification record read from another repository (a copy job) under its own
    /// key, sealed with this repository's keys — screenshot first, record last — then reads
    /// both back and checks them against what was given (verified on arrival). An object a
    /// killed earlier copy left at the key is checked the same way instead of rewritten.
    pub async fn import_boot_verification(
        &self,
        record: &BootVerification,
        screenshot: Option<&[u8]>,
    ) -> Result<()> {
        let key = record.key.as_str();
        if !key.starts_with(&format!("snapshots/{}/verify/", record.snapshot)) || !is_record(key) {
            return Err(RepoError::Usage(format!(
                "`{key}` is not a verification record of restore point {}",
                record.snapshot
            )));
        }
        if record.screenshot.is_some() != screenshot.is_some() {
            return Err(RepoError::Usage(format!(
                "verification record {key}: screenshot given and named do not agree"
            )));
        }
        let keys = &self.inner.keys;
        if let (Some(png_key), Some(png)) = (&record.screenshot, screenshot) {
            if png_key != &format!("{key}.png") {
                return Err(RepoError::corrupt(
                    key,
                    format!("names screenshot `{png_key}`"),
                ));
            }
            let data = seal(
                keys,
                MAGIC_VERIFICATION,
                png_key.as_bytes(),
                png,
                Compression::None,
            )?;
            self.store().create(png_key, data).await?;
            if self.load_screenshot(png_key).await? != png {
                return Err(RepoError::corrupt(
                    png_key,
                    "differs from the screenshot copied",
                ));
            }
        }
        let json = serde_json::to_vec(record).expect("record serializes");
        let data = seal(
            keys,
            MAGIC_VERIFICATION,
            key.as_bytes(),
            &json,
            Compression::Zstd(3),
        )?;
        self.store().create(key, data).await?;
        if &self.load_boot_verification(key).await? != record {
            return Err(RepoError::corrupt(key, "differs from the record copied"));
        }
        Ok(())
    }

    /// Every boot verification of restore point `id`, oldest first. Unreadable records are
    /// errors (they are authenticated objects like any other).
    pub async fn boot_verifications(&self, id: &str) -> Result<Vec<BootVerification>> {
        let mut keys: Vec<String> = self
            .store()
            .list(&format!("snapshots/{id}/verify"))
            .await?
            .into_iter()
            .map(|o| o.location.to_string())
            .filter(|k| is_record(k))
            .collect();
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(self.load_boot_verification(&k).await?);
        }
        Ok(out)
    }

    /// The newest boot verification of each restore point that has one, from one listing.
    pub async fn latest_boot_verifications(
        &self,
    ) -> Result<std::collections::BTreeMap<String, BootVerification>> {
        let mut newest: std::collections::BTreeMap<String, String> = Default::default();
        for o in self.store().list("snapshots").await? {
            let k = o.location.to_string();
            if !is_record(&k) {
                continue;
            }
            let Some(id) = k
                .strip_prefix("snapshots/")
                .and_then(|r| r.split('/').next())
            else {
                continue;
            };
            let e = newest.entry(id.to_string()).or_default();
            if k > *e {
                *e = k;
            }
        }
        let mut out = std::collections::BTreeMap::new();
        for (id, k) in newest {
            out.insert(id, self.load_boot_verification(&k).await?);
        }
        Ok(out)
    }

    async fn load_boot_verification(&self, key: &str) -> Result<BootVerification> {
        let data = self.store().get(key).await?;
        let payload = open(
            &self.inner.keys,
            MAGIC_VERIFICATION,
            key,
            key.as_bytes(),
            &data,
            MAX_RECORD,
        )?;
        BootVerification::from_payload(key, &payload)
    }

    /// The screenshot of a boot verification (PNG bytes).
    pub async fn load_screenshot(&self, key: &str) -> Result<Vec<u8>> {
        if !key.ends_with(".png") || !key.contains("/verify/") {
            return Err(RepoError::Usage(format!("`{key}` is not a screenshot")));
        }
        let data = self.store().get(key).await?;
        open(
            &self.inner.keys,
            MAGIC_VERIFICATION,
            key,
            key.as_bytes(),
            &data,
            MAX_SCREENSHOT,
        )
    }
}
