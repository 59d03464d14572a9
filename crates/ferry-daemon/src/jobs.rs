//! Running jobs: every run is a session with an id, a live log, progress per VM and its
//! disks, and a cancel. A session connects to the job's source, picks the VMs the job
//! selects, backs each up through the [`Backend`](crate::Backend) within the appliance's and
//! the source's concurrency limits and the job's window, retries failed VMs with backoff, then
//! applies the job's GFS retention to its VMs. Its rows go to the catalog as it goes.

use crate::App;
use crate::catalog::{Event, VmRun};
use crate::config::{Document, JobConfig, RepositoryConfig};
use crate::problem::{ApiResult, Problem};
use crate::schedule::with_retries;
use ferry_engine::{BackupOptions, Progress};
use ferry_hv::VmSummary;
use ferry_repo::{Repository, Store};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A session's or a VM's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting to start.
    Queued,
    /// Working.
    Running,
    /// Waiting before another attempt.
    Retrying,
    /// Done, all well.
    Success,
    /// Done, some VMs skipped (window closed).
    Warning,
    /// Done with failures.
    Failed,
    /// Cancelled by a user or by shutdown.
    Cancelled,
    /// Not attempted (outside the window).
    Skipped,
}

impl Status {
    /// Whether it is final.
    pub fn done(self) -> bool {
        !matches!(self, Status::Queued | Status::Running | Status::Retrying)
    }
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Retrying => "retrying",
            Status::Success => "success",
            Status::Warning => "warning",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Skipped => "skipped",
        }
    }
}

/// One disk of a VM's run, once known.
#[derive(Clone, Debug, Serialize)]
pub struct DiskView {
    /// Disk name.
    pub name: String,
    /// Virtual size.
    pub size: u64,
    /// How it was read (`full`, `changed-blocks`, …).
    pub mode: String,
    /// Bytes read from the source.
    pub read_bytes: u64,
    /// Bytes uploaded.
    pub uploaded_bytes: u64,
}

/// One VM of a session.
#[derive(Clone, Debug, Serialize)]
pub struct VmView {
    /// Hypervisor id.
    pub vm_id: String,
    /// Name.
    pub vm_name: String,
    /// State.
    pub status: Status,
    /// Attempts made.
    pub attempts: u32,
    /// Virtual bytes to cover (all disks).
    pub total: u64,
    /// Virtual bytes done.
    pub done: u64,
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes uploaded.
    pub written: u64,
    /// The disk being read now.
    pub current_disk: String,
    /// Bytes per second read so far (this attempt).
    pub rate: u64,
    /// Seconds left at this rate.
    pub eta_seconds: Option<u64>,
    /// The restore point written.
    pub restore_point: Option<String>,
    /// Per disk, when done.
    pub disks: Vec<DiskView>,
    /// Why it failed or was skipped.
    pub error: Option<String>,
    /// The appliance backing it up (scheduled runs; another one when it holds the VM's work
    /// lease, ADR 0105).
    pub appliance: Option<String>,
    /// Where the backup's time went (source / CPU / target shares) and the largest share;
    /// live while it runs (ADR 0141).
    pub time_split: Option<TimeSplitView>,
    /// The same per disk, in the order the disks were read (the last one live).
    pub disk_time_splits: Vec<DiskSplitView>,
    /// What a queued VM waits for: a job slot or a source, host, datastore or appliance
    /// limit (ADR 0142).
    pub waiting_for: Option<String>,
}

/// The bottleneck split of one disk.
#[derive(Clone, Debug, Serialize)]
pub struct DiskSplitView {
    /// Disk name.
    pub disk: String,
    /// Its shares.
    #[serde(flatten)]
    pub split: TimeSplitView,
}

/// How often the live log tells a running VM's bottleneck, when it changed.
const SPLIT_LOG_EVERY: Duration = Duration::from_secs(2);

