//! Verify, prune (GFS retention) and garbage collection.

use crate::codec::{ChunkId, seal_catalog};
use crate::error::{RepoError, Result};
use crate::locks;
use crate::manifest::Manifest;
use crate::repo::Repository;
use crate::time::now_unix;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use futures::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

/// What `verify` checks.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Only this restore point (default: all).
    pub snapshot: Option<String>,
    /// Percentage of distinct chunks to re-read (100 = all). Manifests and indexes are always
    /// checked in full.
    pub sample_percent: f64,
}

/// One object that failed verification.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BadObject {
    /// Object key.
    pub key: String,
    /// What is wrong.
    pub error: String,
    /// Restore points that depend on it.
    pub snapshots: Vec<String>,
}

/// Result of `verify`.
#[derive(Clone, Debug, Serialize, Default)]
pub struct VerifyReport {
    /// Restore points examined.
    pub snapshots: usize,
    /// Distinct chunks referenced.
    pub chunks_referenced: usize,
    /// Distinct chunks re-read and authenticated.
    pub chunks_checked: usize,
    /// Bad objects.
    pub bad: Vec<BadObject>,
    /// Hardened local repositories: data objects found without the immutable flag (a crash
    /// between an object's write and its flag) and flagged now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealed: Option<usize>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.bad.is_empty()
    }
}

/// Retention rules (GFS). Each rule keeps the newest restore point of each of the last N
/// periods (days, ISO weeks, months, years) that have one; rules add up. Applied per VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Keep the N newest.
    pub last: u32,
    /// Keep the newest of each of N days.
    pub daily: u32,
    /// Keep the newest of each of N ISO weeks.
    pub weekly: u32,
    /// Keep the newest of each of N months.
    pub monthly: u32,
    /// Keep the newest of each of N years.
    pub yearly: u32,
}

/// One line of a prune plan.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PruneDecision {
    /// Restore point id.
    pub id: String,
    /// VM id.
    pub vm: String,
    /// Start time (RFC 3339).
    pub time: String,
    /// Kept or removed.
    pub keep: bool,
    /// Which rules keep it (`last`, `daily`, ..., or `immutable` when its retention has not
    /// expired); empty when removed.
    pub reasons: Vec<String>,
    /// Immutable repositories: the retain-until date that kept it (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<String>,
}

/// Result of `gc`.
#[derive(Clone, Debug, Serialize, Default)]
pub struct GcReport {
    /// Chunks referenced by some restore point.
    pub live_chunks: usize,
    /// Unreferenced chunks deleted.
    pub deleted_chunks: usize,
    /// Their stored bytes.
    pub freed_bytes: u64,
    /// Unreferenced chunks kept because they are younger than the grace period.
    pub kept_young: usize,
    /// Index objects of backups that never committed, deleted.
    pub orphan_indexes: usize,
    /// Catalog segments merged into one.
    pub catalog_segments: usize,
    /// Expired leases of crashed writers removed.
    pub expired_leases: usize,
    /// Immutable repositories: unreferenced objects kept because their retention has not
    /// expired (count, bytes, earliest expiry).
    pub kept_locked: crate::immutable::KeptLocked,
    /// Nothing was deleted (dry run).
    pub dry_run: bool,
}

/// GC settings.
#[derive(Clone, Copy, Debug)]
pub struct GcOptions {
    /// Unreferenced objects younger than this are kept (an interrupted backup's chunks stay
    /// reusable for a while; clock skew between writers stays harmless).
    pub grace: Duration,
    /// How long to wait for running backups to finish before giving up.
    pub wait_for_backups: Duration,
    /// Report only.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(24 * 3600),
            wait_for_backups: Duration::from_secs(3600),
            dry_run: false,
        }
    }
}

