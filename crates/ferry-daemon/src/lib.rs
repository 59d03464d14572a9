//! Ferry's appliance service, behind `ferry serve`: an HTTPS REST API (axum on
//! [`ferry_http::Server`]) for sources, repositories and jobs kept in `ferry.toml`; users with
//! Argon2id passwords, bearer tokens and roles; a scheduler (cron with time zones, windows,
//! retries, concurrency limits, GFS retention); sessions with live logs, progress and cancel;
//! an SQLite catalog; Prometheus metrics. See `docs/appliance-service.md`.
//!
//! The hypervisor side comes from the caller as a [`Backend`] (the CLI wires the drivers and
//! its VM backup function in), so this crate knows the driver trait but no driver.

pub mod alerts;
pub mod api;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod console;
pub mod events;
pub mod events_api;
pub mod fsutil;
pub mod jobs;
pub mod metrics;
pub mod problem;
pub mod replica_api;
pub mod replicas;
pub mod restore;
pub mod scaleout;
pub mod schedule;
pub mod tls;

use crate::auth::{Role, Users};
use crate::catalog::Catalog;
use crate::config::ConfigStore;
use crate::jobs::LiveSession;
use crate::schedule::{Clock, Limits, Planner, Scheduled, SystemClock};
use ferry_core::Secret;
use ferry_engine::{BackupOptions, BackupReport};
use ferry_hv::{HypervisorDriver, SourceConfig, VmSummary};
use ferry_repo::Repository;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// An error of the hypervisor side, as text that names the source and never holds a secret.
#[derive(Debug, Clone)]
pub struct BackendError(pub String);

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the service needs from the hypervisor side.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Logs in to source `name`.
    async fn connect(
        &self,
        name: &str,
        source: &SourceConfig,
    ) -> Result<Arc<dyn HypervisorDriver>, BackendError>;

    /// Backs up `vm` of `driver` (source `source`) into `repo`: snapshot, read, commit or
    /// abort, exactly like `ferry backup --source`.
    async fn backup_vm(
        &self,
        driver: &dyn HypervisorDriver,
        source: &str,
        repo: &Repository,
        vm: &VmSummary,
        engine: BackupOptions,
    ) -> Result<BackupReport, BackendError>;

    /// Creates a VM on `driver` from restore point `manifest` of `repo`, exactly like
    /// `ferry restore --to-source`: counts the bytes it reads from the repository into
    /// `read`, and stops at the next read once `cancel` fires (the driver then removes what
    /// it created).
    async fn restore_vm(
        &self,
        driver: &dyn HypervisorDriver,
        repo: &Repository,
        manifest: &ferry_repo::Manifest,
        vm: VmRestore,
    ) -> Result<ferry_hv::RestoredVm, BackendError>;

    /// Starts `action` on replica `name` (records in `<state_dir>/replicas/`, jobs in
    /// `config`), exactly like `ferry replica …`: what is refused is refused now, before
    /// anything changes; the rest is returned to run in the background.
    async fn replica_action(
        &self,
        config: &std::path::Path,
        state_dir: &std::path::Path,
        name: &str,
        action: replicas::ReplicaAction,
    ) -> Result<replicas::ReplicaRun, replicas::ReplicaRefusal> {
        let _ = (config, state_dir, name, action);
        Err(replicas::ReplicaRefusal::Unavailable(
            "replica jobs are not available in this service".into(),
        ))
    }
}

/// How to restore a whole VM.
#[derive(Debug, Clone)]
pub struct VmRestore {
    /// Name of the new VM.
    pub name: String,
    /// Start it once complete.
    pub power_on: bool,
    /// Stops the restore.
    pub cancel: CancellationToken,
    /// Bytes read from the repository so far.
    pub read: Arc<std::sync::atomic::AtomicU64>,
}

/// A service error (startup).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The TLS identity.
    #[error("TLS: {0}")]
    Tls(String),
    /// The state directory.
    #[error("state: {0}")]
    State(String),
    /// The configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// The catalog.
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
}

