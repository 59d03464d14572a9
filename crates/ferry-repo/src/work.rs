//! Work leases: several appliances configured with one repository split a scheduled run's VMs
//! among themselves through the object store, with no coordinator of their own (ADR 0105).
//!
//! A scheduled run of a job is a *window* (`<job>-<firing time>`: every appliance computes the
//! same one from the same schedule). For each VM of a window:
//!
//! ```text
//! locks/work/<window>/<vm>/lease-000000   the first claim (conditional create)
//! locks/work/<window>/<vm>/lease-000001   a takeover after lease-000000 expired
//! locks/work/<window>/<vm>/done           written once the VM is finished (conditional create)
//! ```
//!
//! Claiming a VM creates the next generation's lease object *if absent*; of several appliances
//! racing for it exactly one succeeds, on every store (conditional create is all it needs, so
//! the local file system works like S3 and Azure). The holder rewrites its own lease every third
//! of the time-to-live; a dead holder's lease expires and the next claim creates the following
//! generation — a takeover. A holder that finds a newer generation beside its own (it stalled
//! longer than the TTL) has lost the VM and stops. `done` is written before the lease is
//! deleted, and a claimer checks for it after creating its lease, so a finished VM is never
//! claimed again.

use crate::error::{RepoError, Result};
use crate::store::{Created, Store};
use crate::time::now_unix;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Prefix of every work-lease object.
pub const WORK_PREFIX: &str = "locks/work";
const DONE: &str = "done";
const LEASE: &str = "lease-";

/// The content of a lease object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct WorkLease {
    /// The appliance's configured name.
    pub appliance: String,
    /// The holding process (host, pid, start), as the driver marks its snapshots with it.
    pub owner: String,
    /// Unix seconds after which the lease is void.
    pub expires: i64,
    /// Takeovers before this claim (0 for the first).
    pub generation: u32,
}

impl WorkLease {
    /// True while the lease is valid.
    pub fn is_live(&self) -> bool {
        self.expires > now_unix()
    }

    fn decode(data: &[u8], generation: u32) -> Self {
        // Garbage counts as expired: its writer cannot be alive and writing garbage.
        serde_json::from_slice(data).unwrap_or(Self {
            appliance: "unknown".into(),
            owner: "unknown".into(),
            expires: 0,
            generation,
        })
    }
}

/// The content of a `done` marker: how the VM's backup of this window ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DoneMarker {
    /// The appliance that finished it.
    pub appliance: String,
    /// `success` or `failed` (after the job's retries).
    pub status: String,
    /// The restore point written.
    #[serde(default)]
    pub restore_point: Option<String>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Unix seconds.
    pub time: i64,
}

/// What a claim found.
#[derive(Debug)]
pub enum Claim {
    /// This appliance holds the VM now.
    Claimed(WorkGuard),
    /// Another appliance holds a live lease on it.
    Busy(WorkLease),
    /// It is finished for this window.
    Done(DoneMarker),
}

/// The window id of a scheduled firing of `job` at `fired` (Unix seconds): equal on every
/// appliance with the same schedule.
pub fn window_id(job: &str, fired: i64) -> String {
    let t = chrono::DateTime::from_timestamp(fired, 0).unwrap_or_default();
    format!("{}-{}", safe(job), t.format("%Y%m%dT%H%M%SZ"))
}

/// The firing time (Unix seconds) a window id ends with.
pub fn window_time(window: &str) -> Option<i64> {
    let stamp = window.get(window.len().checked_sub(16)?..)?;
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ")
        .ok()
        .map(|t| t.and_utc().timestamp())
}

/// Object keys hold ids as they are where safe, anything else as `_`.
fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn vm_prefix(window: &str, vm: &str) -> String {
    format!("{WORK_PREFIX}/{}/{}", safe(window), safe(vm))
}

fn lease_key(prefix: &str, generation: u32) -> String {
    format!("{prefix}/{LEASE}{generation:06}")
}