fn bucket(rule: &str, t: DateTime<Utc>) -> String {
    match rule {
        "daily" => t.format("%Y-%m-%d").to_string(),
        "weekly" => {
            let w = t.iso_week();
            format!("{}-W{:02}", w.year(), w.week())
        }
        "monthly" => t.format("%Y-%m").to_string(),
        _ => t.format("%Y").to_string(),
    }
}

/// Decides which restore points `policy` keeps (pure; newest-first per VM).
pub fn plan_retention(
    manifests: &[(String, String, i64)],
    policy: Retention,
) -> Vec<PruneDecision> {
    let mut by_vm: BTreeMap<&str, Vec<&(String, String, i64)>> = BTreeMap::new();
    for m in manifests {
        by_vm.entry(m.1.as_str()).or_default().push(m);
    }
    let mut out = Vec::new();
    for (_, mut list) in by_vm {
        list.sort_by(|a, b| (b.2, &b.0).cmp(&(a.2, &a.0)));
        let mut reasons: Vec<Vec<String>> = vec![Vec::new(); list.len()];
        for r in reasons.iter_mut().take(policy.last as usize) {
            r.push("last".into());
        }
        for (rule, n) in [
            ("daily", policy.daily),
            ("weekly", policy.weekly),
            ("monthly", policy.monthly),
            ("yearly", policy.yearly),
        ] {
            let mut seen = 0;
            let mut last_bucket: Option<String> = None;
            for (i, m) in list.iter().enumerate() {
                if seen >= n {
                    break;
                }
                let t = Utc.timestamp_opt(m.2, 0).single().unwrap_or_default();
                let b = bucket(rule, t);
                if last_bucket.as_deref() != Some(&b) {
                    reasons[i].push(rule.into());
                    seen += 1;
                    last_bucket = Some(b);
                }
            }
        }
        for (m, r) in list.iter().zip(reasons) {
            out.push(PruneDecision {
                id: m.0.clone(),
                vm: m.1.clone(),
                time: crate::time::unix_to_rfc3339(m.2),
                keep: !r.is_empty(),
                reasons: r,
                locked_until: None,
            });
        }
    }
    out
}

