//! Key slot management beyond the first password: KMS slots (ADR 0182), listing and removal,
//! and how a repository is unlocked.

use crate::codec::{hex, random_bytes};
use crate::config::KeySlot;
use crate::error::{RepoError, Result};
use crate::kms::{KmsKey, KmsSlot, MAGIC_KMS_SLOT};
use crate::repo::Repository;
use crate::store::Store;
use ferry_core::Secret;
use serde::Serialize;

/// Name of the KMS service in credential errors.
const KMS: &str = "AWS KMS";

/// How to unlock an encrypted repository.
#[derive(Clone, Debug, Default)]
pub struct Unlock {
    /// Open a password slot with this (unless KMS is forced).
    pub password: Option<Secret>,
    /// KMS slots: used when no password is given, or when forced.
    pub kms: KmsUnlock,
}

/// Which KMS slots to try.
#[derive(Clone, Debug, Default)]
pub struct KmsUnlock {
    /// Use KMS slots even when a password is given.
    pub force: bool,
    /// Only slots of this key (id, alias or ARN as stored, or the key's UUID).
    pub key_id: Option<String>,
    /// Endpoint instead of the one stored in the slot (or the environment's).
    pub endpoint: Option<String>,
}

/// One key slot as `ferry repo key list` shows it: no secret, no ciphertext.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SlotInfo {
    /// Object key (`keys/…`).
    pub key: String,
    /// `password`, `aws-kms` or `unreadable`.
    pub kind: &'static str,
    /// When it was added.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The KMS key as given (KMS slots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    /// The KMS key's ARN (KMS slots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_arn: Option<String>,
    /// Region (KMS slots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Endpoint stored in the slot (KMS slots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Why the slot cannot be read (unreadable slots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A new KMS slot of repository `repo_id` wrapping `master`: (object key, bytes).
pub(crate) async fn kms_slot(
    repo_id: &str,
    master: &[u8; 32],
    kms: &KmsKey,
) -> Result<(String, Vec<u8>)> {
    let key = format!("keys/{}", hex(&random_bytes::<8>()));
    let creds = crate::store::aws_credentials(&[], KMS)?;
    let slot = KmsSlot::create(repo_id, &key, master, kms, creds).await?;
    Ok((key, slot.encode()))
}

/// Deletes the slots an init wrote before it failed (best effort: the failure is what counts).
pub(crate) async fn delete_all(store: &Store, keys: &[String]) {
    for k in keys {
        if let Err(e) = store.delete(k).await {
            tracing::warn!(slot = %k, error = %e, "cannot delete the key slot of a failed init");
        }
    }
}

/// The master key from the repository's KMS slots. `authentic` tells whether a decrypted key
/// authenticates the repository's config (a slot forged with `kms:Encrypt` does not).
pub(crate) async fn unlock_kms(
    store: &Store,
    repo_id: &str,
    unlock: &Unlock,
    authentic: impl Fn(&[u8; 32]) -> bool,
) -> Result<[u8; 32]> {
    let mut slots = Vec::new();
    let mut unreadable = None;
    for meta in store.list("keys").await? {
        let key = meta.location.to_string();
        let data = store.get(&key).await?;
        if !data.starts_with(&MAGIC_KMS_SLOT) {
            continue;
        }
        match KmsSlot::decode(&key, &data) {
            Ok(s) => slots.push((key, s)),
            Err(e) => {
                tracing::warn!(slot = %key, error = %e, "skipping unreadable KMS key slot");
                unreadable.get_or_insert(e);
            }
        }
    }
    if let Some(want) = &unlock.kms.key_id {
        slots.retain(|(_, s)| s.matches(want));
    }
    if slots.is_empty() {
        if let Some(e) = unreadable {
            return Err(e);
        }
        if unlock.kms.force || unlock.kms.key_id.is_some() {
            return Err(RepoError::Usage(format!(
                "repository {} has no KMS key slot{}",
                store.location(),
                unlock
                    .kms
                    .key_id
                    .as_deref()
                    .map(|k| format!(" of key {k}"))
                    .unwrap_or_default()
            )));
        }
        return Err(RepoError::PasswordRequired {
            location: store.location().into(),
        });
    }
    let creds = crate::store::aws_credentials(&[], KMS)?;
    let mut errors = Vec::new();
    for (key, slot) in &slots {
        match slot
            .unwrap_master(key, repo_id, unlock.kms.endpoint.as_deref(), creds.clone())
            .await
        {
            Ok(master) if authentic(&master) => {
                tracing::info!(slot = %key, kms_key = %slot.key_id, "unlocked with a KMS key slot");
                return Ok(master);
            }
            Ok(_) => errors.push(RepoError::Kms {
                slot: key.clone(),
                key_id: slot.key_id.clone(),
                reason: "KMS decrypted a key that does not authenticate this repository's config (the slot was forged or belongs to another repository)".into(),
            }),
            Err(e) => {
                tracing::debug!(slot = %key, error = %e, "KMS key slot did not open");
                errors.push(e);
            }
        }
    }
    if errors.len() == 1 {
        return Err(errors.remove(0));
    }
    Err(RepoError::Usage(format!(
        "no KMS key slot opens repository {}: {}",
        store.location(),
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    )))
}

