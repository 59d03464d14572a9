//! Scale-out: several appliances configured with the same repository and the same jobs share
//! each scheduled run's VMs through work leases on the repository's object store
//! (`ferry_repo::work`, ADR 0105), with no coordinator of their own.
//!
//! Every appliance's scheduler fires the job at the same planned time, so all of them name the
//! same window. Each session then walks the job's VMs (starting at an offset of its own, so the
//! appliances do not all race for the first VM): within its limits it claims a VM and backs it
//! up, or finds it leased by another appliance (and looks again later: the holder may die), or
//! finished (and shows that appliance's result). A lease taken over from a dead appliance first
//! checks whether that appliance's restore point made it into the repository (it died between
//! the commit and the `done` marker), then removes the snapshot it left on the hypervisor, then
//! backs the VM up. The session ends when every VM of the window is finished by someone.

use crate::App;
use crate::config::{Document, JobConfig, Window};
use crate::jobs::{LiveSession, Status};
use ferry_hv::{HypervisorDriver, VmSummary};
use ferry_repo::Repository;
use ferry_repo::work::{self, Claim, DoneMarker, WorkGuard};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Work windows are kept this long on the store, then removed after a run.
const KEEP_WINDOWS: i64 = 7 * 86_400;

/// The scheduled window a session shares with the other appliances.
#[derive(Clone, Debug)]
pub struct WorkWindow {
    /// `<job>-<planned firing time>`.
    pub id: String,
    /// The planned firing time (Unix seconds).
    pub start: i64,
    /// This appliance's name.
    pub appliance: String,
    /// This process, as drivers mark their snapshots ([`ferry_hv::journal::process_owner`]).
    pub owner: String,
    /// Lease time-to-live.
    pub ttl: Duration,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct WorkMetrics {
    /// Work leases claimed by this process.
    pub claimed: AtomicU64,
    /// Of those, taken over from an appliance whose lease had expired.
    pub taken_over: AtomicU64,
    /// VMs of a window finished by another appliance.
    pub done_elsewhere: AtomicU64,
    /// Work leases held now.
    pub held: AtomicI64,
}

/// Counts a held lease for as long as it lives.
struct Held<'a>(&'a AtomicI64);

impl<'a> Held<'a> {
    fn new(n: &'a AtomicI64) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The name of this appliance: `[appliance] name`, else the host name.
pub fn appliance_name(doc: &Document) -> String {
    doc.appliance.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "ferry".into())
    })
}

/// The VMs in the order this appliance tries them: rotated by a hash of its name, so several
/// appliances start on different VMs.
pub fn rotate(mut vms: Vec<VmSummary>, work: Option<&WorkWindow>) -> Vec<VmSummary> {
    if let Some(w) = work
        && !vms.is_empty()
    {
        let h = w.appliance.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let n = vms.len();
        vms.rotate_left((h % n as u64) as usize);
    }
    vms
}

/// One VM of a session and what backing it up needs.
pub struct VmJob<'a> {
    /// The session.
    pub s: &'a Arc<LiveSession>,
    /// The job's name.
    pub job_name: &'a str,
    /// The job.
    pub job: &'a JobConfig,
    /// Its repository.
    pub repo: &'a Arc<Repository>,
    /// The connected source.
    pub driver: Arc<dyn HypervisorDriver>,
    /// The VM.
    pub vm: &'a VmSummary,
}

/// How a claimed VM ended for this appliance.
enum Outcome {
    /// Finished (by this appliance or, as found out, by the dead one): stop.
    Finished,
    /// Given back (lost to a takeover, or a transient failure): look again later.
    Again,
}

/// The restore point of `vm` started at or after `since`, if the repository has one.
async fn restore_point_since(
    repo: &Repository,
    vm: &str,
    since: i64,
) -> Result<Option<String>, String> {
    let from = chrono::DateTime::from_timestamp(since, 0)
        .unwrap_or_default()
        .format("%Y%m%dT%H%M%S")
        .to_string();
    let ids = repo.snapshot_ids().await.map_err(|e| e.to_string())?;
    for id in ids
        .iter()
        .rev()
        .take_while(|id| id.as_str() >= from.as_str())
    {
        let m = repo.load_manifest(id).await.map_err(|e| e.to_string())?;
        if m.meta.vm.id == vm {
            return Ok(Some(id.clone()));
        }
    }
    Ok(None)
}

