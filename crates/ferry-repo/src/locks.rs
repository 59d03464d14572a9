//! Leases on the object store: shared `locks/backup-<id>` leases held by writers and the
//! exclusive `locks/gc` lease held by garbage collection. See `docs/repository-format.md`
//! ("Concurrency") for the protocol and why it is safe.
//!
//! A lease is a small JSON object naming its holder and an expiry time; its holder rewrites it
//! every third of its time-to-live, so a crashed holder's lease simply expires.

use crate::error::{RepoError, Result};
use crate::store::{Created, Store};
use crate::time::{now_unix, unix_to_rfc3339};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::task::JoinHandle;

/// Object key of the GC lock.
pub const GC_LOCK: &str = "locks/gc";
/// Prefix of backup leases.
pub const BACKUP_LEASE_PREFIX: &str = "locks/backup-";
/// How often waiters poll.
const POLL: Duration = Duration::from_millis(200);

/// The content of a lease object.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Lease {
    /// `backup` or `gc`.
    pub kind: String,
    /// Host and process holding it.
    pub holder: String,
    /// Unix seconds after which the lease is void.
    pub expires: i64,
}

impl Lease {
    fn new(kind: &str, ttl: Duration) -> Self {
        Self {
            kind: kind.into(),
            holder: holder(),
            expires: now_unix() + ttl.as_secs().max(1) as i64,
        }
    }

    /// True while the lease is valid.
    pub fn is_live(&self) -> bool {
        self.expires > now_unix()
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("lease serializes")
    }

    /// Parses a lease object; garbage counts as expired (its holder cannot be alive and
    /// writing garbage).
    pub fn decode(data: &[u8]) -> Self {
        serde_json::from_slice(data).unwrap_or(Self {
            kind: "unknown".into(),
            holder: "unknown".into(),
            expires: 0,
        })
    }

    fn locked(&self, key: &str, hint: &'static str) -> RepoError {
        RepoError::Locked {
            key: key.into(),
            holder: self.holder.clone(),
            expires: unix_to_rfc3339(self.expires),
            hint,
        }
    }
}

fn holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host} pid {}", std::process::id())
}

/// A held lease; refreshed in the background until released or dropped.
#[derive(Debug)]
pub struct LeaseGuard {
    store: Store,
    key: String,
    refresher: Option<JoinHandle<()>>,
}

impl LeaseGuard {
    fn start(store: Store, key: String, kind: &'static str, ttl: Duration) -> Self {
        let (s, k) = (store.clone(), key.clone());
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                if let Err(err) = s.overwrite(&k, Lease::new(kind, ttl).encode()).await {
                    tracing::warn!(lease = %k, error = %err, "cannot refresh lease");
                }
            }
        });
        Self {
            store,
            key,
            refresher: Some(refresher),
        }
    }

    /// The lease object key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stops refreshing and deletes the lease.
    pub async fn release(mut self) -> Result<()> {
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
        self.store.delete(&self.key).await
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(r) = self.refresher.take() {
            r.abort();
            // Best effort: an abandoned lease would otherwise hold GC off until it expires.
            let (store, key) = (self.store.clone(), self.key.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = store.delete(&key).await;
                });
            }
        }
    }
}

async fn read_lease(store: &Store, key: &str) -> Result<Option<Lease>> {
    match store.get(key).await {
        Ok(data) => Ok(Some(Lease::decode(&data))),
        Err(RepoError::Missing { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Takes a backup lease for `id`: writes it, then checks that no GC holds `locks/gc`; if one
/// does, withdraws and waits (up to `wait`) for it to finish.
pub async fn acquire_backup(
    store: &Store,
    id: &str,
    ttl: Duration,
    wait: Duration,
) -> Result<LeaseGuard> {
    let key = format!("{BACKUP_LEASE_PREFIX}{id}");
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if store
            .create(&key, Lease::new("backup", ttl).encode())
            .await?
            == Created::AlreadyExists
        {
            return Err(RepoError::Usage(format!(
                "backup lease `{key}` already exists"
            )));
        }
        match read_lease(store, GC_LOCK).await? {
            Some(gc) if gc.is_live() => {
                store.delete(&key).await?;
                if tokio::time::Instant::now() >= deadline {
                    return Err(gc.locked(
                        GC_LOCK,
                        "garbage collection is running; retry the backup later",
                    ));
                }
                tracing::info!(holder = %gc.holder, "garbage collection running; backup waits");
                tokio::time::sleep(POLL).await;
            }
            _ => return Ok(LeaseGuard::start(store.clone(), key, "backup", ttl)),
        }
    }
}

/// Takes the exclusive GC lock (taking over an expired one by compare-and-swap where the store
/// supports it).
pub async fn acquire_gc(store: &Store, ttl: Duration) -> Result<LeaseGuard> {
    let lease = Lease::new("gc", ttl);
    if store.create(GC_LOCK, lease.encode()).await? == Created::Written {
        return Ok(LeaseGuard::start(store.clone(), GC_LOCK.into(), "gc", ttl));
    }
    let (data, meta) = match store.get_with_meta(GC_LOCK).await {
        Ok(x) => x,
        // Released between our create and get: try once more.
        Err(RepoError::Missing { .. }) => {
            return match store.create(GC_LOCK, lease.encode()).await? {
                Created::Written => Ok(LeaseGuard::start(store.clone(), GC_LOCK.into(), "gc", ttl)),
                Created::AlreadyExists => Err(RepoError::Usage(
                    "another GC took the lock at the same time".into(),
                )),
            };
        }
        Err(e) => return Err(e),
    };
    let current = Lease::decode(&data);
    if current.is_live() {
        return Err(current.locked(GC_LOCK, "another garbage collection is running"));
    }
    tracing::warn!(holder = %current.holder, "taking over an expired GC lock");
    match store.replace_if(GC_LOCK, &meta, lease.encode()).await? {
        Some(true) => Ok(LeaseGuard::start(store.clone(), GC_LOCK.into(), "gc", ttl)),
        Some(false) => Err(current.locked(
            GC_LOCK,
            "another garbage collection took over the expired lock first",
        )),
        None => {
            // No compare-and-swap (local filesystem): delete and create; a local repository has
            // one host, where two GCs racing for a stale lock is an operator error.
            store.delete(GC_LOCK).await?;
            match store.create(GC_LOCK, lease.encode()).await? {
                Created::Written => Ok(LeaseGuard::start(store.clone(), GC_LOCK.into(), "gc", ttl)),
                Created::AlreadyExists => Err(current.locked(
                    GC_LOCK,
                    "another garbage collection took over the expired lock first",
                )),
            }
        }
    }
}

/// Live backup leases, and the keys of expired ones (left by crashed writers).
pub async fn backup_leases(store: &Store) -> Result<(Vec<(String, Lease)>, Vec<String>)> {
    let mut live = Vec::new();
    let mut expired = Vec::new();
    for meta in store.list("locks").await? {
        let key = meta.location.to_string();
        if !key.starts_with(BACKUP_LEASE_PREFIX) {
            continue;
        }
        match read_lease(store, &key).await? {
            Some(l) if l.is_live() => live.push((key, l)),
            Some(_) => expired.push(key),
            None => {}
        }
    }
    Ok((live, expired))
}
