//! `ferry export SNAPSHOT [--disk NAME] --listen HOST:PORT|unix:PATH [--writable]`: serves a
//! restore point's disk over NBD until Ctrl-C or SIGTERM. Prints the NBD URI on stdout once
//! the socket is listening. `--writable` keeps writes in a temporary copy-on-write overlay;
//! the restore point never changes.

use crate::cmd::backup::cancel_on_signal;
use crate::cmd::repo::RepoArgs;
use crate::cmd::restore::resolve_snapshot;
use anyhow::bail;
use std::io::Write;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Arguments of `ferry export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Restore point: an id (or a unique prefix of one), `latest`, or `VM@latest`.
    pub snapshot: String,
    /// Disk to serve; may be omitted when the restore point has one disk.
    #[arg(long)]
    pub disk: Option<String>,
    /// Where to listen: HOST:PORT (port 0 picks a free port) or unix:PATH.
    #[arg(long)]
    pub listen: String,
    /// Accept writes (kept in a temporary overlay, never in the repository).
    #[arg(long)]
    pub writable: bool,
}

/// Runs `ferry export`.
pub async fn run(a: Args, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let manifest = resolve_snapshot(&repo, &a.snapshot).await?;
    let disk = match (&a.disk, manifest.disks.as_slice()) {
        (Some(d), disks) if disks.iter().any(|x| &x.name == d) => d.clone(),
        (Some(d), _) => bail!("restore point {} has no disk `{d}`", manifest.id),
        (None, [one]) => one.name.clone(),
        (None, _) => bail!(
            "restore point {} has {} disks: pass --disk",
            manifest.id,
            manifest.disks.len()
        ),
    };
    let listener = ferry_engine::export::bind(&a.listen).await?;
    println!("{}", listener.uri(&disk));
    let _ = std::io::stdout().flush();
    eprintln!(
        "serving disk {disk} of restore point {} ({}); Ctrl-C stops",
        manifest.id,
        if a.writable {
            "writable overlay"
        } else {
            "read-only"
        }
    );
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    ferry_engine::export::serve(&repo, &manifest.id, &disk, a.writable, listener, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
