//! `ferry restore SNAPSHOT [--disk NAME] --to PATH|NBD-URI [--format F]`: a restore point's
//! disk to a sparse raw file, an image file (VHD, VHDX, VMDK), a block device or an NBD export.
//! Every chunk is authenticated before it is written; a new file appears under its name only
//! when complete. Prints what was written on stdout (`--json`: the reports).

use crate::cmd::backup::{EXIT_CANCELLED, TlsArgs, cancel_on_signal, progress_bar};
use crate::cmd::repo::RepoArgs;
use anyhow::{Context, bail};
use ferry_core::size::{human_bytes, human_rate};
use ferry_engine::source;
use ferry_engine::{EngineError, Progress, RestoreOptions, RestoreReport, RestoreTo};
use ferry_image::OutputFormat;
use ferry_nbd::NbdClient;
use ferry_repo::{Manifest, Repository};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Arguments of `ferry restore`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Restore point: an id (or a unique prefix of one), `latest`, or `VM@latest`.
    pub snapshot: String,
    /// Disk to restore; default: every disk (then --to is a directory unless there is one disk).
    #[arg(long)]
    pub disk: Option<String>,
    /// Output path (file, block device, or directory for several disks) or NBD URI.
    #[arg(long)]
    pub to: String,
    /// Output format for files: raw, vhd, vhd-fixed, vhdx, vmdk, vmdk-stream.
    #[arg(long, default_value = "raw")]
    pub format: String,
    /// Chunks fetched and written concurrently.
    #[arg(long, default_value_t = 8)]
    pub in_flight: usize,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Print the reports as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Finds the restore point `spec` names: an id, a unique id prefix, `latest` or `VM@latest`.
pub async fn resolve_snapshot(repo: &Repository, spec: &str) -> anyhow::Result<Manifest> {
    let ids = repo.snapshot_ids().await?;
    if let Some(vm) = spec.strip_suffix("@latest") {
        for id in ids.iter().rev() {
            let m = repo.load_manifest(id).await?;
            if m.meta.vm.id == vm || m.meta.vm.name == vm {
                return Ok(m);
            }
        }
        bail!("VM `{vm}` has no restore point in this repository");
    }
    if spec == "latest" {
        let Some(id) = ids.last() else {
            bail!("the repository holds no restore point");
        };
        return Ok(repo.load_manifest(id).await?);
    }
    let hits: Vec<&String> = ids.iter().filter(|i| i.starts_with(spec)).collect();
    match hits.as_slice() {
        [one] => Ok(repo.load_manifest(one).await?),
        [] => bail!("no restore point `{spec}` in this repository (see `ferry snapshots`)"),
        many => bail!(
            "`{spec}` matches {} restore points; give more of the id",
            many.len()
        ),
    }
}

fn extension(f: OutputFormat) -> &'static str {
    match f {
        OutputFormat::Raw => "raw",
        OutputFormat::VhdFixed | OutputFormat::VhdDynamic => "vhd",
        OutputFormat::Vhdx => "vhdx",
        OutputFormat::VmdkSparse | OutputFormat::VmdkStream => "vmdk",
    }
}

/// Runs `ferry restore`.
pub async fn run(a: Args, _global: &crate::Global) -> anyhow::Result<ExitCode> {
    let format: OutputFormat = a.format.parse().map_err(anyhow::Error::msg)?;
    let repo = a.repo.open().await?;
    let manifest = resolve_snapshot(&repo, &a.snapshot).await?;
    let disks: Vec<String> = match &a.disk {
        Some(d) => {
            if !manifest.disks.iter().any(|x| &x.name == d) {
                bail!(
                    "restore point {} has no disk `{d}` (disks: {})",
                    manifest.id,
                    manifest
                        .disks
                        .iter()
                        .map(|x| x.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            vec![d.clone()]
        }
        None => manifest.disks.iter().map(|d| d.name.clone()).collect(),
    };
    let nbd = source::is_nbd_uri(&a.to);
    if nbd && disks.len() != 1 {
        bail!("an NBD target takes one disk: pass --disk");
    }
    let mut targets = Vec::new();
    if nbd {
        let cfg = source::nbd_config(&a.to, &a.tls.source_options()?)?;
        let label = cfg.uri_redacted();
        let client = NbdClient::connect(cfg)
            .await
            .with_context(|| format!("cannot open NBD target {label}"))?;
        targets.push((disks[0].clone(), RestoreTo::Nbd(Arc::new(client))));
    } else if disks.len() == 1 {
        targets.push((
            disks[0].clone(),
            RestoreTo::File {
                path: PathBuf::from(&a.to),
                format,
            },
        ));
    } else {
        let dir = PathBuf::from(&a.to);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
        for d in &disks {
            targets.push((
                d.clone(),
                RestoreTo::File {
                    path: dir.join(format!("{d}.{}", extension(format))),
                    format,
                },
            ));
        }
    }
    let cancel = CancellationToken::new();
    cancel_on_signal(cancel.clone());
    let mut reports: Vec<RestoreReport> = Vec::new();
    for (disk, to) in targets {
        let progress = Arc::new(Progress::new());
        let opts = RestoreOptions {
            fetches_in_flight: a.in_flight.max(1),
            cancel: cancel.clone(),
            progress: progress.clone(),
        };
        let bar = if a.json {
            None
        } else {
            progress_bar(progress, "restore")
        };
        let r = ferry_engine::restore_disk(&repo, &manifest, &disk, to, &opts).await;
        if let Some(b) = bar {
            b.finish().await;
        }
        let r = match r {
            Err(EngineError::Cancelled) => {
                eprintln!("restore cancelled");
                return Ok(ExitCode::from(EXIT_CANCELLED));
            }
            other => other?,
        };
        if !a.json {
            eprintln!(
                "restored disk {} of {} to {}: {} in {:.2} s ({}), fetched {}, wrote {}, zero {}; time: repository {:.0}% / CPU {:.0}% / target {:.0}%",
                r.disk,
                r.snapshot,
                r.target,
                human_bytes(r.size),
                r.seconds,
                human_rate(r.size, r.seconds),
                human_bytes(r.fetched_bytes),
                human_bytes(r.written_bytes),
                human_bytes(r.zero_bytes),
                r.time.source_pct,
                r.time.cpu_pct,
                r.time.target_pct,
            );
            println!("{}", r.target);
        }
        reports.push(r);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(ExitCode::SUCCESS)
}
