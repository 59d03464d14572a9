//! `ferry serve`: the appliance service (`ferry-daemon`) on an HTTPS port until SIGTERM or
//! Ctrl-C. A thin main: it reads the arguments, wires the hypervisor drivers and the VM backup
//! of `ferry backup --source` in as the daemon's backend, prints one JSON line
//! (`url`, `tls_fingerprint`, `state_dir`, `config`) on stdout once listening, and serves.

use anyhow::Context;
use ferry_core::Secret;
use ferry_daemon::{Backend, BackendError, DaemonConfig, VmRestore};
use ferry_engine::{BackupOptions, BackupReport};
use ferry_hv::{HypervisorDriver, RestoredVm, SourceConfig, VmSummary};
use ferry_repo::Repository;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Arguments of `ferry serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// HTTPS address (port 0 picks a free port).
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Users, TLS certificate (tls/cert.pem, tls/key.pem: replace them with your own), catalog,
    /// secrets.
    #[arg(long, default_value = "/var/lib/ferry", env = "FERRY_STATE_DIR")]
    state_dir: PathBuf,
    /// The configuration file the API edits (default: $FERRY_CONFIG, else STATE_DIR/ferry.toml).
    #[arg(long, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// Create this admin user if no user exists yet; the password comes from
    /// --admin-password-file or FERRY_ADMIN_PASSWORD (never from the command line).
    #[arg(long, value_name = "USER")]
    init_admin: Option<String>,
    /// File holding the first admin's password (first line).
    #[arg(long, value_name = "PATH")]
    admin_password_file: Option<PathBuf>,
    /// Rebuild the catalog's VM history from the configured repositories before serving.
    #[arg(long)]
    rebuild_catalog: bool,
    /// Seconds running sessions may go on after a shutdown is asked before they are cancelled.
    #[arg(long, default_value_t = 60)]
    job_grace: u64,
    /// Extra names (DNS or IP) for the generated certificate.
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_names: Vec<String>,
}

/// The drivers and the VM backup of the CLI, for the daemon.
struct CliBackend;

#[async_trait::async_trait]
impl Backend for CliBackend {
    async fn connect(
        &self,
        name: &str,
        source: &SourceConfig,
    ) -> Result<Arc<dyn HypervisorDriver>, BackendError> {
        super::source::connect(name, source)
            .await
            .map_err(|e| BackendError(crate::error_text(&e)))
    }

    async fn backup_vm(
        &self,
        driver: &dyn HypervisorDriver,
        source: &str,
        repo: &Repository,
        vm: &VmSummary,
        engine: BackupOptions,
    ) -> Result<BackupReport, BackendError> {
        let opts = super::hvbackup::VmBackupOptions {
            engine,
            ..Default::default()
        };
        super::hvbackup::backup_vm(driver, source, repo, vm, &opts)
            .await
            .map(|b| b.report)
            .map_err(|e| BackendError(crate::error_text(&e)))
    }

    async fn restore_vm(
        &self,
        driver: &dyn HypervisorDriver,
        repo: &Repository,
        manifest: &ferry_repo::Manifest,
        vm: VmRestore,
    ) -> Result<RestoredVm, BackendError> {
        let mut plan = super::restore::restore_plan(
            repo,
            manifest,
            driver.kind(),
            vm.name.clone(),
            vm.power_on,
        )
        .await
        .map_err(|e| BackendError(crate::error_text(&e)))?;
        super::restore::guard_plan(&mut plan, &vm.cancel, Some(vm.read.clone()));
        let r = driver.restore_vm(&plan).await;
        if vm.cancel.is_cancelled() {
            return Err(BackendError(
                "restore cancelled: the partial VM was removed".into(),
            ));
        }
        r.map_err(|e| {
            BackendError(format!(
                "cannot restore VM `{}` of restore point {}: {e}",
                manifest.meta.vm.name, manifest.id
            ))
        })
    }

    async fn replica_action(
        &self,
        config: &std::path::Path,
        state_dir: &std::path::Path,
        name: &str,
        action: ferry_daemon::replicas::ReplicaAction,
    ) -> Result<ferry_daemon::replicas::ReplicaRun, ferry_daemon::replicas::ReplicaRefusal> {
        super::replica::api_action(config, state_dir, name, action).await
    }
}

/// Runs the service.
pub async fn run(a: Args, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let config_path = a
        .config
        .clone()
        .unwrap_or_else(|| a.state_dir.join("ferry.toml"));
    let mut cfg = DaemonConfig::new(
        a.state_dir.clone(),
        config_path.clone(),
        Arc::new(CliBackend),
    );
    if let Some(user) = &a.init_admin {
        let pw = match &a.admin_password_file {
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read the admin password file {}", p.display()))?;
                Secret::new(t.lines().next().unwrap_or(""))
            }
            None => Secret::new(std::env::var("FERRY_ADMIN_PASSWORD").map_err(|_| {
                anyhow::anyhow!("--init-admin needs the password in FERRY_ADMIN_PASSWORD or --admin-password-file")
            })?),
        };
        cfg.init_admin = Some((user.clone(), pw));
    }
    cfg.tls_names.extend(a.tls_names.iter().cloned());
    if !a.listen.ip().is_unspecified() {
        cfg.tls_names.push(a.listen.ip().to_string());
    }
    cfg.tls_names.sort();
    cfg.tls_names.dedup();
    cfg.job_grace = Duration::from_secs(a.job_grace);
    if a.rebuild_catalog {
        for (repo, n) in ferry_daemon::rebuild_catalog(&cfg).await? {
            eprintln!("catalog: repository `{repo}`: {n} restore point(s)");
        }
    }
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr()?;
    let job_grace = cfg.job_grace;
    let (app, identity) = ferry_daemon::build(cfg)?;
    let line = serde_json::json!({
        "url": format!("https://{addr}"),
        "tls_fingerprint": identity.as_ref().map(|i| i.fingerprint.clone()),
        "state_dir": a.state_dir,
        "config": config_path,
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    drop(out);
    let shutdown = CancellationToken::new();
    let s2 = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        s2.cancel();
    });
    // Replica jobs (`[replicas.NAME]`) run beside the service's own scheduler.
    tokio::spawn(super::replica::schedule(
        config_path.clone(),
        a.state_dir.clone(),
        shutdown.clone(),
    ));
    ferry_daemon::serve(listener, app, identity, job_grace, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