impl Repository {
    /// Adds a slot wrapping the master key with the AWS KMS key `kms`; returns its object key.
    pub async fn add_kms_slot(&self, kms: &KmsKey) -> Result<String> {
        if self.config().encryption == crate::Encryption::None {
            return Err(RepoError::Usage(
                "the repository is not encrypted; KMS keys do not apply".into(),
            ));
        }
        let (key, data) = kms_slot(&self.config().id, self.inner.keys.master(), kms).await?;
        self.store().create(&key, data).await?;
        Ok(key)
    }

    /// Every key slot, described without secrets.
    pub async fn key_slots(&self) -> Result<Vec<SlotInfo>> {
        let mut out = Vec::new();
        for meta in self.store().list("keys").await? {
            let key = meta.location.to_string();
            let data = self.store().get(&key).await?;
            let mut info = SlotInfo {
                key: key.clone(),
                kind: "unreadable",
                created: None,
                kms_key_id: None,
                kms_key_arn: None,
                region: None,
                endpoint: None,
                error: None,
            };
            if data.starts_with(&MAGIC_KMS_SLOT) {
                match KmsSlot::decode(&key, &data) {
                    Ok(s) => {
                        info.kind = "aws-kms";
                        info.created = Some(s.created);
                        info.kms_key_id = Some(s.key_id);
                        info.kms_key_arn = Some(s.key_arn);
                        info.region = Some(s.region);
                        info.endpoint = s.endpoint;
                    }
                    Err(e) => info.error = Some(e.to_string()),
                }
            } else {
                match KeySlot::decode(&key, &data) {
                    Ok(s) => {
                        info.kind = "password";
                        info.created = Some(s.created);
                    }
                    Err(e) => info.error = Some(e.to_string()),
                }
            }
            out.push(info);
        }
        Ok(out)
    }

    /// Deletes key slot `slot` (`keys/ID` or `ID`). Refused when no other readable slot would
    /// remain: the repository would be lost.
    pub async fn remove_key_slot(&self, slot: &str) -> Result<String> {
        let key = if slot.starts_with("keys/") {
            slot.to_string()
        } else {
            format!("keys/{slot}")
        };
        let slots = self.key_slots().await?;
        if !slots.iter().any(|s| s.key == key) {
            return Err(RepoError::Usage(format!(
                "repository {} has no key slot `{slot}` (see `ferry repo key list`)",
                self.store().location()
            )));
        }
        let others = slots
            .iter()
            .filter(|s| s.key != key && s.kind != "unreadable")
            .count();
        if others == 0 {
            return Err(RepoError::Usage(format!(
                "`{key}` is the repository's last usable key slot; add another (`ferry repo key add`) before removing it"
            )));
        }
        self.store().delete(&key).await?;
        tracing::info!(slot = %key, "key slot removed");
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InitOptions, KdfParams};
    use std::sync::Arc;