impl App {
    /// The window of the scheduler's firing of `job` planned at `fired`.
    pub(crate) fn work_window(&self, job: &str, fired: i64, doc: &Document) -> WorkWindow {
        WorkWindow {
            id: work::window_id(job, fired),
            start: fired,
            appliance: appliance_name(doc),
            owner: ferry_hv::journal::process_owner(),
            ttl: Duration::from_secs(doc.appliance.lease_ttl_seconds),
        }
    }

    /// Backs up `c.vm` for window `w` unless another appliance does: claims its work lease
    /// within the job's and the appliance's limits, waits while another appliance holds it,
    /// takes it over when that lease expires, shows another appliance's result when done.
    pub(crate) async fn claim_and_backup(
        self: &Arc<Self>,
        c: VmJob<'_>,
        slots: crate::jobs::JobSlots,
        window: Option<Window>,
        w: &WorkWindow,
    ) {
        let (s, vm) = (c.s, c.vm);
        let poll = (w.ttl / 6).clamp(Duration::from_millis(250), Duration::from_secs(15));
        let mut errors = 0;
        let mut holder = String::new();
        loop {
            if s.cancel.is_cancelled() {
                return;
            }
            let Some(held) = self.vm_slots(s, c.job, &slots, c.driver.as_ref(), vm).await else {
                return;
            };
            if self.window_closed(s, vm, window) {
                return;
            }
            let lost = s.cancel.child_token();
            let claim = work::claim(
                c.repo.store(),
                &w.id,
                &vm.id,
                &w.appliance,
                &w.owner,
                w.ttl,
                lost.clone(),
            )
            .await;
            match claim {
                Err(e) => {
                    errors += 1;
                    let msg = format!("cannot claim the VM's work lease: {e}");
                    if errors >= 5 {
                        self.log(s, "error", Some(&vm.name), msg.clone());
                        s.vm(&vm.id, |l| {
                            l.view.status = Status::Failed;
                            l.view.error = Some(msg);
                        });
                        return;
                    }
                    self.log(s, "warn", Some(&vm.name), msg);
                }
                Ok(Claim::Done(m)) => {
                    self.show_done(s, vm, &m);
                    return;
                }
                Ok(Claim::Busy(l)) => {
                    errors = 0;
                    if holder != l.appliance {
                        self.log(
                            s,
                            "info",
                            Some(&vm.name),
                            format!("appliance `{}` holds this VM", l.appliance),
                        );
                        holder = l.appliance.clone();
                    }
                    s.vm(&vm.id, |v| v.view.appliance = Some(l.appliance.clone()));
                }
                Ok(Claim::Claimed(g)) => {
                    errors = 0;
                    if let Outcome::Finished = self.run_claimed(&c, w, g, &lost).await {
                        return;
                    }
                }
            }
            drop(held);
            tokio::select! {
                _ = s.cancel.cancelled() => return,
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    async fn run_claimed(
        self: &Arc<Self>,
        c: &VmJob<'_>,
        w: &WorkWindow,
        g: WorkGuard,
        lost: &CancellationToken,
    ) -> Outcome {
        let (s, vm) = (c.s, c.vm);
        let _held = Held::new(&self.metrics.work.held);
        self.metrics.work.claimed.fetch_add(1, Ordering::Relaxed);
        if let Some(prev) = g.previous().cloned() {
            self.metrics.work.taken_over.fetch_add(1, Ordering::Relaxed);
            self.log(
                s,
                "warn",
                Some(&vm.name),
                format!(
                    "taking the VM over from appliance `{}`: its lease expired",
                    prev.appliance
                ),
            );
            // It may have died after its restore point was committed.
            match restore_point_since(c.repo, &vm.id, w.start).await {
                Ok(Some(rp)) => {
                    let m = DoneMarker {
                        appliance: prev.appliance.clone(),
                        status: "success".into(),
                        restore_point: Some(rp),
                        error: None,
                        time: chrono::Utc::now().timestamp(),
                    };
                    if let Err(e) = g.finish(&m).await {
                        tracing::warn!(error = %e, "cannot mark the VM done");
                    }
                    self.show_done(s, vm, &m);
                    return Outcome::Finished;
                }
                Ok(None) => {}
                Err(e) => {
                    self.log(
                        s,
                        "warn",
                        Some(&vm.name),
                        format!("cannot list restore points: {e}"),
                    );
                    let _ = g.release().await;
                    return Outcome::Again;
                }
            }
            match c.driver.remove_leftovers(&vm.id, &prev.owner).await {
                Ok(r) if r.snapshots + r.attachments > 0 => self.log(
                    s,
                    "warn",
                    Some(&vm.name),
                    format!(
                        "removed {} snapshot(s) and {} attachment(s) appliance `{}` left behind",
                        r.snapshots, r.attachments, prev.appliance
                    ),
                ),
                Ok(_) => {}
                Err(e) => self.log(
                    s,
                    "warn",
                    Some(&vm.name),
                    format!(
                        "cannot remove what appliance `{}` left behind: {e}",
                        prev.appliance
                    ),
                ),
            }
        }
        s.vm(&vm.id, |l| l.view.appliance = Some(w.appliance.clone()));
        let r = self
            .backup_one(s, c.job_name, c.job, c.repo, c.driver.clone(), vm, lost)
            .await;
        if s.cancel.is_cancelled() {
            // Give it back: another appliance may finish the window.
            let _ = g.release().await;
            return Outcome::Finished;
        }
        if lost.is_cancelled() {
            self.log(
                s,
                "warn",
                Some(&vm.name),
                "another appliance took this VM over (this one stalled past the lease)".into(),
            );
            drop(g);
            return Outcome::Again;
        }
        let (status, restore_point, error) = match r {
            Ok(rp) => ("success", Some(rp), None),
            Err(e) => ("failed", None, Some(e)),
        };
        let m = DoneMarker {
            appliance: w.appliance.clone(),
            status: status.into(),
            restore_point,
            error,
            time: chrono::Utc::now().timestamp(),
        };
        if let Err(e) = g.finish(&m).await {
            self.log(
                s,
                "warn",
                Some(&vm.name),
                format!("cannot mark the VM done for the window: {e}"),
            );
        }
        Outcome::Finished
    }

    /// Shows the result another appliance wrote for `vm`.
    fn show_done(&self, s: &LiveSession, vm: &VmSummary, m: &DoneMarker) {
        self.metrics
            .work
            .done_elsewhere
            .fetch_add(1, Ordering::Relaxed);
        let ok = m.status == "success";
        self.log(
            s,
            if ok { "info" } else { "warn" },
            Some(&vm.name),
            format!(
                "backed up by appliance `{}`: {}{}",
                m.appliance,
                m.status,
                m.restore_point
                    .as_deref()
                    .map(|r| format!(", restore point {r}"))
                    .unwrap_or_default()
            ),
        );
        s.vm(&vm.id, |l| {
            l.view.status = if ok { Status::Success } else { Status::Failed };
            l.view.appliance = Some(m.appliance.clone());
            l.view.restore_point = m.restore_point.clone();
            l.view.error = m.error.clone();
        });
        self.persist(s);
    }

    /// Removes the work objects of windows older than a week.
    pub(crate) async fn prune_work(&self, repo: &Repository, w: &WorkWindow) {
        match work::prune(repo.store(), w.start - KEEP_WINDOWS).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(objects = n, "removed the work leases of old windows"),
            Err(e) => tracing::warn!(error = %e, "cannot remove old work leases"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vms(n: usize) -> Vec<VmSummary> {
        (0..n)
            .map(|i| VmSummary {
                id: format!("id{i}"),
                name: format!("vm{i}"),
                power_state: ferry_hv::PowerState::Running,
                host: None,
                cluster: None,
                disks: vec![],
                tags: vec![],
            })
            .collect()
    }

    fn window(name: &str) -> WorkWindow {
        WorkWindow {
            id: "w".into(),
            start: 0,
            appliance: name.into(),
            owner: "o".into(),
            ttl: Duration::from_secs(3),
        }
    }

    #[test]
    fn appliances_start_at_different_vms_and_keep_every_vm() {
        let firsts: std::collections::BTreeSet<String> = ["a1", "a2", "a3"]
            .iter()
            .map(|a| rotate(vms(30), Some(&window(a)))[0].id.clone())
            .collect();
        assert!(firsts.len() > 1, "{firsts:?}");
        let mut all: Vec<String> = rotate(vms(30), Some(&window("a1")))
            .into_iter()
            .map(|v| v.id)
            .collect();
        all.sort();
        let mut want: Vec<String> = vms(30).into_iter().map(|v| v.id).collect();
        want.sort();
        assert_eq!(all, want);
        // Manual runs keep the source's order.
        assert_eq!(rotate(vms(3), None)[0].id, "id0");
    }
}