/// The bottleneck split of a VM's backup (ADR 0109).
#[derive(Clone, Debug, Serialize)]
pub struct TimeSplitView {
    /// Percent of busy time waiting on the source.
    pub source_pct: f64,
    /// … hashing, compressing, encrypting.
    pub cpu_pct: f64,
    /// … waiting on the repository.
    pub target_pct: f64,
    /// `source`, `cpu` or `target`.
    pub bottleneck: String,
}

impl From<ferry_engine::TimeSplit> for TimeSplitView {
    fn from(t: ferry_engine::TimeSplit) -> Self {
        Self {
            source_pct: t.source_pct,
            cpu_pct: t.cpu_pct,
            target_pct: t.target_pct,
            bottleneck: t.bottleneck().into(),
        }
    }
}

impl VmView {
    /// A VM not started yet.
    pub fn queued(vm_id: &str, vm_name: &str) -> Self {
        Self {
            vm_id: vm_id.into(),
            vm_name: vm_name.into(),
            status: Status::Queued,
            attempts: 0,
            total: 0,
            done: 0,
            read: 0,
            written: 0,
            current_disk: String::new(),
            rate: 0,
            eta_seconds: None,
            restore_point: None,
            disks: Vec::new(),
            error: None,
            appliance: None,
            time_split: None,
            disk_time_splits: Vec::new(),
            waiting_for: None,
        }
    }

    /// Takes the live time splits of `p` into the view.
    fn splits_from(&mut self, p: &ferry_engine::ProgressSnapshot) {
        if p.time.measured() {
            self.time_split = Some(p.time.into());
        }
        self.disk_time_splits = p
            .disks
            .iter()
            .filter(|d| d.time.measured())
            .map(|d| DiskSplitView {
                disk: d.name.clone(),
                split: d.time.into(),
            })
            .collect();
    }
}

/// The permits a VM holds while it is backed up.
pub(crate) struct VmSlots {
    _job: tokio::sync::OwnedSemaphorePermit,
    _disks: Option<tokio::sync::OwnedSemaphorePermit>,
    _limits: crate::schedule::Slot,
}

/// A session's own limits: VMs and disks of the job at once.
#[derive(Clone)]
pub(crate) struct JobSlots {
    vms: Arc<tokio::sync::Semaphore>,
    disks: Option<(Arc<tokio::sync::Semaphore>, usize)>,
}

impl JobSlots {
    fn new(job: &JobConfig) -> Self {
        Self {
            vms: Arc::new(tokio::sync::Semaphore::new(job.parallel_vms)),
            disks: job
                .parallel_disks
                .map(|n| (Arc::new(tokio::sync::Semaphore::new(n.max(1))), n.max(1))),
        }
    }
}

/// A session as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SessionView {
    /// Id.
    pub id: String,
    /// Job name.
    pub job: String,
    /// `manual` or `schedule`.
    pub trigger: String,
    /// State.
    pub status: Status,
    /// Unix seconds.
    pub started: i64,
    /// Unix seconds.
    pub ended: Option<i64>,
    /// Who started it (`scheduler` or a user).
    pub started_by: String,
    /// VMs.
    pub vms: Vec<VmView>,
    /// Restore points removed by retention after the run.
    pub pruned: u64,
    /// Why the session failed as a whole.
    pub error: Option<String>,
    /// `backup` (a job's run) or `restore`.
    pub kind: &'static str,
    /// What a restore session restores (absent for backups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<serde_json::Value>,
}

pub(crate) struct VmLive {
    pub(crate) view: VmView,
    pub(crate) progress: Option<(Arc<Progress>, tokio::time::Instant)>,
}

/// A running session.
pub struct LiveSession {
    /// Id.
    pub id: String,
    /// Cancels the run.
    pub cancel: CancellationToken,
    pub(crate) state: Mutex<(SessionView, BTreeMap<String, VmLive>)>,
    pub(crate) seq: AtomicU64,
}

