//! Prometheus metrics at `/metrics` (text exposition by the `prometheus-client` crate).
//!
//! Per-VM figures (last success, RPO age, failures) come from the catalog at scrape time, so
//! they survive restarts; byte and duration counters are this process's; repository usage is
//! measured after each job (listing chunk objects is too slow for every scrape).

use crate::catalog::Catalog;
use crate::jobs::Status;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

type Labels = Vec<(String, String)>;

#[derive(Debug, Clone, Copy, Default)]
struct RepoUsage {
    restore_points: u64,
    chunks: u64,
    chunk_bytes: u64,
}

/// This process's counters.
#[derive(Debug)]
pub struct Metrics {
    bytes_read: AtomicU64,
    bytes_uploaded: AtomicU64,
    vm_ok: AtomicU64,
    vm_failed: AtomicU64,
    vm_seconds: Histogram,
    sessions: Mutex<BTreeMap<(String, &'static str), u64>>,
    last_duration: Mutex<BTreeMap<String, i64>>,
    repos: Mutex<BTreeMap<String, RepoUsage>>,
    /// Work leases (scale-out, ADR 0105).
    pub work: crate::scaleout::WorkMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            bytes_read: AtomicU64::new(0),
            bytes_uploaded: AtomicU64::new(0),
            vm_ok: AtomicU64::new(0),
            vm_failed: AtomicU64::new(0),
            vm_seconds: Histogram::new([1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4.0 * 3600.0]),
            sessions: Default::default(),
            last_duration: Default::default(),
            repos: Default::default(),
            work: Default::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    /// A VM backed up.
    pub fn vm_done(&self, read: u64, uploaded: u64, seconds: f64) {
        self.bytes_read.fetch_add(read, Ordering::Relaxed);
        self.bytes_uploaded.fetch_add(uploaded, Ordering::Relaxed);
        self.vm_ok.fetch_add(1, Ordering::Relaxed);
        self.vm_seconds.observe(seconds);
    }

    /// A VM failed (after its retries).
    pub fn vm_failed(&self) {
        self.vm_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// A session ended.
    pub fn sessions_finished(&self, status: Status, seconds: i64, job: &str) {
        let s = match status {
            Status::Success => "success",
            Status::Warning => "warning",
            Status::Cancelled => "cancelled",
            _ => "failed",
        };
        *lock(&self.sessions).entry((job.into(), s)).or_default() += 1;
        lock(&self.last_duration).insert(job.into(), seconds);
    }

    /// Measures a repository's usage.
    pub async fn repository_usage(&self, name: &str, repo: &ferry_repo::Repository, points: usize) {
        match repo.store().list("chunks").await {
            Ok(chunks) => {
                lock(&self.repos).insert(
                    name.into(),
                    RepoUsage {
                        restore_points: points as u64,
                        chunks: chunks.len() as u64,
                        chunk_bytes: chunks.iter().map(|o| o.size).sum(),
                    },
                );
            }
            Err(e) => {
                tracing::warn!(repository = name, error = %e, "cannot measure the repository")
            }
        }
    }

    /// The last measured usage of `name`: restore points, chunks, chunk bytes.
    pub fn usage_of(&self, name: &str) -> Option<(u64, u64, u64)> {
        lock(&self.repos)
            .get(name)
            .map(|u| (u.restore_points, u.chunks, u.chunk_bytes))
    }

    /// The exposition text.
    pub fn render(&self, catalog: &Catalog, running: usize, now: i64) -> Result<String, String> {
        self.render_with(catalog, running, now, None)
    }

    /// The exposition text, with the health of the replicas recorded under `state_dir`.
    pub fn render_with(
        &self,
        catalog: &Catalog,
        running: usize,
        now: i64,
        state_dir: Option<&std::path::Path>,
    ) -> Result<String, String> {
        let mut reg = Registry::with_prefix("ferry");
        if let Some(d) = state_dir {
            crate::replicas::register(&mut reg, d, now);
        }
        let c = |v: u64| {
            let c: Counter = Counter::default();
            c.inc_by(v);
            c
        };
        reg.register(
            "bytes_read",
            "Bytes read from hypervisor sources by backups",
            c(self.bytes_read.load(Ordering::Relaxed)),
        );
        reg.register(
            "bytes_uploaded",
            "Bytes uploaded to repositories by backups",
            c(self.bytes_uploaded.load(Ordering::Relaxed)),
        );
        let vm_runs = Family::<Labels, Counter>::default();
        vm_runs
            .get_or_create(&vec![("result".into(), "success".into())])
            .inc_by(self.vm_ok.load(Ordering::Relaxed));
        vm_runs
            .get_or_create(&vec![("result".into(), "failed".into())])
            .inc_by(self.vm_failed.load(Ordering::Relaxed));
        reg.register("vm_backups", "VM backups finished by this process", vm_runs);
        reg.register(
            "vm_backup_duration_seconds",
            "Wall time of VM backups (retries included)",
            self.vm_seconds.clone(),
        );
        let sessions = Family::<Labels, Counter>::default();
        for ((job, st), n) in lock(&self.sessions).iter() {
            sessions
                .get_or_create(&vec![
                    ("job".into(), job.clone()),
                    ("status".into(), (*st).into()),
                ])
                .inc_by(*n);
        }
        reg.register(
            "sessions",
            "Job sessions finished by this process",
            sessions,
        );
        let dur = Family::<Labels, Gauge>::default();
        for (job, s) in lock(&self.last_duration).iter() {
            dur.get_or_create(&vec![("job".into(), job.clone())])
                .set(*s);
        }
        reg.register(
            "job_last_duration_seconds",
            "Wall time of each job's latest session",
            dur,
        );
        let run = Gauge::<i64>::default();
        run.set(running as i64);
        reg.register("sessions_running", "Sessions running now", run);

        let last = Family::<Labels, Gauge>::default();
        let rpo = Family::<Labels, Gauge>::default();
        let fails = Family::<Labels, Counter>::default();
        let points = Family::<Labels, Gauge>::default();
        for v in catalog.vm_status().map_err(|e| e.to_string())? {
            let l: Labels = vec![
                ("vm".into(), v.vm_name.clone()),
                ("vm_id".into(), v.vm_id.clone()),
                ("source".into(), v.source.clone()),
            ];
            if let Some(t) = v.last_success {
                last.get_or_create(&l).set(t);
                rpo.get_or_create(&l).set((now - t).max(0));
            }
            fails.get_or_create(&l).inc_by(v.failures);
            points.get_or_create(&l).set(v.restore_points as i64);
        }
        reg.register(
            "vm_last_success_timestamp_seconds",
            "Start time of each VM's newest successful backup",
            last,
        );
        reg.register(
            "vm_rpo_age_seconds",
            "Age of each VM's newest restore point (the recovery point objective reached now)",
            rpo,
        );
        reg.register("vm_failures", "Failed backups of each VM (catalog)", fails);
        reg.register(
            "vm_restore_points",
            "Restore points of each VM (catalog)",
            points,
        );
        let rp = Family::<Labels, Gauge>::default();
        let rc = Family::<Labels, Gauge>::default();
        let rb = Family::<Labels, Gauge>::default();
        for (name, u) in lock(&self.repos).iter() {
            let l: Labels = vec![("repository".into(), name.clone())];
            rp.get_or_create(&l).set(u.restore_points as i64);
            rc.get_or_create(&l).set(u.chunks as i64);
            rb.get_or_create(&l).set(u.chunk_bytes as i64);
        }
        reg.register(
            "repository_restore_points",
            "Restore points in each repository",
            rp,
        );
        reg.register("repository_chunks", "Chunk objects in each repository", rc);
        reg.register(
            "repository_chunk_bytes",
            "Bytes of chunk objects in each repository (stored, after compression)",
            rb,
        );
        let w = &self.work;
        reg.register(
            "work_leases_claimed",
            "VM work leases of scheduled windows claimed by this process",
            c(w.claimed.load(Ordering::Relaxed)),
        );
        reg.register(
            "work_lease_takeovers",
            "Work leases taken over from an appliance whose lease expired",
            c(w.taken_over.load(Ordering::Relaxed)),
        );
        reg.register(
            "work_vms_done_elsewhere",
            "VMs of this appliance's windows finished by another appliance",
            c(w.done_elsewhere.load(Ordering::Relaxed)),
        );
        let held = Gauge::<i64>::default();
        held.set(w.held.load(Ordering::Relaxed));
        reg.register("work_leases_held", "Work leases held now", held);
        let mut out = String::new();
        encode(&mut out, &reg).map_err(|e| e.to_string())?;
        Ok(out)
    }
}