/// How to run the service.
pub struct DaemonConfig {
    /// Users, TLS identity, catalog, secrets.
    pub state_dir: PathBuf,
    /// `ferry.toml` (created on the first change if absent).
    pub config_path: PathBuf,
    /// The hypervisor side.
    pub backend: Arc<dyn Backend>,
    /// First admin: created when no user exists yet.
    pub init_admin: Option<(String, Secret)>,
    /// Names in the generated certificate.
    pub tls_names: Vec<String>,
    /// Serve plain HTTP (tests of the HTTP layer only; `ferry serve` always uses TLS).
    pub plain_http: bool,
    /// How long running sessions may go on after shutdown is asked before they are cancelled.
    pub job_grace: Duration,
    /// Time source of the scheduler.
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for DaemonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonConfig")
            .field("state_dir", &self.state_dir)
            .field("config_path", &self.config_path)
            .field("init_admin", &self.init_admin.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

impl DaemonConfig {
    /// Defaults: TLS for localhost, 60 s for jobs to finish at shutdown, the system clock.
    pub fn new(state_dir: PathBuf, config_path: PathBuf, backend: Arc<dyn Backend>) -> Self {
        Self {
            state_dir,
            config_path,
            backend,
            init_admin: None,
            tls_names: vec!["localhost".into(), "127.0.0.1".into()],
            plain_http: false,
            job_grace: Duration::from_secs(60),
            clock: Arc::new(SystemClock),
        }
    }
}

/// The running service's shared state.
pub struct App {
    /// `ferry.toml`.
    pub store: ConfigStore,
    /// Users and tokens.
    pub users: Users,
    /// The catalog.
    pub catalog: Arc<Catalog>,
    /// The hypervisor side.
    pub backend: Arc<dyn Backend>,
    /// Counters.
    pub metrics: metrics::Metrics,
    /// Concurrency limits.
    pub limits: Limits,
    /// Sessions started by this process.
    pub live: Mutex<HashMap<String, Arc<LiveSession>>>,
    /// Running sessions' tasks.
    pub tracker: TaskTracker,
    /// Set when shutdown begins: no new sessions.
    pub stopping: CancellationToken,
    /// Cancelled when the grace period is over: running sessions stop.
    pub stopping_jobs: CancellationToken,
    /// The scheduler's plan.
    pub planner: Arc<Mutex<Planner>>,
    /// Wakes the scheduler after a change.
    pub wake: Arc<tokio::sync::Notify>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// The HTTPS certificate's fingerprint.
    pub fingerprint: Option<String>,
    /// The state directory (the drivers' crash journals go to `journal/` in it).
    pub state_dir: PathBuf,
    /// The replica action each replica runs or ran last through the API.
    pub replica_actions: Mutex<HashMap<String, replicas::ActionView>>,
    /// What the event streams are fed from (ADR 0178).
    pub events: Arc<events::Hub>,
    /// Tickets that open an event stream without a header (ADR 0179).
    pub tickets: events_api::Tickets,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Sessions running now.
    pub fn running(&self) -> usize {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| !s.view().status.done())
            .count()
    }

    /// The scheduler's next firing of `job`.
    pub fn planner_next(&self, job: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        self.planner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .next_of(job)
    }
}

/// Builds the shared state (state directory, users, catalog) without serving.
pub fn build(config: DaemonConfig) -> Result<(Arc<App>, Option<tls::Identity>), DaemonError> {
    let state = &config.state_dir;
    std::fs::create_dir_all(state)
        .map_err(|e| DaemonError::State(format!("cannot create {}: {e}", state.display())))?;
    let identity = if config.plain_http {
        None
    } else {
        let names: Vec<&str> = config.tls_names.iter().map(String::as_str).collect();
        Some(tls::load_or_generate(state, &names)?)
    };
    let users = Users::load(state)?;
    if let Some((name, pw)) = &config.init_admin {
        if users.count() == 0 {
            users
                .add(name, Role::Admin, pw)
                .map_err(|p| DaemonError::State(format!("first admin: {}", p.detail)))?;
            tracing::info!(user = %name, "first admin created");
        } else {
            tracing::info!("users exist already; the first-admin setting is ignored");
        }
    }
    if users.count() == 0 {
        tracing::warn!(
            "no user exists: start with --init-admin NAME (password from FERRY_ADMIN_PASSWORD or --admin-password-file) to create the first admin"
        );
    }
    let catalog = Arc::new(Catalog::open(&state.join("catalog.sqlite"))?);
    alerts::init(&catalog)?;
    console::init(&catalog)?;
    let orphans = catalog.fail_orphans(chrono::Utc::now().timestamp())?;
    if orphans > 0 {
        tracing::warn!(
            sessions = orphans,
            "sessions of a previous run that never ended are marked failed"
        );
    }
    let store = ConfigStore::new(config.config_path.clone(), state.join("secrets"));
    let doc = store.load().map_err(|p| DaemonError::Config(p.detail))?;
    let app = Arc::new(App {
        store,
        users,
        catalog,
        backend: config.backend.clone(),
        metrics: Default::default(),
        limits: Limits::new(
            doc.appliance.max_concurrent_vms,
            doc.appliance.per_source_vms,
        )
        .per_host(doc.appliance.per_host_vms),
        live: Default::default(),
        tracker: TaskTracker::new(),
        stopping: CancellationToken::new(),
        stopping_jobs: CancellationToken::new(),
        planner: Default::default(),
        wake: Default::default(),
        clock: config.clock.clone(),
        fingerprint: identity.as_ref().map(|i| i.fingerprint.clone()),
        state_dir: state.clone(),
        replica_actions: Default::default(),
        events: Arc::new(events::Hub::new(
            doc.appliance.events_buffer,
            Duration::from_millis(doc.appliance.events_progress_ms),
        )),
        tickets: Default::default(),
    });
    Ok((app, identity))
}

/// Rebuilds the catalog's VM history from every configured repository; returns the restore
/// points found per repository.
pub async fn rebuild_catalog(config: &DaemonConfig) -> Result<Vec<(String, usize)>, DaemonError> {
    let store = ConfigStore::new(config.config_path.clone(), config.state_dir.join("secrets"));
    let doc = store.load().map_err(|p| DaemonError::Config(p.detail))?;
    std::fs::create_dir_all(&config.state_dir).map_err(|e| {
        DaemonError::State(format!("cannot create {}: {e}", config.state_dir.display()))
    })?;
    let catalog = Catalog::open(&config.state_dir.join("catalog.sqlite"))?;
    let mut out = Vec::new();
    for (name, cfg) in &doc.repositories {
        let repo = jobs::open_repository(cfg)
            .await
            .map_err(|e| DaemonError::Config(format!("repository `{name}`: {e}")))?;
        let ms = repo
            .snapshots()
            .await
            .map_err(|e| DaemonError::Config(format!("repository `{name}`: {e}")))?;
        let n = catalog.rebuild_from(name, &ms)?;
        out.push((name.clone(), n));
    }
    Ok(out)
}

/// Serves until `shutdown`: the API on `listener` (HTTPS), the scheduler, the sessions. At
/// shutdown no new session starts; running ones get `job_grace` to finish, then are cancelled
/// (a cancelled backup leaves no restore point behind) and awaited; then the server stops.
pub async fn run(
    listener: TcpListener,
    config: DaemonConfig,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let grace = config.job_grace;
    let (app, identity) = build(config)?;
    serve(listener, app, identity, grace, shutdown).await
}

/// [`run`] on a state built by [`build`].
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    identity: Option<tls::Identity>,
    job_grace: Duration,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, tls = identity.is_some(), fingerprint = identity.as_ref().map(|i| i.fingerprint.as_str()), "appliance service listening");
    }
    let mut server = ferry_http::Server::new(listener).grace(Duration::from_secs(5));
    if let Some(id) = &identity {
        server = server.tls(id.config.clone());
    }
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(server.run(api::router(app.clone()), http_stop.clone()));

    let sched_stop = CancellationToken::new();
    let (a1, a2) = (app.clone(), app.clone());
    let sched = tokio::spawn(schedule::run_scheduler(
        app.clock.clone(),
        move || scheduled_jobs(&a1),
        move |job| {
            let fired = a2
                .planner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .fired_at(job)
                .map(|t| t.timestamp());
            if let Err(p) = a2.start_session_in(job, "schedule", "scheduler", fired) {
                tracing::warn!(job, "scheduled run not started: {}", p.detail);
            }
        },
        app.planner.clone(),
        app.wake.clone(),
        sched_stop.clone(),
    ));

    let rpo = tokio::spawn(alerts::rpo_loop(app.clone(), sched_stop.clone()));

    shutdown.cancelled().await;
    tracing::info!("shutting down: no new sessions");
    app.stopping.cancel();
    sched_stop.cancel();
    let _ = sched.await;
    let _ = rpo.await;
    app.tracker.close();
    if tokio::time::timeout(job_grace, app.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("sessions still running after the grace period: cancelling them");
        app.stopping_jobs.cancel();
        app.tracker.wait().await;
    }
    // Open event streams end now rather than hold the server's grace period.
    app.events.closing.cancel();
    http_stop.cancel();
    let _ = http.await;
    tracing::info!("stopped");
    Ok(())
}

fn scheduled_jobs(app: &App) -> Vec<Scheduled> {
    let doc = match app.store.load() {
        Ok(d) => d,
        Err(p) => {
            tracing::warn!("scheduler: {}", p.detail);
            return Vec::new();
        }
    };
    doc.jobs
        .iter()
        .filter(|(_, j)| j.enabled)
        .filter_map(|(n, j)| {
            let s = j.schedule().ok().flatten()?;
            Some(Scheduled {
                name: n.clone(),
                schedule: s,
                key: format!(
                    "{}@{}",
                    j.schedule.as_deref().unwrap_or(""),
                    j.timezone.as_deref().unwrap_or("UTC")
                ),
            })
        })
        .collect()
}