impl std::fmt::Debug for LiveSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveSession")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub(crate) fn new_id() -> String {
    let mut r = [0u8; 3];
    let _ = getrandom::fill(&mut r);
    format!(
        "{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
        r.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

impl LiveSession {
    /// The current view (progress read live).
    pub fn view(&self) -> SessionView {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut v = st.0.clone();
        v.vms =
            st.1.values()
                .map(|l| {
                    let mut vm = l.view.clone();
                    if let Some((p, since)) = &l.progress {
                        let s = p.snapshot();
                        vm.total = s.total;
                        vm.done = s.done;
                        vm.read = s.read;
                        vm.written = s.written;
                        vm.current_disk = s.current.clone();
                        vm.splits_from(&s);
                        let secs = since.elapsed().as_secs_f64();
                        if secs > 0.0 {
                            vm.rate = (s.done as f64 / secs) as u64;
                            vm.eta_seconds = (vm.rate > 0)
                                .then(|| s.total.saturating_sub(s.done) / vm.rate.max(1));
                        }
                    }
                    vm
                })
                .collect();
        v
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut SessionView, &mut BTreeMap<String, VmLive>)) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (a, b) = &mut *st;
        f(a, b);
    }

    pub(crate) fn vm(&self, id: &str, f: impl FnOnce(&mut VmLive)) {
        self.update(|_, vms| {
            if let Some(v) = vms.get_mut(id) {
                f(v)
            }
        });
    }
}

impl App {
    /// Appends a line to a session's log (and the service's own log).
    pub(crate) fn log(&self, s: &LiveSession, level: &str, vm: Option<&str>, message: String) {
        match level {
            "error" => tracing::error!(session = %s.id, vm, "{message}"),
            "warn" => tracing::warn!(session = %s.id, vm, "{message}"),
            _ => tracing::info!(session = %s.id, vm, "{message}"),
        }
        // Numbered, stored and streamed in one step: streams see the lines in order.
        self.events.log(&s.id, || {
            let e = Event {
                seq: s.seq.fetch_add(1, Ordering::SeqCst) + 1,
                time: now(),
                level: level.into(),
                vm: vm.map(str::to_string),
                message,
            };
            if let Err(err) = self.catalog.add_event(&s.id, &e) {
                tracing::warn!(error = %err, "cannot record a session event");
            }
            e
        });
    }

    pub(crate) fn persist(&self, s: &LiveSession) {
        let v = s.view();
        let detail = serde_json::to_value(&v).unwrap_or_default();
        if let Err(e) = self.catalog.upsert_session(
            &v.id,
            &v.job,
            &v.trigger,
            v.status.as_str(),
            v.started,
            v.ended,
            &detail,
        ) {
            tracing::warn!(error = %e, "cannot record the session");
        }
        self.events.changed(self, &detail, v.status.done());
    }

    /// Starts a run of job `name`; refused while the appliance is stopping or the job is
    /// already running.
    pub fn start_session(
        self: &Arc<Self>,
        name: &str,
        trigger: &str,
        by: &str,
    ) -> ApiResult<String> {
        self.start_session_in(name, trigger, by, None)
    }