/// The objects of one VM of a window: its lease generations and whether `done` exists.
async fn scan(store: &Store, prefix: &str) -> Result<(Vec<u32>, bool)> {
    let mut gens = Vec::new();
    let mut done = false;
    for m in store.list(prefix).await? {
        let key = m.location.to_string();
        let name = key.rsplit('/').next().unwrap_or_default();
        if name == DONE {
            done = true;
        } else if let Some(g) = name.strip_prefix(LEASE).and_then(|g| g.parse().ok()) {
            gens.push(g);
        }
    }
    gens.sort_unstable();
    Ok((gens, done))
}

async fn read_done(store: &Store, prefix: &str) -> Result<DoneMarker> {
    let data = store.get(&format!("{prefix}/{DONE}")).await?;
    serde_json::from_slice(&data).map_err(|e| RepoError::Corrupt {
        key: format!("{prefix}/{DONE}"),
        reason: e.to_string(),
    })
}

async fn read_lease(store: &Store, prefix: &str, generation: u32) -> Result<Option<WorkLease>> {
    match store.get(&lease_key(prefix, generation)).await {
        Ok(d) => Ok(Some(WorkLease::decode(&d, generation))),
        Err(RepoError::Missing { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Tries to claim `vm` of `window` for `appliance` (process `owner`) with time-to-live `ttl`.
/// On success the lease is renewed in the background until the guard is finished, released or
/// dropped; `lost` is cancelled if another appliance takes the VM over meanwhile (this one
/// stalled past the TTL), and the caller must then stop.
pub async fn claim(
    store: &Store,
    window: &str,
    vm: &str,
    appliance: &str,
    owner: &str,
    ttl: Duration,
    lost: CancellationToken,
) -> Result<Claim> {
    let prefix = vm_prefix(window, vm);
    let (gens, done) = scan(store, &prefix).await?;
    if done {
        return Ok(Claim::Done(read_done(store, &prefix).await?));
    }
    let mut previous = None;
    let next = match gens.last() {
        None => 0,
        Some(&g) => match read_lease(store, &prefix, g).await? {
            Some(l) if l.is_live() => return Ok(Claim::Busy(l)),
            // Deleted since the listing: released without `done` (a cancelled backup).
            None => g + 1,
            Some(l) => {
                previous = Some(l);
                g + 1
            }
        },
    };
    let lease = WorkLease {
        appliance: appliance.into(),
        owner: owner.into(),
        expires: now_unix() + ttl.as_secs().max(1) as i64,
        generation: next,
    };
    let key = lease_key(&prefix, next);
    let body = serde_json::to_vec(&lease).expect("lease serializes");
    if store.create(&key, body).await? == Created::AlreadyExists {
        // Another appliance won this generation.
        return Ok(match read_lease(store, &prefix, next).await? {
            Some(l) => Claim::Busy(l),
            None => Claim::Busy(WorkLease {
                expires: 0,
                ..lease
            }),
        });
    }
    // The previous holder may have finished between our listing and our create.
    if store.head(&format!("{prefix}/{DONE}")).await?.is_some() {
        store.delete(&key).await?;
        return Ok(Claim::Done(read_done(store, &prefix).await?));
    }
    Ok(Claim::Claimed(WorkGuard::start(
        store.clone(),
        prefix,
        lease,
        previous,
        ttl,
        lost,
    )))
}

/// A held work lease.
#[derive(Debug)]
pub struct WorkGuard {
    store: Store,
    prefix: String,
    lease: WorkLease,
    previous: Option<WorkLease>,
    refresher: Option<JoinHandle<()>>,
}

impl WorkGuard {
    fn start(
        store: Store,
        prefix: String,
        lease: WorkLease,
        previous: Option<WorkLease>,
        ttl: Duration,
        lost: CancellationToken,
    ) -> Self {
        let (s, p, l) = (store.clone(), prefix.clone(), lease.clone());
        let refresher = tokio::spawn(async move {
            let key = lease_key(&p, l.generation);
            loop {
                tokio::time::sleep(ttl / 3).await;
                match scan(&s, &p).await {
                    Ok((gens, _)) if gens.iter().any(|&g| g > l.generation) => {
                        tracing::warn!(lease = %key, "another appliance took this VM over");
                        lost.cancel();
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(lease = %key, error = %e, "cannot check the work lease")
                    }
                }
                let renewed = WorkLease {
                    expires: now_unix() + ttl.as_secs().max(1) as i64,
                    ..l.clone()
                };
                let body = serde_json::to_vec(&renewed).expect("lease serializes");
                if let Err(e) = s.overwrite(&key, body).await {
                    tracing::warn!(lease = %key, error = %e, "cannot renew the work lease");
                }
            }
        });
        Self {
            store,
            prefix,
            lease,
            previous,
            refresher: Some(refresher),
        }
    }

    /// The lease held.
    pub fn lease(&self) -> &WorkLease {
        &self.lease
    }

    /// The expired lease this claim took over, if any: its owner died (or stalled) holding it.
    pub fn previous(&self) -> Option<&WorkLease> {
        self.previous.as_ref()
    }

    fn stop(&mut self) {
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
    }

    /// Marks the VM finished for the window (first marker wins), then drops the lease.
    pub async fn finish(mut self, marker: &DoneMarker) -> Result<()> {
        self.stop();
        let body = serde_json::to_vec(marker).expect("marker serializes");
        self.store
            .create(&format!("{}/{DONE}", self.prefix), body)
            .await?;
        self.store
            .delete(&lease_key(&self.prefix, self.lease.generation))
            .await
    }

    /// Gives the VM back unfinished (cancelled): another appliance may claim it at once.
    pub async fn release(mut self) -> Result<()> {
        self.stop();
        self.store
            .delete(&lease_key(&self.prefix, self.lease.generation))
            .await
    }
}

impl Drop for WorkGuard {
    fn drop(&mut self) {
        if let Some(r) = self.refresher.take() {
            r.abort();
            // Best effort, as for backup leases: an abandoned lease would otherwise hold the VM
            // until it expires.
            let (store, key) = (
                self.store.clone(),
                lease_key(&self.prefix, self.lease.generation),
            );
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = store.delete(&key).await;
                });
            }
        }
    }
}

/// One VM of a window, as [`list`] reports it.
#[derive(Clone, Debug, Serialize)]
pub struct WorkState {
    /// The window (`<job>-<firing time>`).
    pub window: String,
    /// The VM id.
    pub vm: String,
    /// `leased`, `expired` or `done`.
    pub state: String,
    /// The newest lease, if any.
    pub lease: Option<WorkLease>,
    /// The marker, once done.
    pub done: Option<DoneMarker>,
}

/// Every VM of every window still on the store (windows are removed by [`prune`]).
pub async fn list(store: &Store) -> Result<Vec<WorkState>> {
    let mut vms: std::collections::BTreeMap<(String, String), (Vec<u32>, bool)> =
        Default::default();
    for m in store.list(WORK_PREFIX).await? {
        let key = m.location.to_string();
        let parts: Vec<&str> = key.split('/').collect();
        let [_, _, window, vm, name] = parts.as_slice() else {
            continue;
        };
        let e = vms.entry((window.to_string(), vm.to_string())).or_default();
        if *name == DONE {
            e.1 = true;
        } else if let Some(g) = name.strip_prefix(LEASE).and_then(|g| g.parse().ok()) {
            e.0.push(g);
        }
    }
    let mut out = Vec::new();
    for ((window, vm), (gens, done)) in vms {
        let prefix = format!("{WORK_PREFIX}/{window}/{vm}");
        let lease = match gens.iter().max() {
            Some(&g) => read_lease(store, &prefix, g).await?,
            None => None,
        };
        let done = if done {
            Some(read_done(store, &prefix).await?)
        } else {
            None
        };
        let state = match (&done, &lease) {
            (Some(_), _) => "done",
            (None, Some(l)) if l.is_live() => "leased",
            _ => "expired",
        };
        out.push(WorkState {
            window,
            vm,
            state: state.into(),
            lease,
            done,
        });
    }
    Ok(out)
}

/// Deletes the objects of windows that fired before `before` (Unix seconds); returns how many.
pub async fn prune(store: &Store, before: i64) -> Result<usize> {
    let mut n = 0;
    for m in store.list(WORK_PREFIX).await? {
        let key = m.location.to_string();
        let old = key
            .split('/')
            .nth(2)
            .and_then(window_time)
            .is_some_and(|t| t < before);
        if old {
            store.delete(&key).await?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use std::sync::Arc;

    fn store() -> Store {
        Store::new(Arc::new(InMemory::new()), "memory")
    }

    #[test]
    fn window_ids_name_the_job_and_the_firing() {
        let w = window_id("night ly", 1_700_000_000);
        assert_eq!(w, "night_ly-20231114T221320Z");
        assert_eq!(window_time(&w), Some(1_700_000_000));
        assert_eq!(window_time("x"), None);
    }

    #[tokio::test]
    async fn one_claim_wins_and_done_is_final() {
        let s = store();
        let ttl = Duration::from_secs(60);
        let tok = CancellationToken::new;
        let Claim::Claimed(g) = claim(&s, "w-20240101T000000Z", "vm1", "a", "pa", ttl, tok())
            .await
            .unwrap()
        else {
            panic!("first claim must win")
        };
        assert!(g.previous().is_none());
        match claim(&s, "w-20240101T000000Z", "vm1", "b", "pb", ttl, tok())
            .await
            .unwrap()
        {
            Claim::Busy(l) => assert_eq!((l.appliance.as_str(), l.generation), ("a", 0)),
            other => panic!("{other:?}"),
        }
        let states = list(&s).await.unwrap();
        assert_eq!(states.len(), 1);
        assert_eq!(states[0].state, "leased");
        let marker = DoneMarker {
            appliance: "a".into(),
            status: "success".into(),
            restore_point: Some("rp".into()),
            error: None,
            time: 1,
        };
        g.finish(&marker).await.unwrap();
        match claim(&s, "w-20240101T000000Z", "vm1", "b", "pb", ttl, tok())
            .await
            .unwrap()
        {
            Claim::Done(m) => assert_eq!(m, marker),
            other => panic!("{other:?}"),
        }
        assert_eq!(list(&s).await.unwrap()[0].state, "done");
        // Old windows go.
        assert_eq!(prune(&s, 1_600_000_000).await.unwrap(), 0);
        assert_eq!(prune(&s, 1_800_000_000).await.unwrap(), 1);
        assert!(list(&s).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_once_and_its_holder_learns_it() {
        let s = store();
        let short = Duration::from_secs(1);
        let lost_a = CancellationToken::new();
        let Claim::Claimed(a) = claim(
            &s,
            "w-20240101T000000Z",
            "vm1",
            "a",
            "pa",
            short,
            lost_a.clone(),
        )
        .await
        .unwrap() else {
            panic!()
        };
        // `a` stalls: its renewals stop (as if the process were frozen) and the lease runs out.
        let mut a = a;
        a.stop();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let ttl = Duration::from_secs(60);
        let (b, c) = tokio::join!(
            claim(
                &s,
                "w-20240101T000000Z",
                "vm1",
                "b",
                "pb",
                ttl,
                CancellationToken::new()
            ),
            claim(
                &s,
                "w-20240101T000000Z",
                "vm1",
                "c",
                "pc",
                ttl,
                CancellationToken::new()
            ),
        );
        let (b, c) = (b.unwrap(), c.unwrap());
        let winner = match (b, c) {
            (Claim::Claimed(g), Claim::Busy(_)) | (Claim::Busy(_), Claim::Claimed(g)) => g,
            other => panic!("exactly one takeover expected: {other:?}"),
        };
        let prev = winner.previous().unwrap();
        assert_eq!((prev.appliance.as_str(), prev.owner.as_str()), ("a", "pa"));
        assert_eq!(winner.lease().generation, 1);
        // A holder that wakes up finds the newer generation.
        drop(a);
        let lost_b = CancellationToken::new();
        let Claim::Claimed(x) = claim(
            &s,
            "w-20240101T000000Z",
            "vm2",
            "a",
            "pa",
            short,
            lost_b.clone(),
        )
        .await
        .unwrap() else {
            panic!()
        };
        s.create(
            &lease_key(&vm_prefix("w-20240101T000000Z", "vm2"), 1),
            b"{}".to_vec(),
        )
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), lost_b.cancelled())
            .await
            .expect("the holder learns it lost the VM");
        drop(x);
        assert!(!lost_a.is_cancelled());
    }
}