    fn store() -> Store {
        Store::new(Arc::new(object_store::memory::InMemory::new()), "memory")
    }

    #[tokio::test]
    async fn slots_are_listed_and_the_last_one_cannot_go() {
        let pw = Secret::new("one");
        let opts = InitOptions {
            chunk_size: 64 << 10,
            kdf: KdfParams::insecure_fast(),
            ..Default::default()
        };
        let s = store();
        let repo = Repository::init(s.clone(), Some(&pw), opts).await.unwrap();
        let second = repo
            .add_password(&Secret::new("two"), KdfParams::insecure_fast())
            .await
            .unwrap();
        let slots = repo.key_slots().await.unwrap();
        assert_eq!(slots.len(), 2);
        assert!(
            slots
                .iter()
                .all(|s| s.kind == "password" && s.created.is_some())
        );
        let e = repo.remove_key_slot("keys/nosuch").await.unwrap_err();
        assert!(e.to_string().contains("no key slot"), "{e}");
        let first = slots.iter().find(|s| s.key != second).unwrap().key.clone();
        // By id without the prefix.
        repo.remove_key_slot(first.trim_start_matches("keys/"))
            .await
            .unwrap();
        let e = repo.remove_key_slot(&second).await.unwrap_err();
        assert!(e.to_string().contains("last usable key slot"), "{e}");
        assert!(matches!(
            Repository::open(s.clone(), Some(&pw)).await,
            Err(RepoError::WrongPassword { .. })
        ));
        Repository::open(s.clone(), Some(&Secret::new("two")))
            .await
            .unwrap();
        // No password and no KMS slot: the password is required, as before KMS slots existed.
        assert!(matches!(
            Repository::open(s.clone(), None).await,
            Err(RepoError::PasswordRequired { .. })
        ));
        // Forcing KMS (or naming a key) on a repository without KMS slots says so.
        let unlock = Unlock {
            password: Some(Secret::new("two")),
            kms: KmsUnlock {
                force: true,
                ..Default::default()
            },
        };
        let e = Repository::open_with(s.clone(), &unlock).await.unwrap_err();
        assert!(e.to_string().contains("has no KMS key slot"), "{e}");
        let unlock = Unlock {
            password: None,
            kms: KmsUnlock {
                key_id: Some("alias/x".into()),
                ..Default::default()
            },
        };
        let e = Repository::open_with(s, &unlock).await.unwrap_err();
        assert!(
            e.to_string().contains("no KMS key slot of key alias/x"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_kms_repository_needs_encryption_and_a_garbled_kms_slot_is_named() {
        let opts = InitOptions {
            chunk_size: 64 << 10,
            encrypted: false,
            ..Default::default()
        };
        let e = Repository::init_kms(store(), None, &KmsKey::new("alias/x"), opts)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("insecure-no-encryption"), "{e}");
        // A KMS slot that does not parse: opening without a password names it as corrupt
        // (before any KMS request), and the password slot still opens.
        let pw = Secret::new("pw");
        let s = store();
        let opts = InitOptions {
            chunk_size: 64 << 10,
            kdf: KdfParams::insecure_fast(),
            ..Default::default()
        };
        Repository::init(s.clone(), Some(&pw), opts).await.unwrap();
        s.create(
            "keys/00000000000000ff",
            b"FRYW\x01\x00\x00\x00\x02\x00\x00\x00{}".to_vec(),
        )
        .await
        .unwrap();
        let e = Repository::open(s.clone(), None).await.unwrap_err();
        assert!(
            e.to_string().contains("keys/00000000000000ff") && e.to_string().contains("corrupt"),
            "{e}"
        );
        let repo = Repository::open(s, Some(&pw)).await.unwrap();
        let slots = repo.key_slots().await.unwrap();
        let bad = slots.iter().find(|s| s.kind == "unreadable").unwrap();
        assert!(bad.error.as_deref().unwrap().contains("KMS key slot JSON"));
    }
}