    /// [`start_session`](Self::start_session) for the scheduler's firing planned at `fired`
    /// (Unix seconds): its VMs are shared with the other appliances of the repository through
    /// work leases (ADR 0105).
    pub fn start_session_in(
        self: &Arc<Self>,
        name: &str,
        trigger: &str,
        by: &str,
        fired: Option<i64>,
    ) -> ApiResult<String> {
        if self.stopping.is_cancelled() {
            return Err(Problem::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "the appliance is shutting down",
            ));
        }
        let doc = self.store.load()?;
        let Some(job) = doc.jobs.get(name).cloned() else {
            return Err(Problem::not_found(format!("job `{name}`")));
        };
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = live.values().find(|s| {
            let v = s.view();
            v.kind == "backup" && v.job == name && !v.status.done()
        }) {
            return Err(Problem::conflict(format!(
                "job `{name}` is already running as session {}",
                s.id
            )));
        }
        let id = new_id();
        let s = Arc::new(LiveSession {
            id: id.clone(),
            cancel: self.stopping_jobs.child_token(),
            state: Mutex::new((
                SessionView {
                    id: id.clone(),
                    job: name.into(),
                    trigger: trigger.into(),
                    status: Status::Queued,
                    started: now(),
                    ended: None,
                    started_by: by.into(),
                    vms: Vec::new(),
                    pruned: 0,
                    error: None,
                    kind: "backup",
                    restore: None,
                },
                BTreeMap::new(),
            )),
            seq: AtomicU64::new(0),
        });
        live.insert(id.clone(), s.clone());
        drop(live);
        self.persist(&s);
        let app = self.clone();
        let scheduled = trigger == "schedule";
        let (trigger, by) = (trigger.to_string(), by.to_string());
        self.tracker.spawn(async move {
            app.log(
                &s,
                "info",
                None,
                format!("session started ({trigger}, by {by})"),
            );
            let r = app
                .run(&s, name_owned(&s), job, doc, scheduled, fired)
                .await;
            let cancelled = s.cancel.is_cancelled();
            s.update(|v, vms| {
                v.ended = Some(now());
                if let Err(e) = &r {
                    v.error = Some(e.clone());
                }
                let st: Vec<Status> = vms.values().map(|l| l.view.status).collect();
                v.status = if cancelled {
                    Status::Cancelled
                } else if r.is_err() || st.contains(&Status::Failed) {
                    Status::Failed
                } else if st.contains(&Status::Skipped) {
                    Status::Warning
                } else {
                    Status::Success
                };
                for l in vms.values_mut() {
                    if !l.view.status.done() {
                        l.view.status = Status::Cancelled;
                    }
                    // Freeze the live counters into the view.
                    l.progress = None;
                }
            });
            // Progress counters were folded into the views above; write the final state.
            let v = s.view();
            app.log(
                &s,
                if v.status == Status::Success {
                    "info"
                } else {
                    "warn"
                },
                None,
                format!("session ended: {}", v.status.as_str()),
            );
            app.persist(&s);
            app.alert_session_end(&v);
            app.metrics.sessions_finished(
                v.status,
                v.ended.unwrap_or(v.started) - v.started,
                &v.job,
            );
            if v.status == Status::Success {
                app.start_chained(&v.job, fired);
            }
        });
        Ok(id)
    }

    /// Starts the jobs chained after `job` (in the same scale-out window, if any).
    fn start_chained(self: &Arc<Self>, job: &str, fired: Option<i64>) {
        let Ok(doc) = self.store.load() else {
            return;
        };
        for next in doc.chained(job) {
            match self.start_session_in(&next, "chain", &format!("job {job}"), fired) {
                Ok(id) => {
                    tracing::info!(job = %next, session = %id, after = job, "chained job started")
                }
                Err(p) => {
                    tracing::warn!(job = %next, after = job, "chained job not started: {}", p.detail)
                }
            }
        }
    }

    /// Cancels a running session.
    pub fn cancel_session(&self, id: &str) -> ApiResult<SessionView> {
        let s = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned();
        match s {
            Some(s) => {
                if s.view().status.done() {
                    return Err(Problem::conflict(format!("session {id} has ended")));
                }
                s.cancel.cancel();
                self.log(&s, "warn", None, "cancel requested".into());
                Ok(s.view())
            }
            None => match self.catalog.session(id) {
                Ok(Some(_)) => Err(Problem::conflict(format!("session {id} has ended"))),
                _ => Err(Problem::not_found(format!("session {id}"))),
            },
        }
    }

    /// A session: live if running in this process, else from the catalog.
    pub fn session_json(&self, id: &str) -> ApiResult<serde_json::Value> {
        if let Some(s) = self.live.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return serde_json::to_value(s.view()).map_err(|e| Problem::internal(e.to_string()));
        }
        self.catalog
            .session(id)
            .map_err(|e| Problem::internal(e.to_string()))?
            .ok_or_else(|| Problem::not_found(format!("session {id}")))
    }

    async fn run(
        self: &Arc<Self>,
        s: &Arc<LiveSession>,
        name: String,
        job: JobConfig,
        doc: Document,
        scheduled: bool,
        fired: Option<i64>,
    ) -> Result<(), String> {
        s.update(|v, _| v.status = Status::Running);
        self.persist(s);
        let mut src_cfg = doc
            .ferry
            .sources
            .get(&job.source)
            .cloned()
            .ok_or_else(|| format!("source `{}` is no longer configured", job.source))?;
        // A journal per appliance: appliances on one host never clean up each other's work.
        src_cfg
            .state_dir
            .get_or_insert_with(|| self.state_dir.join("journal"));
        let work = fired.map(|t| self.work_window(&name, t, &doc));
        let repo_cfg = doc
            .repositories
            .get(&job.repository)
            .cloned()
            .ok_or_else(|| format!("repository `{}` is no longer configured", job.repository))?;
        let window = job.window().map_err(|p| p.detail)?;
        self.log(
            s,
            "info",
            None,
            format!("connecting to source `{}`", job.source),
        );
        let driver = tokio::select! {
            _ = s.cancel.cancelled() => return Err("cancelled".into()),
            d = self.backend.connect(&job.source, &src_cfg) => d.map_err(|e| {
                format!("cannot connect to source `{}`: {e}", job.source)
            })?,
        };
        let vms = driver
            .list_vms()
            .await
            .map_err(|e| format!("cannot list the VMs of source `{}`: {e}", job.source))?;
        let picked: Vec<VmSummary> = vms
            .into_iter()
            .filter(|v| job.selects(&v.name, &v.id))
            .collect();
        if picked.is_empty() {
            return Err(format!(
                "no VM of source `{}` matches {:?}",
                job.source, job.vms
            ));
        }
        self.log(
            s,
            "info",
            None,
            format!(
                "{} VM(s) selected: {}",
                picked.len(),
                picked
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        s.update(|_, map| {
            for v in &picked {
                map.insert(
                    v.id.clone(),
                    VmLive {
                        view: VmView::queued(&v.id, &v.name),
                        progress: None,
                    },
                );
            }
        });
        self.persist(s);
        let repo = Arc::new(
            open_repository(&repo_cfg)
                .await
                .map_err(|e| format!("repository `{}`: {e}", job.repository))?,
        );
        let job_slots = JobSlots::new(&job);
        let mut set = tokio::task::JoinSet::new();
        for vm in crate::scaleout::rotate(picked, work.as_ref()) {
            let (app, s, repo, driver, job, slots, name, work) = (
                self.clone(),
                s.clone(),
                repo.clone(),
                driver.clone(),
                job.clone(),
                job_slots.clone(),
                name.clone(),
                work.clone(),
            );
            set.spawn(async move {
                if let Some(w) = work {
                    let ctx = crate::scaleout::VmJob {
                        s: &s,
                        job_name: &name,
                        job: &job,
                        repo: &repo,
                        driver,
                        vm: &vm,
                    };
                    app.claim_and_backup(ctx, slots, window.filter(|_| scheduled), &w)
                        .await;
                    return;
                }
                let Some(_slots) = app.vm_slots(&s, &job, &slots, driver.as_ref(), &vm).await
                else {
                    return;
                };
                if app.window_closed(&s, &vm, window.filter(|_| scheduled)) {
                    return;
                }
                let cancel = s.cancel.child_token();
                let _ = app
                    .backup_one(&s, &name, &job, &repo, driver, &vm, &cancel)
                    .await;
            });
        }
        while set.join_next().await.is_some() {}
        if let Some(w) = &work {
            self.prune_work(&repo, w).await;
        }
        if s.cancel.is_cancelled() {
            return Ok(());
        }
        if let Some(ret) = job.retention {
            let ids: Vec<String> = s.view().vms.iter().map(|v| v.vm_id.clone()).collect();
            match repo
                .prune_vms(ret.policy(), &|vm: &str| ids.iter().any(|i| i == vm), false)
                .await
            {
                Ok(plan) => {
                    let removed = plan.iter().filter(|d| !d.keep).count() as u64;
                    s.update(|v, _| v.pruned = removed);
                    self.log(
                        s,
                        "info",
                        None,
                        format!(
                            "retention kept {} and removed {removed} restore point(s)",
                            plan.len() as u64 - removed
                        ),
                    );
                }
                Err(e) => {
                    self.log(s, "error", None, format!("retention failed: {e}"));
                    return Err(format!("retention failed: {e}"));
                }
            }
        }
        // Rebuild this repository's rows so pruned points leave the history too.
        match repo.snapshots().await {
            Ok(ms) => {
                if let Err(e) = self.catalog.rebuild_from(&job.repository, &ms) {
                    tracing::warn!(error = %e, "cannot refresh the catalog");
                }
                self.metrics
                    .repository_usage(&job.repository, &repo, ms.len())
                    .await;
                self.record_usage(&job.repository);
            }
            Err(e) => tracing::warn!(error = %e, "cannot list restore points"),
        }
        Ok(())
    }

    /// Marks `vm` skipped if the job's window (scheduled runs) has closed.
    pub(crate) fn window_closed(
        &self,
        s: &LiveSession,
        vm: &VmSummary,
        window: Option<crate::config::Window>,
    ) -> bool {
        match window {
            Some(w) if !w.contains(self.clock.now()) => {
                let why = "the job's backup window closed before the VM's turn".to_string();
                self.log(s, "warn", Some(&vm.name), format!("skipped: {why}"));
                s.vm(&vm.id, |l| {
                    l.view.status = Status::Skipped;
                    l.view.error = Some(why);
                });
                true
            }
            _ => false,
        }
    }

    /// Backs up one VM (with the job's retries) unless `cancel` fires; returns the restore
    /// point or the last error.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn backup_one(
        self: &Arc<Self>,
        s: &Arc<LiveSession>,
        job_name: &str,
        job: &JobConfig,
        repo: &Arc<Repository>,
        driver: Arc<dyn ferry_hv::HypervisorDriver>,
        vm: &VmSummary,
        cancel: &CancellationToken,
    ) -> Result<String, String> {
        let started = now();
        let t0 = std::time::Instant::now();
        let r = with_retries(
            job.retries,
            Duration::from_secs(job.retry_delay_seconds),
            cancel,
            |attempt, e: &String, wait| {
                self.log(
                    s,
                    "warn",
                    Some(&vm.name),
                    format!(
                        "attempt {attempt} failed: {e}; retrying in {}s",
                        wait.as_secs()
                    ),
                );
                s.vm(&vm.id, |l| {
                    l.view.status = Status::Retrying;
                    l.view.error = Some(e.clone());
                    l.progress = None;
                });
            },
            |attempt| {
                let (driver, repo) = (driver.clone(), repo.clone());
                async move {
                    let progress = Arc::new(Progress::new());
                    s.vm(&vm.id, |l| {
                        l.view.status = Status::Running;
                        l.view.attempts = attempt;
                        l.progress = Some((progress.clone(), tokio::time::Instant::now()));
                    });
                    self.log(
                        s,
                        "info",
                        Some(&vm.name),
                        format!("backup started (attempt {attempt})"),
                    );
                    let limit_rate = job.throttle_at(self.clock.now()).ok().flatten();
                    if let Some(r) = limit_rate {
                        self.log(
                            s,
                            "info",
                            Some(&vm.name),
                            format!("throttled to {}/s", ferry_core::size::human_bytes(r)),
                        );
                    }
                    let opts = BackupOptions {
                        limit_rate,
                        cancel: cancel.child_token(),
                        progress: progress.clone(),
                        ..Default::default()
                    };
                    let backup =
                        self.backend
                            .backup_vm(driver.as_ref(), &job.source, &repo, vm, opts);
                    tokio::pin!(backup);
                    // The live log tells the bottleneck while the VM runs, when it changes.
                    let mut tick = tokio::time::interval(SPLIT_LOG_EVERY);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut told = String::new();
                    loop {
                        tokio::select! {
                            r = &mut backup => break r.map_err(|e| e.0),
                            _ = tick.tick() => {
                                let p = progress.snapshot();
                                let Some(d) = p.disks.last().filter(|d| d.time.measured()) else {
                                    continue;
                                };
                                let key = format!("{}/{}", d.name, d.time.bottleneck());
                                if key != told {
                                    self.log(s, "info", Some(&vm.name), format!(
                                        "disk {}: {}", d.name, split_text(&d.time)
                                    ));
                                    told = key;
                                }
                            }
                        }
                    }
                }
            },
        )
        .await;
        let seconds = t0.elapsed().as_secs_f64();
        let run =
            |status: &str, rp: Option<String>, read: u64, up: u64, err: Option<String>| VmRun {
                vm_id: vm.id.clone(),
                vm_name: vm.name.clone(),
                source: job.source.clone(),
                repository: job.repository.clone(),
                job: Some(job_name.into()),
                session: Some(s.id.clone()),
                time: started,
                status: status.into(),
                restore_point: rp,
                bytes_read: read,
                bytes_uploaded: up,
                seconds,
                error: err,
            };
        let out = match r {
            Ok(rep) => {
                let read = rep.total(|d| d.read_bytes);
                let up = rep.total(|d| d.uploaded_bytes);
                self.log(
                    s,
                    "info",
                    Some(&vm.name),
                    format!(
                        "restore point {} written: {} read, {} uploaded in {:.1}s; {}",
                        rep.snapshot,
                        ferry_core::size::human_bytes(read),
                        ferry_core::size::human_bytes(up),
                        seconds,
                        split_text(&rep.time)
                    ),
                );
                s.vm(&vm.id, |l| {
                    if let Some((p, _)) = l.progress.take() {
                        let snap = p.snapshot();
                        l.view.total = snap.total;
                        l.view.done = snap.done;
                        l.view.splits_from(&snap);
                    }
                    l.view.status = Status::Success;
                    l.view.error = None;
                    l.view.read = read;
                    l.view.written = up;
                    l.view.current_disk.clear();
                    l.view.eta_seconds = Some(0);
                    l.view.restore_point = Some(rep.snapshot.clone());
                    l.view.time_split = Some(rep.time.into());
                    l.view.disks = rep
                        .disks
                        .iter()
                        .map(|d| DiskView {
                            name: d.name.clone(),
                            size: d.size,
                            mode: serde_json::to_value(d.mode)
                                .ok()
                                .and_then(|m| m.as_str().map(str::to_string))
                                .unwrap_or_default(),
                            read_bytes: d.read_bytes,
                            uploaded_bytes: d.uploaded_bytes,
                        })
                        .collect();
                });
                self.metrics.vm_done(read, up, seconds);
                if let Err(e) = self.catalog.add_run(&run(
                    "success",
                    Some(rep.snapshot.clone()),
                    read,
                    up,
                    None,
                )) {
                    tracing::warn!(error = %e, "cannot record the VM run");
                }
                Ok(rep.snapshot)
            }
            Err(e) => {
                let cancelled = cancel.is_cancelled();
                self.log(
                    s,
                    "error",
                    Some(&vm.name),
                    if cancelled {
                        format!("cancelled: {e}")
                    } else {
                        format!("failed: {e}")
                    },
                );
                s.vm(&vm.id, |l| {
                    if let Some((p, _)) = l.progress.take() {
                        l.view.splits_from(&p.snapshot());
                    }
                    l.view.status = if cancelled {
                        Status::Cancelled
                    } else {
                        Status::Failed
                    };
                    l.view.error = Some(e.clone());
                });
                if !cancelled {
                    self.metrics.vm_failed();
                    if let Err(e) =
                        self.catalog
                            .add_run(&run("failed", None, 0, 0, Some(e.clone())))
                    {
                        tracing::warn!(error = %e, "cannot record the VM run");
                    }
                }
                Err(e)
            }
        };
        self.persist(s);
        out
    }
}