impl Repository {
    /// Re-reads and authenticates manifests, indexes and (a sample of) chunks; reports every
    /// bad object with the restore points it affects.
    pub async fn verify(&self, opts: &VerifyOptions) -> Result<VerifyReport> {
        let ids = match &opts.snapshot {
            Some(id) => {
                if !self.snapshot_ids().await?.contains(id) {
                    return Err(RepoError::SnapshotNotFound { id: id.clone() });
                }
                vec![id.clone()]
            }
            None => self.snapshot_ids().await?,
        };
        let mut report = VerifyReport {
            snapshots: ids.len(),
            ..Default::default()
        };
        let mut users: HashMap<ChunkId, BTreeSet<String>> = HashMap::new();
        for id in &ids {
            let m = match self.load_manifest(id).await {
                Ok(m) => m,
                Err(e) => {
                    report.bad.push(BadObject {
                        key: Manifest::key_for(id),
                        error: e.to_string(),
                        snapshots: vec![id.clone()],
                    });
                    continue;
                }
            };
            for d in &m.disks {
                match self.load_index_of(d).await {
                    Ok(idx) => {
                        for c in idx.chunks.into_iter().filter(|c| !c.is_zero()) {
                            users.entry(c).or_default().insert(id.clone());
                        }
                    }
                    Err(e) => report.bad.push(BadObject {
                        key: d.index_key.clone(),
                        error: e.to_string(),
                        snapshots: vec![id.clone()],
                    }),
                }
            }
        }
        // The catalog decides what backups skip uploading: a damaged segment matters too.
        if opts.snapshot.is_none() {
            for o in self.store().list("catalog").await? {
                let key = o.location.to_string();
                let res = match self.store().get(&key).await {
                    Ok(data) => {
                        crate::codec::open_catalog(&self.inner.keys, &key, &data).map(|_| ())
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = res {
                    report.bad.push(BadObject {
                        key,
                        error: e.to_string(),
                        snapshots: Vec::new(),
                    });
                }
            }
        }
        if let (Some(_), Some(local), None) = (
            self.store().immutability(),
            self.store().local_lock(),
            &opts.snapshot,
        ) {
            report.sealed = Some(self.seal_local(local).await?);
        }
        report.chunks_referenced = users.len();
        let pct = opts.sample_percent.clamp(0.0, 100.0);
        let seed: [u8; 32] = crate::codec::random_bytes();
        let selected: Vec<ChunkId> = users
            .keys()
            .filter(|c| {
                if pct >= 100.0 {
                    return true;
                }
                let h = blake3::keyed_hash(&seed, &c.0);
                let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8"));
                (x as f64) < pct / 100.0 * u64::MAX as f64
            })
            .copied()
            .collect();
        report.chunks_checked = selected.len();
        let results: Vec<(ChunkId, Result<()>)> = futures::stream::iter(selected)
            .map(|c| {
                let repo = self.clone();
                async move { (c, repo.read_chunk(c).await.map(|_| ())) }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        for (c, r) in results {
            if let Err(e) = r {
                report.bad.push(BadObject {
                    key: c.object_key(),
                    error: e.to_string(),
                    snapshots: users.remove(&c).unwrap_or_default().into_iter().collect(),
                });
            }
        }
        report.bad.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(report)
    }

    /// Applies `policy`: returns the plan and, unless `dry_run`, deletes the restore points it
    /// drops (manifest first, so a half-finished prune leaves no half-visible restore point).
    /// Chunks are freed later by [`gc`](Self::gc).
    pub async fn prune(&self, policy: Retention, dry_run: bool) -> Result<Vec<PruneDecision>> {
        self.prune_vms(policy, &|_| true, dry_run).await
    }

    /// Like [`prune`](Self::prune), for the VMs whose id `vm` accepts (a job's VMs); the
    /// restore points of other VMs are neither planned nor touched.
    pub async fn prune_vms(
        &self,
        policy: Retention,
        vm: &(dyn Fn(&str) -> bool + Sync),
        dry_run: bool,
    ) -> Result<Vec<PruneDecision>> {
        if policy == Retention::default() {
            return Err(RepoError::Usage(
                "no retention rule given (--keep-last/daily/weekly/monthly/yearly); refusing to remove every restore point".into(),
            ));
        }
        let ms = self.snapshots().await?;
        let rows: Vec<(String, String, i64)> = ms
            .iter()
            .filter(|m| vm(&m.meta.vm.id))
            .map(|m| (m.id.clone(), m.meta.vm.id.clone(), m.time))
            .collect();
        let mut plan = plan_retention(&rows, policy);
        if self.store().immutability().is_some() {
            self.prune_locked(&mut plan, dry_run).await?;
            return Ok(plan);
        }
        if !dry_run {
            for d in plan.iter().filter(|d| !d.keep) {
                let store = self.store();
                store.delete(&Manifest::key_for(&d.id)).await?;
                for o in store.list(&format!("indexes/{}", d.id)).await? {
                    store.delete(o.location.as_ref()).await?;
                }
                // Verification records and screenshots (`snapshots/<id>/verify/…`).
                for o in store.list(&format!("snapshots/{}/verify", d.id)).await? {
                    store.delete(o.location.as_ref()).await?;
                }
                tracing::info!(snapshot = %d.id, "restore point removed");
            }
        }
        Ok(plan)
    }

    /// Prune of an immutable repository: a restore point whose manifest is still under
    /// retention is kept (reason `immutable`, with its date); the others are deleted version by
    /// version (manifest first). Index objects still locked are left for GC.
    async fn prune_locked(&self, plan: &mut [PruneDecision], dry_run: bool) -> Result<()> {
        use crate::immutable::{Deleted, Ledger, Removal};
        let store = self.store();
        let (Some(policy), Some(lock)) = (store.immutability(), store.retainer()) else {
            return Err(RepoError::Usage(
                "immutable repository without a retention backend".into(),
            ));
        };
        let now = crate::immutable::now();
        let ledger = if lock.needs_ledger() {
            Ledger::load(store, &self.inner.keys, now + 1).await?
        } else {
            Ledger::default()
        };
        for d in plan.iter_mut().filter(|d| !d.keep) {
            let key = Manifest::key_for(&d.id);
            match lock.removal(&key, now, policy, &ledger).await? {
                Removal::Keep(u, _) => {
                    d.keep = true;
                    d.reasons.push("immutable".into());
                    d.locked_until = u.map(crate::time::unix_to_rfc3339);
                    continue;
                }
                Removal::Gone => continue,
                Removal::Delete(version) => {
                    if dry_run {
                        continue;
                    }
                    if lock.delete(&key, version.as_deref()).await? == Deleted::Refused {
                        d.keep = true;
                        d.reasons.push("immutable".into());
                        d.reasons.push("refused-by-store".into());
                        continue;
                    }
                }
            }
            let verify = store.list(&format!("snapshots/{}/verify", d.id)).await?;
            for o in store
                .list(&format!("indexes/{}", d.id))
                .await?
                .into_iter()
                .chain(verify)
            {
                let k = o.location.to_string();
                if let Removal::Delete(v) = lock.removal(&k, now, policy, &ledger).await? {
                    lock.delete(&k, v.as_deref()).await?;
                }
            }
            tracing::info!(snapshot = %d.id, "restore point removed");
        }
        Ok(())
    }

    /// Flags every data object and ledger segment of a hardened local repository that lacks
    /// the flag; returns how many did.
    async fn seal_local(
        &self,
        local: &std::sync::Arc<crate::immutable_local::LocalLock>,
    ) -> Result<usize> {
        let mut keys = vec![crate::config::CONFIG_KEY.to_string()];
        for prefix in ["keys", "chunks", "indexes", "snapshots", "retention"] {
            keys.extend(
                self.store()
                    .list(prefix)
                    .await?
                    .into_iter()
                    .map(|o| o.location.to_string()),
            );
        }
        let l = local.clone();
        let sealed = tokio::task::spawn_blocking(move || l.seal_all(&keys))
            .await
            .map_err(|e| crate::immutable::local_err("seal", "", std::io::Error::other(e)))?
            .map_err(|(k, e)| crate::immutable::local_err("seal", &k, e))?;
        if sealed > 0 {
            tracing::warn!(
                objects = sealed,
                "flagged data objects found without the immutable flag (left by a crash)"
            );
        }
        Ok(sealed)
    }

    /// Mark and sweep: takes the GC lock, waits until no backup holds a lease, marks every chunk
    /// referenced by a restore point, rewrites the catalog to the survivors, then deletes
    /// unreferenced chunks older than the grace period.
    pub async fn gc(&self, opts: GcOptions) -> Result<GcReport> {
        let store = self.store().clone();
        let lock = locks::acquire_gc(&store, self.inner.timing.lease_ttl).await?;
        let res = self.gc_locked(opts).await;
        lock.release().await?;
        res
    }

    async fn gc_locked(&self, opts: GcOptions) -> Result<GcReport> {
        let store = self.store();
        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..Default::default()
        };
        let deadline = tokio::time::Instant::now() + opts.wait_for_backups;
        loop {
            let (live, expired) = locks::backup_leases(store).await?;
            if live.is_empty() {
                if !opts.dry_run {
                    for k in &expired {
                        store.delete(k).await?;
                    }
                }
                report.expired_leases = expired.len();
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                let (key, l) = &live[0];
                return Err(RepoError::Locked {
                    key: key.clone(),
                    holder: l.holder.clone(),
                    expires: crate::time::unix_to_rfc3339(l.expires),
                    hint: "a backup is running; GC waits for backups to finish",
                });
            }
            tracing::info!(
                backups = live.len(),
                "waiting for running backups before GC"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Mark. Any unreadable manifest or index aborts: sweeping on a partial mark would
        // delete live data.
        let mut live: HashSet<ChunkId> = HashSet::new();
        let mut live_indexes: HashSet<String> = HashSet::new();
        for id in self.snapshot_ids().await? {
            let m = match self.load_manifest(&id).await {
                Ok(m) => m,
                Err(RepoError::SnapshotNotFound { .. }) => continue, // pruned meanwhile
                Err(e) => return Err(e),
            };
            for d in &m.disks {
                let idx = self.load_index_of(d).await?;
                live.extend(idx.chunks.into_iter().filter(|c| !c.is_zero()));
                live_indexes.insert(d.index_key.clone());
            }
        }
        report.live_chunks = live.len();
        let cutoff = now_unix() - opts.grace.as_secs() as i64;
        let mut doomed = Vec::new();
        let mut doomed_sizes = HashMap::new();
        let mut survivors = Vec::new();
        for o in store.list("chunks").await? {
            let key = o.location.to_string();
            let Some(id) = key.rsplit('/').next().and_then(ChunkId::from_hex) else {
                tracing::warn!(object = %key, "ignoring a foreign object under chunks/");
                continue;
            };
            if live.contains(&id) {
                survivors.push(id);
            } else if o.last_modified.timestamp() > cutoff {
                report.kept_young += 1;
                survivors.push(id);
            } else {
                report.freed_bytes += o.size;
                doomed_sizes.insert(key.clone(), o.size);
                doomed.push(key);
            }
        }
        // Immutable repositories: what is still under retention stays (and stays listed in the
        // catalog, so backups keep reusing it); the rest is deleted version by version.
        let mut versions: HashMap<String, Option<String>> = HashMap::new();
        let mut ledger_gone = Vec::new();
        let retainer = store.retainer();
        let mut ledger = crate::immutable::Ledger::default();
        if let (Some(policy), Some(lock)) = (store.immutability(), &retainer) {
            let now = crate::immutable::now();
            ledger = crate::immutable::Ledger::load(store, &self.inner.keys, now + 1).await?;
            let mut kept = Vec::new();
            for key in std::mem::take(&mut doomed) {
                let size = doomed_sizes.get(&key).copied().unwrap_or(0);
                let id = key.rsplit('/').next().and_then(ChunkId::from_hex);
                if let Some(u) = id
                    .and_then(|id| ledger.until.get(&id))
                    .filter(|u| **u > now)
                {
                    report.kept_locked.add(size, Some(*u));
                    kept.push((key, size));
                    continue;
                }
                match lock.removal(&key, now, policy, &ledger).await? {
                    crate::immutable::Removal::Keep(u, size) => {
                        report.kept_locked.add(size, u);
                        kept.push((key, size));
                    }
                    crate::immutable::Removal::Delete(v) => {
                        versions.insert(key.clone(), v);
                        doomed.push(key);
                    }
                    crate::immutable::Removal::Gone => {}
                }
            }
            for (key, size) in kept {
                report.freed_bytes -= size;
                if let Some(id) = key.rsplit('/').next().and_then(ChunkId::from_hex) {
                    survivors.push(id);
                }
            }
            ledger_gone = ledger
                .segments
                .iter()
                .filter(|(_, u)| *u <= now)
                .map(|(k, _)| k.clone())
                .collect();
        }
        report.deleted_chunks = doomed.len();
        let mut orphan_indexes = Vec::new();
        for o in store.list("indexes").await? {
            let key = o.location.to_string();
            if !live_indexes.contains(&key) && o.last_modified.timestamp() <= cutoff {
                orphan_indexes.push(key);
            }
        }
        if let (Some(policy), Some(lock)) = (store.immutability(), &retainer) {
            let now = crate::immutable::now();
            for key in std::mem::take(&mut orphan_indexes) {
                match lock.removal(&key, now, policy, &ledger).await? {
                    crate::immutable::Removal::Keep(u, size) => report.kept_locked.add(size, u),
                    crate::immutable::Removal::Delete(v) => {
                        versions.insert(key.clone(), v);
                        orphan_indexes.push(key);
                    }
                    crate::immutable::Removal::Gone => {}
                }
            }
        }
        report.orphan_indexes = orphan_indexes.len();
        let segments: Vec<String> = store
            .list("catalog")
            .await?
            .into_iter()
            .map(|o| o.location.to_string())
            .collect();
        report.catalog_segments = segments.len();
        if opts.dry_run {
            return Ok(report);
        }
        // The catalog must never list a deleted chunk (a backup would reuse it): write the
        // survivors' segment and drop the old segments before deleting any chunk.
        survivors.sort();
        let key = format!(
            "catalog/gc-{}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
            crate::codec::hex(&crate::codec::random_bytes::<4>())
        );
        store
            .create(&key, seal_catalog(&self.inner.keys, &key, &survivors)?)
            .await?;
        for s in &segments {
            store.delete(s).await?;
        }
        for k in &ledger_gone {
            match &retainer {
                // Sealed segments carry the flag too.
                Some(r) if r.needs_ledger() => {
                    r.delete(k, None).await?;
                }
                _ => store.delete(k).await?,
            }
        }
        let lock = retainer;
        let results: Vec<Result<Option<String>>> =
            futures::stream::iter(doomed.into_iter().chain(orphan_indexes))
                .map(|k| {
                    let store = store.clone();
                    let lock = lock.clone();
                    let version = versions.remove(&k).flatten();
                    async move {
                        match lock {
                            // A plain DELETE would only add a delete marker on a versioned
                            // bucket: delete the version itself to free the space.
                            Some(lock) => match lock.delete(&k, version.as_deref()).await? {
                                crate::immutable::Deleted::Deleted => Ok(None),
                                crate::immutable::Deleted::Refused => Ok(Some(k)),
                            },
                            None => store.delete(&k).await.map(|()| None),
                        }
                    }
                })
                .buffer_unordered(16)
                .collect()
                .await;
        for refused in results
            .into_iter()
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
        {
            tracing::warn!(object = %refused, "the store refused to delete an object ferry thought expired; kept");
            let size = doomed_sizes.get(&refused).copied().unwrap_or(0);
            report.kept_locked.add(size, None);
            report.kept_locked.refused_by_store += 1;
            if refused.starts_with("chunks/") {
                report.deleted_chunks -= 1;
                report.freed_bytes -= size;
            } else {
                report.orphan_indexes -= 1;
            }
        }
        tracing::info!(
            deleted = report.deleted_chunks,
            freed = report.freed_bytes,
            "garbage collection done"
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(y: i32, m: u32, d: u32, h: u32) -> i64 {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap().timestamp()
    }

    #[test]
    fn gfs_keeps_newest_per_period() {
        let rows: Vec<(String, String, i64)> = [
            t(2026, 1, 1, 1),
            t(2026, 1, 1, 9),
            t(2026, 1, 2, 9),
            t(2026, 1, 20, 9),
            t(2026, 2, 3, 9),
            t(2026, 2, 4, 9),
        ]
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("s{i}"), "vm".to_string(), *t))
        .collect();
        let plan = plan_retention(
            &rows,
            Retention {
                last: 1,
                daily: 2,
                monthly: 2,
                ..Default::default()
            },
        );
        let kept: Vec<&str> = plan
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.as_str())
            .collect();
        // s5 last+daily+monthly(Feb), s4 daily, s3 monthly(Jan).
        assert_eq!(kept, vec!["s5", "s4", "s3"]);
        let plan = plan_retention(
            &rows,
            Retention {
                daily: 10,
                ..Default::default()
            },
        );
        let kept: Vec<&str> = plan
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.as_str())
            .collect();
        assert_eq!(kept, vec!["s5", "s4", "s3", "s2", "s1"]);
    }
}