/// `bottleneck: target (source 12%, CPU 8%, target 80%)`.
fn split_text(t: &ferry_engine::TimeSplit) -> String {
    format!(
        "bottleneck: {} (source {:.0}%, CPU {:.0}%, target {:.0}%)",
        t.bottleneck(),
        t.source_pct,
        t.cpu_pct,
        t.target_pct
    )
}

impl App {
    /// Waits for everything a VM of `job` needs before its backup starts: a slot of the
    /// session, its disks' slots, then the appliance's limits (source, host, datastores,
    /// appliance). The VM's view and the session log say what it waits for. `None` when the
    /// session is cancelled first.
    pub(crate) async fn vm_slots(
        self: &Arc<Self>,
        s: &Arc<LiveSession>,
        job: &JobConfig,
        slots: &JobSlots,
        driver: &dyn ferry_hv::HypervisorDriver,
        vm: &VmSummary,
    ) -> Option<VmSlots> {
        let on_wait = |what: &str| {
            let mut changed = false;
            s.vm(&vm.id, |l| {
                if l.view.waiting_for.as_deref() != Some(what) {
                    l.view.waiting_for = Some(what.to_string());
                    changed = true;
                }
            });
            if changed {
                self.log(s, "info", Some(&vm.name), format!("waiting for {what}"));
            }
        };
        let job_slot = crate::schedule::take(
            slots.vms.clone(),
            1,
            &format!("a slot of the job (parallel-vms = {})", job.parallel_vms),
            &s.cancel,
            &on_wait,
        )
        .await?;
        let disks = match &slots.disks {
            Some((sem, n)) => {
                let want = vm.disks.len().clamp(1, *n) as u32;
                Some(
                    crate::schedule::take(
                        sem.clone(),
                        want,
                        &format!("{want} disk slot(s) of the job (parallel-disks = {n})"),
                        &s.cancel,
                        &on_wait,
                    )
                    .await?,
                )
            }
            None => None,
        };
        let stores: Vec<String> = match job.per_datastore_vms {
            Some(_) => match driver.disk_stores(vm).await {
                Ok(m) => m.into_values().collect(),
                Err(e) => {
                    self.log(
                        s,
                        "warn",
                        Some(&vm.name),
                        format!("cannot tell the datastores of the VM's disks ({e}); not limited by datastore"),
                    );
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        let limits = self
            .limits
            .acquire(
                &job.source,
                vm.host.as_deref(),
                &stores,
                job.per_datastore_vms,
                &s.cancel,
                &on_wait,
            )
            .await?;
        s.vm(&vm.id, |l| l.view.waiting_for = None);
        Some(VmSlots {
            _job: job_slot,
            _disks: disks,
            _limits: limits,
        })
    }
}

fn name_owned(s: &LiveSession) -> String {
    s.view().job
}

/// Opens a configured repository.
pub async fn open_repository(cfg: &RepositoryConfig) -> Result<Repository, String> {
    let unlock = cfg.unlock()?;
    let store = Store::open(&cfg.url, false).map_err(|e| e.to_string())?;
    Repository::open_with(store, &unlock)
        .await
        .map_err(|e| e.to_string())
}
